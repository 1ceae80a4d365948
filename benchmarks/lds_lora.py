"""LDS and cost in the LoRA setting: attribution over the adapter's parameters or all of them.

    .venv/bin/python benchmarks/lds_lora.py                     # benchmarks/digits-style
    .venv/bin/python benchmarks/lds_lora.py --benchmark benchmarks/digits-lora  # the retired one
    .venv/bin/python benchmarks/lds_lora.py --timesteps 10 --proj-dim 2048 --threads 1

The benchmarks are the Stable-Diffusion protocol of D-TRAK and DAS at digit scale: a
text-conditioned model pretrained on some digits, a LoRA fine-tune on others, and the
fine-tune's generations attributed to the fine-tuning set. ``digits-style``
(``build_digits_style.py``) pretrains on all ten classes and fine-tunes a slanted style;
``digits-lora`` (``build_digits_lora.sh``, retired) pretrained on 0-4 and fine-tuned on 5-9.

Every gradient method runs on the fine-tuned model with the library's defaults (the backend
rule of ``diffattr attribute``, which picks the factored backend here). "LoRA parameters"
differentiates the adapters only (what a LoRA checkpoint's trainable parameters are); "all
parameters" differentiates every weight of the fine-tuned model (the pretrained weights, the
adapters and the prompt encoder). For both DAS rows the table gives the featurisation time
(training set and both query sets) and its peak memory
over the process's baseline (RSS; CUDA allocator on a GPU).

Writes ``benchmarks/results/lds-<benchmark>.json`` and ``.md`` and the table between the
``<!-- lds:<benchmark> -->`` markers of ``benchmarks/README.md``. The LDS is over the reported
queries; a benchmark with a calibration split also gets the rows' LDS on its calibration
queries, in the JSON and below the table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench_factored import _Memory as PeakMemory
from diffattr.data import ImageDataset
from diffattr.evaluation import LDSBenchmark
from diffattr.features import (
    FeatureConfig,
    PlanConfig,
    featurize,
)
from diffattr.features._curvature import CurvatureConfig
from diffattr.methods import (
    DAS,
    DTRAK,
    EKFAC,
    KFAC,
    TRAK,
    DASConfig,
    DTRAKConfig,
    InfluenceConfig,
    NDAConfig,
    Scores,
    TRAKConfig,
    attribute,
    nda_scores,
    pixel_cosine_scores,
    random_scores,
)
from diffattr.models import Checkpoint
from lds_table import (
    HERE,
    Scorer,
    _recorded,
    _row_dir,
    calibration_rows,
    journey_and_unlearning,
    markdown,
    merged,
    score_rows,
    write_results,
)


@dataclass(frozen=True)
class AllParameters:
    """The fine-tuned checkpoint with every parameter trainable, for attribution over all."""

    checkpoint: Checkpoint

    @property
    def path(self) -> Path:
        return self.checkpoint.path

    @property
    def scheduler_config(self) -> dict[str, Any]:
        return self.checkpoint.scheduler_config

    @property
    def metadata(self) -> dict[str, Any]:
        return self.checkpoint.metadata

    def weights_id(self, weights: str = "auto") -> str:
        return self.checkpoint.weights_id(weights)  # type: ignore[arg-type]

    def load_model(self, weights: str = "auto", device: str = "cpu") -> nn.Module:
        model = self.checkpoint.load_model(weights, device)  # type: ignore[arg-type]
        return model.requires_grad_(True)


def features_for(
    args: argparse.Namespace,
    plan: PlanConfig | None = None,
    parameters: tuple[str, ...] | None = None,
    dim: int | None = None,
    factored_dim: int | None = None,
) -> FeatureConfig:
    """The library's (and the CLI's) defaults at this T and k: the backend rule decides.

    ``plan``, ``parameters``, ``dim`` and ``factored_dim``: the diagnostic rows' other
    timesteps, parameter subsets and projection sizes.
    """
    default = FeatureConfig()
    projection = replace(default.projection, dim=dim or args.proj_dim)
    if factored_dim is not None:
        projection = replace(projection, factored_dim=factored_dim)
    return replace(
        default,
        plan=plan or PlanConfig(num_steps=args.timesteps),
        projection=projection,
        parameters=parameters,
    )


def featurisation_cost(args: argparse.Namespace) -> None:
    """Time and peak memory of featurising the training set once, in this fresh process."""
    benchmark = LDSBenchmark.open(args.benchmark)
    source = AllParameters(benchmark.base) if args.cost == "all" else benchmark.base
    model = source.load_model()
    settings = DAS(DASConfig()).features(features_for(args)).resolve(model)
    train_data = benchmark.train_data()
    with tempfile.TemporaryDirectory() as folder:
        memory = PeakMemory(torch.device("cpu"))
        began = time.perf_counter()
        featurize(
            model,
            source.scheduler_config,
            train_data,
            settings,
            Path(folder) / "store",
            model_id="cost",
            batch_size=64,
            chunk_size=2048,
            progress=False,
        )
        seconds = time.perf_counter() - began
        print(
            json.dumps({"seconds": round(seconds, 1), "peak_extra_mb": round(memory.extra_mb(), 1)})
        )


def measured_cost(args: argparse.Namespace, which: str) -> dict[str, float]:
    command = [sys.executable, __file__, "--benchmark", args.benchmark, "--cost", which]
    command += ["--timesteps", str(args.timesteps), "--proj-dim", str(args.proj_dim)]
    command += ["--threads", str(args.threads)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _kept(run: Path, label: str, score: Scorer) -> Scorer:
    """``score``, but scores kept by an earlier run under ``run/rows`` are read back."""

    def kept(queries: ImageDataset) -> Scores:
        folder = _row_dir(run, label, queries.name)
        return Scores.load(folder) if folder.is_dir() else score(queries)

    return kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--benchmark", default=str(HERE / "digits-style"))
    parser.add_argument("--timesteps", type=int, default=10)
    parser.add_argument("--proj-dim", type=int, default=2048)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--run", default="runs/lds-lora", help="feature stores")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="+", help="only these row labels")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="read back the rows' scores kept under --run/rows (from an earlier run of the same "
        "settings) instead of computing them",
    )
    parser.add_argument("--cost", choices=["lora", "all"], help=argparse.SUPPRESS)
    parser.add_argument(
        "--prepare",
        action="store_true",
        help="only featurise and fit (kept under --run), e.g. while the benchmark still builds",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.cost:
        featurisation_cost(args)
        return
    benchmark = LDSBenchmark.open(args.benchmark)
    run = Path(args.run) / benchmark.path.name
    train_data = benchmark.train_data()
    base = benchmark.base
    whole = AllParameters(base)

    def gradient(
        method: object,
        source: Any,
        folder: str,
        plan: PlanConfig | None = None,
        parameters: tuple[str, ...] | None = None,
        dim: int | None = None,
        factored_dim: int | None = None,
    ) -> Scorer:
        settings = features_for(args, plan, parameters, dim, factored_dim)

        def score(queries: ImageDataset) -> Scores:
            return attribute(
                method,  # type: ignore[arg-type]
                [source],
                train_data,
                queries,
                settings,
                run / folder,
                batch_size=64,
                chunk_size=2048,
                progress=False,
            )

        return score

    rows: dict[str, Scorer] = {
        "DAS, LoRA parameters": gradient(DAS(DASConfig()), base, "lora"),
        "DAS, all parameters": gradient(DAS(DASConfig()), whole, "all"),
        "DAS, LoRA parameters, linear (signed change)": gradient(
            DAS(DASConfig(transform="linear")), base, "lora"
        ),
        "D-TRAK, LoRA parameters": gradient(DTRAK(DTRAKConfig()), base, "lora"),
        "D-TRAK, LoRA parameters, squared": gradient(
            DTRAK(DTRAKConfig(transform="squared")), base, "lora"
        ),
        "TRAK, LoRA parameters": gradient(TRAK(TRAKConfig()), base, "lora"),
        "NDA": lambda q: nda_scores(
            q, train_data, NDAConfig(), scheduler_config=base.scheduler_config
        ),
        "pixel cosine": lambda q: pixel_cosine_scores(q, train_data),
        "random": lambda q: random_scores(q, train_data, seed=0),
    }
    # Issue 20, over the LoRA parameters (the checkpoint's trainable ones) like the DAS row;
    # the unlearning candidates are that row's saved scores.
    lora_rows = journey_and_unlearning(
        benchmark, lambda method: gradient(method, base, "lora"), run, "DAS, LoRA parameters"
    )
    rows.update({f"{label}, LoRA parameters": fn for label, fn in lora_rows.items()})
    # Diagnostics: where in the adapters and in the diffusion the attribution signal lies.
    band_rows = {
        "diagnostic: DAS, t in [0, 300)": range(0, 300, 30),
        "diagnostic: DAS, t in [300, 700)": range(300, 700, 40),
        "diagnostic: DAS, t in [700, 1000)": range(700, 1000, 30),
    }
    for label, band in band_rows.items():
        plan = PlanConfig(strategy="explicit", timesteps=tuple(band))
        rows[label] = gradient(DAS(DASConfig()), base, f"band-{band.start}", plan=plan)
    rows["diagnostic: DAS, LoRA parameters, k = 8192"] = gradient(
        DAS(DASConfig()), base, "lora-k8192", dim=8192
    )
    for matrix in ("A", "B"):
        rows[f"diagnostic: DAS, LoRA {matrix} matrices only"] = gradient(
            DAS(DASConfig()), base, f"lora-{matrix}", parameters=(f"*lora_{matrix}*",)
        )
    # Curvature rows over the LoRA parameters, by digits-mlp's rule (lds_table.py): one K-FAC /
    # EK-FAC estimate (sampled Fisher, K-FAC-expand, InfluenceConfig's defaults, damping 0.01 x
    # the mean eigenvalue) of the fine-tuned model. Exact: every eigenvector, training gradients
    # streamed; projected: the top eigenvectors per layer within k (one stage), or within 64 k
    # then sparse to k.
    curvature_rows: dict[str, object] = {
        "K-FAC": KFAC(InfluenceConfig(route="exact")),
        "EK-FAC": EKFAC(InfluenceConfig(route="exact")),
        "EK-FAC, projected": EKFAC(InfluenceConfig(route="projected")),
        "DAS, EK-FAC curvature": DAS(DASConfig(curvature="ekfac", route="exact")),
    }
    for label, method in curvature_rows.items():
        rows[label] = gradient(method, base, "curvature")
    # K-FAC-reduce (Eschenhagen et al.): positions summed before the outer products; the
    # adapters of attention and convolutions see many positions, so it differs from expand here.
    reduce = InfluenceConfig(route="exact", ggn=CurvatureConfig(sharing="reduce"))
    rows["K-FAC, reduce"] = gradient(KFAC(reduce), base, "curvature")
    rows["EK-FAC, reduce"] = gradient(EKFAC(reduce), base, "curvature")
    rows["EK-FAC, projected 64k then k"] = gradient(
        EKFAC(InfluenceConfig(route="projected")),
        base,
        "curvature",
        factored_dim=64 * args.proj_dim,
    )
    if args.only:
        rows = {label: fn for label, fn in rows.items() if label in args.only}
    if args.reuse:
        rows = {label: _kept(run, label, fn) for label, fn in rows.items()}
    if args.prepare:
        for label, score in rows.items():
            for queries in benchmark.queries.values():
                score(queries)
            print(f"prepared {label}", flush=True)
        return
    parameters = {
        "lora": sum(p.numel() for p in base.load_model().parameters() if p.requires_grad),
        "all": sum(p.numel() for p in whole.load_model().parameters()),
    }
    results = score_rows(benchmark, rows, run, args.bootstrap)
    recorded = HERE / "results" / f"lds-{benchmark.path.name}.json"
    previous = json.loads(recorded.read_text()) if args.only and recorded.exists() else {}
    projection = (
        "the backend rule's choice, factored: per-layer Kronecker factors, then sparse to k"
    )
    table = markdown(results, args, projection)
    # Each in a fresh process, so that neither pays the other's one-off costs. With --only the
    # recorded costs are kept, unless a DAS row they belong to is rerun.
    threads = args.threads
    if previous.get("costs") and not {"DAS, LoRA parameters", "DAS, all parameters"} & set(rows):
        costs, threads = previous["costs"], previous["settings"]["threads"]
    else:
        costs = {which: measured_cost(args, which) for which in ("lora", "all")}
    cost_lines = [
        "",
        f"Featurising the {len(train_data)} training images for DAS (T = {args.timesteps}, "
        f"k = {args.proj_dim}), each in a fresh process with {threads} thread(s):",
        "",
        "| DAS over | parameters differentiated | seconds | peak extra MB (RSS) |",
        "|---|---|---|---|",
    ]
    for which in ("lora", "all"):
        cost = costs[which]
        cost_lines.append(
            f"| {which} | {parameters[which]:,} | {cost['seconds']} | {cost['peak_extra_mb']} |"
        )
    table += "\n" + "\n".join(cost_lines)
    settings = {
        "timesteps": args.timesteps,
        "proj_dim": args.proj_dim,
        "benchmark": benchmark.id,
        "threads": threads,
        "parameters": parameters,
    }
    extra: dict[str, Any] = {"costs": costs}
    if args.only:
        # --only adds or refreshes rows; the recorded rest of the table is kept (in order).
        results = merged(benchmark.path.name, results)
        table = markdown(results, args, projection) + "\n" + "\n".join(cost_lines)
    if any(len(benchmark.calibration_ids(name)) for name in benchmark.queries):
        calibration = calibration_rows(benchmark, list(rows), run, args.bootstrap)
        if previous.get("calibration"):
            # The recorded rows' calibration LDS, in the table's order, with this run's in place.
            new = {
                (label, result.query_set): (label, result, s) for label, result, s in calibration
            }
            calibration = [
                new.pop((r["label"], r["query_set"]), None) or _recorded({"seconds": 0.0, **r})
                for r in previous["calibration"]
            ] + list(new.values())
        table += "\n\nCalibration queries only (for choosing settings; not the reported LDS):\n\n"
        table += markdown(calibration, args, projection).split("\n\n")[0]
        extra["calibration"] = [
            {"label": label, **result.to_dict()} for label, result, _ in calibration
        ]
    write_results(benchmark.path.name, table, settings, results, **extra)


if __name__ == "__main__":
    main()

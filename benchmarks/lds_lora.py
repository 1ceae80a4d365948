"""LDS and cost in the LoRA setting: attribution over the adapter's parameters or all of them.

    .venv/bin/python benchmarks/lds_lora.py                     # benchmarks/digits-lora
    .venv/bin/python benchmarks/lds_lora.py --timesteps 10 --proj-dim 2048 --threads 1

The benchmark (``build_digits_lora.sh``) is the Stable-Diffusion protocol of D-TRAK and DAS at
digit scale: a text-conditioned model pretrained on the digits 0-4, a LoRA fine-tune on 5-9, and
the fine-tune's generations attributed to the fine-tuning set. Every gradient method runs on the
fine-tuned model with the library's defaults (the backend rule of ``diffattr attribute``, which
picks the factored backend here). "LoRA parameters" differentiates the adapters only (what a LoRA
checkpoint's trainable parameters are); "all parameters" differentiates every weight of the
fine-tuned model (the pretrained weights, the adapters and the prompt encoder). For both DAS rows
the table gives the featurisation time (training set and both query sets) and its peak memory
over the process's baseline (RSS; CUDA allocator on a GPU).

Writes ``benchmarks/results/lds-digits-lora.json`` and ``.md`` and the table between the
``<!-- lds:digits-lora -->`` markers of ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
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
    ProjectionConfig,
    choose_backend,
    featurize,
)
from diffattr.methods import (
    DAS,
    DTRAK,
    TRAK,
    DASConfig,
    DTRAKConfig,
    NDAConfig,
    Scores,
    TRAKConfig,
    attribute,
    nda_scores,
    pixel_cosine_scores,
    random_scores,
)
from diffattr.models import Checkpoint
from lds_table import HERE, Scorer, markdown, score_rows, write_results


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


def features_for(model: nn.Module, args: argparse.Namespace, exact: bool = False) -> FeatureConfig:
    """The CLI's defaults: the backend rule, and the projection that goes with it.

    ``exact``: the unprojected gradients (vmap, identity projection), affordable for a LoRA's
    few parameters.
    """
    plan = PlanConfig(num_steps=args.timesteps)
    if exact:
        return FeatureConfig(plan=plan, projection=ProjectionConfig(kind="identity"))
    backend = choose_backend(model, None).backend
    kind = "kronecker" if backend == "factored" else "dense"
    return FeatureConfig(
        plan=plan,
        projection=ProjectionConfig(kind=kind, dim=args.proj_dim, max_memory_mb=4096),
        backend=backend,
    )


def featurisation_cost(args: argparse.Namespace) -> None:
    """Time and peak memory of featurising the training set once, in this fresh process."""
    benchmark = LDSBenchmark.open(args.benchmark)
    source = AllParameters(benchmark.base) if args.cost == "all" else benchmark.base
    model = source.load_model()
    settings = DAS(DASConfig()).features(features_for(model, args))
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--benchmark", default=str(HERE / "digits-lora"))
    parser.add_argument("--timesteps", type=int, default=10)
    parser.add_argument("--proj-dim", type=int, default=2048)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--run", default="runs/lds-lora", help="feature stores")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="+", help="only these row labels")
    parser.add_argument("--cost", choices=["lora", "all"], help=argparse.SUPPRESS)
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

    def gradient(method: object, source: Any, folder: str, exact: bool = False) -> Scorer:
        settings = features_for(source.load_model(), args, exact)

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
        "DAS, LoRA parameters, unprojected": gradient(DAS(DASConfig()), base, "exact", True),
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
    if args.only:
        rows = {label: fn for label, fn in rows.items() if label in args.only}
    parameters = {
        "lora": sum(p.numel() for p in base.load_model().parameters() if p.requires_grad),
        "all": sum(p.numel() for p in whole.load_model().parameters()),
    }
    results = score_rows(benchmark, rows, run, args.bootstrap)
    projection = (
        "the backend rule's choice, factored: per-layer Kronecker factors, then sparse to k"
    )
    table = markdown(results, args, projection)
    # Each in a fresh process, so that neither pays the other's one-off costs.
    costs = {which: measured_cost(args, which) for which in ("lora", "all")}
    cost_lines = [
        "",
        f"Featurising the {len(train_data)} training images for DAS (T = {args.timesteps}, "
        f"k = {args.proj_dim}), each in a fresh process with {args.threads} thread(s):",
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
        "threads": args.threads,
        "parameters": parameters,
    }
    write_results("digits-lora", table, settings, results, costs=costs)


if __name__ == "__main__":
    main()

"""LDS of every attribution method on a built benchmark: one command, one table.

    .venv/bin/python benchmarks/lds_table.py                      # benchmarks/digits-mlp
    .venv/bin/python benchmarks/lds_table.py --benchmark DIR --timesteps 10 --proj-dim 2048

Every method attributes the benchmark's held-out and generated queries to its training set with
the base checkpoint (TracIn and ReTrac: with the base's training snapshots, rebuilt here by
retraining the base recipe, which must reproduce the shipped base weights bit for bit), then
each score matrix is scored against the ground truth. Settings are the library's defaults, not
tuned on these queries; only T (timesteps) and k (projection size) are set here and reported.

Writes ``benchmarks/results/lds-<benchmark>.json`` and ``.md``, and the table between the
``<!-- lds:<benchmark> -->`` markers of ``benchmarks/README.md``; each row's scores are kept
under ``RUN/<benchmark>/rows/<row>/<query set>/``.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffattr.data import ImageDataset
from diffattr.evaluation import LDSBenchmark, LDSResult, lds_score
from diffattr.features import FeatureConfig, PlanConfig, ProjectionConfig
from diffattr.methods import (
    DAS,
    DTRAK,
    EKFAC,
    KFAC,
    TRAK,
    DASConfig,
    DTRAKConfig,
    GradCos,
    GradDot,
    GradSimConfig,
    InfluenceConfig,
    JourneyTRAK,
    JourneyTRAKConfig,
    NDAConfig,
    ReTrac,
    Scores,
    TracIn,
    TracInConfig,
    TRAKConfig,
    Unlearn,
    UnlearnConfig,
    attribute,
    nda_scores,
    pixel_cosine_scores,
    random_scores,
)
from diffattr.models import Checkpoint, TrainConfig, load_checkpoint, train

HERE = Path(__file__).resolve().parent
Scorer = Callable[[ImageDataset], Scores]


def snapshots_of(benchmark: LDSBenchmark, cache: Path) -> list[Checkpoint]:
    """The base's training snapshots, by retraining its recipe; checks the final weights."""
    base = benchmark.base
    recipe = TrainConfig.from_dict(base.metadata["training"])
    # The shipped base was trained with one thread; reductions split over more threads round
    # differently, so reproduce it with one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    final = train(
        base.model_spec,
        benchmark.train_data(),
        recipe,
        cache,
        scheduler_config=base.scheduler_config,
        snapshots=True,
        progress=False,
    )
    torch.set_num_threads(threads)
    if final.weights_id() != base.weights_id():
        raise SystemExit(f"retraining the base into {cache} did not reproduce its weights")
    return [load_checkpoint(p) for p in sorted((cache / "snapshots").iterdir())]


def methods(
    benchmark: LDSBenchmark, train_data: ImageDataset, args: argparse.Namespace, run: Path
) -> dict[str, Scorer]:
    """Row label -> function from a query set to scores."""
    features = FeatureConfig(
        plan=PlanConfig(num_steps=args.timesteps),
        projection=ProjectionConfig(dim=args.proj_dim, max_memory_mb=args.max_memory_mb),
    )
    snapshots = snapshots_of(benchmark, run / "snapshots-base") if args.tracin else []

    per_sample = replace(features, plan=replace(features.plan, noise="per_sample"))
    # The same total k through per-layer Kronecker factors, computed by the factored backend:
    # by default factored features of 64 k, then sparse to k; "one stage": factors straight to k.
    factored = replace(
        features, projection=replace(features.projection, kind="kronecker"), backend="factored"
    )
    one_stage = replace(
        factored, projection=replace(factored.projection, factored_dim=args.proj_dim)
    )
    # Curvature rows project onto eigenvectors, by default within k; these keep 64 k of them.
    wide = replace(
        features, projection=replace(features.projection, factored_dim=64 * args.proj_dim)
    )

    def gradient(
        method: object,
        checkpoints: list[Checkpoint] | None = None,
        settings: FeatureConfig = features,
    ) -> Scorer:
        def score(queries: ImageDataset) -> Scores:
            return attribute(
                method,  # type: ignore[arg-type]
                checkpoints or [benchmark.base],
                train_data,
                queries,
                settings,
                run,
                batch_size=64,
                chunk_size=2048,
                progress=False,
            )

        return score

    rows: dict[str, Scorer] = {
        "DAS": gradient(DAS(DASConfig())),
        "DAS, residual signed (exact if linear)": gradient(DAS(DASConfig(residual="signed"))),
        "DAS, residual as in the DAS code": gradient(DAS(DASConfig(residual="reference"))),
        "DAS, no residual": gradient(DAS(DASConfig(residual="none"))),
        "DAS, no leverage": gradient(DAS(DASConfig(leverage=False))),
        "DAS, linear (signed change)": gradient(DAS(DASConfig(transform="linear"))),
        "DAS, output projection r=4": gradient(DAS(DASConfig(output="output_projection"))),
        "DAS, per-sample noise": gradient(DAS(DASConfig()), settings=per_sample),
        "DAS, factored": gradient(DAS(DASConfig()), settings=factored),
        "DAS, factored one stage": gradient(DAS(DASConfig()), settings=one_stage),
        "D-TRAK": gradient(DTRAK(DTRAKConfig())),
        "D-TRAK, factored": gradient(DTRAK(DTRAKConfig()), settings=factored),
        "D-TRAK, squared": gradient(DTRAK(DTRAKConfig(transform="squared"))),
        "D-TRAK, per-sample noise": gradient(DTRAK(DTRAKConfig()), settings=per_sample),
        "TRAK": gradient(TRAK(TRAKConfig())),
        "TRAK, squared": gradient(TRAK(TRAKConfig(transform="squared"))),
        "TRAK, factored": gradient(TRAK(TRAKConfig()), settings=factored),
        # Curvature rows share one K-FAC / EK-FAC estimate (sampled Fisher, K-FAC-expand) of the
        # base. Exact: every eigenvector, training gradients streamed; projected: the top
        # eigenvectors per layer within k (one stage), or within 64 k then sparse to k.
        "K-FAC": gradient(KFAC(InfluenceConfig(route="exact"))),
        "EK-FAC": gradient(EKFAC(InfluenceConfig(route="exact"))),
        "EK-FAC, projected": gradient(EKFAC(InfluenceConfig(route="projected"))),
        "EK-FAC, projected 64k then k": gradient(
            EKFAC(InfluenceConfig(route="projected")), settings=wide
        ),
        "DAS, EK-FAC curvature": gradient(DAS(DASConfig(curvature="ekfac", route="exact"))),
        "DAS, EK-FAC curvature, projected": gradient(
            DAS(DASConfig(curvature="ekfac", route="projected"))
        ),
        "grad-dot": gradient(GradDot(GradSimConfig())),
        "grad-cos": gradient(GradCos(GradSimConfig())),
        "NDA": lambda q: nda_scores(
            q, train_data, NDAConfig(), scheduler_config=benchmark.base.scheduler_config
        ),
        "pixel cosine": lambda q: pixel_cosine_scores(q, train_data),
        "random": lambda q: random_scores(q, train_data, seed=0),
    }
    rows.update(journey_and_unlearning(benchmark, gradient, run))
    if snapshots:
        rows["TracIn (snapshots)"] = gradient(TracIn(TracInConfig()), snapshots)
        rows["ReTrac (snapshots)"] = gradient(ReTrac(TracInConfig()), snapshots)
    if args.only:
        rows = {label: fn for label, fn in rows.items() if label in args.only}
    return rows


def journey_and_unlearning(
    benchmark: LDSBenchmark, gradient: Callable[..., Scorer], run: Path, das: str = "DAS"
) -> dict[str, Scorer]:
    """Journey-TRAK and the unlearning rows (issue 20), with their configs' defaults.

    The benchmark's generated queries were sampled by ``lds init`` with DDPM at its default
    number of steps and the benchmark's recorded guidance, seeds = ids (``queries/generated.npz``
    holds them); no ``samples.json`` records the sampler, so Journey-TRAK is told it, and its
    check that every chain ends on the stored image verifies it. The candidate rows restrict the
    unlearning loss pass to each query's top M under the ``das`` row's saved scores of the same
    query set (so that row must be scored first, in the same run).
    """
    generation = JourneyTRAKConfig(
        sampler="ddpm", guidance_scale=float(benchmark.config.guidance_scale)
    )

    def restricted(top_m: int) -> Scorer:
        def score(queries: ImageDataset) -> Scores:
            candidates = _row_dir(run, das, queries.name)
            config = UnlearnConfig(candidates=str(candidates), top_m=top_m)
            return gradient(Unlearn(config))(queries)

        return score

    return {
        "Journey-TRAK": gradient(JourneyTRAK(generation)),
        "Unlearning": gradient(Unlearn(UnlearnConfig())),
        "Unlearning, DAS top-50": restricted(50),
        "Unlearning, DAS top-200": restricted(200),
    }


#: How the rows of lds_table.py are projected, as the table's footnote says it.
PROJECTION = (
    "dense Gaussian; the factored rows: the same total k as per-layer Kronecker factors, "
    "see benchmarks/README.md; the K-FAC / EK-FAC rows: exact, or the curvature's top "
    "eigenvectors per layer, see docs/methods.md"
)
Result = tuple[str, LDSResult, float]
#: Rows that attribute generated queries only.
GENERATED_ONLY = {"Journey-TRAK", "Journey-TRAK, LoRA parameters"}


def markdown(results: list[Result], args: argparse.Namespace, projection: str = PROJECTION) -> str:
    by_label: dict[str, dict[str, LDSResult]] = {}
    for label, result, _ in results:
        by_label.setdefault(label, {})[result.query_set] = result
    sets = sorted({r.query_set for _, r, _ in results}, key=["heldout", "generated"].index)
    ceilings = {r.query_set: r for _, r, _ in results}
    header = "| method | " + " | ".join(f"LDS {s} (95% CI) | of ceiling" for s in sets) + " |"
    lines = [header, "|" + "---|" * (2 * len(sets) + 1)]
    for label, entries in by_label.items():
        cells = []
        for name in sets:
            if name not in entries:
                cells += ["-", "-"]
                continue
            result = entries[name]
            share = f"{result.lds / result.ceiling:.0%}" if result.ceiling else "-"
            cells += [f"{result.lds:.3f} [{result.ci[0]:.3f}, {result.ci[1]:.3f}]", share]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    ceiling_text = "; ".join(
        f"{name}: {ceilings[name].ceiling:.3f} (split-half {ceilings[name].split_half:.3f}, "
        f"over {ceilings[name].ceiling_basis})"
        for name in sets
        if ceilings[name].ceiling is not None
    )
    lines.append("")
    lines.append(
        f"Timesteps T = {args.timesteps} (uniform, noise shared by all images), projection "
        f"k = {args.proj_dim} ({projection}), damping 0.01 x the mean eigenvalue, library "
        f"defaults otherwise; noise ceiling {ceiling_text}."
    )
    return "\n".join(lines)


def _row_dir(run: Path, label: str, query_set: str) -> Path:
    # Each row's scores are kept (methods share a name, e.g. the DAS variants).
    return run / "rows" / re.sub(r"[^a-z0-9]+", "-", label.lower()) / query_set


def score_rows(
    benchmark: LDSBenchmark, rows: dict[str, Scorer], run: Path, n_bootstrap: int
) -> list[Result]:
    """Each row's scores on each query set, kept under ``run/rows/``, and their LDS.

    The LDS is over the reported queries: a benchmark's calibration queries are left out (see
    :func:`calibration_rows`).
    """
    results: list[Result] = []
    for label, score in rows.items():
        for query_set, queries in benchmark.queries.items():
            if label in GENERATED_ONLY and query_set != "generated":
                continue
            began = time.perf_counter()
            scores = score(queries)
            seconds = time.perf_counter() - began
            scores.save(_row_dir(run, label, query_set))
            result = lds_score(benchmark, scores, query_set, n_bootstrap=n_bootstrap)
            results.append((label, result, seconds))
            print(
                f"{label:28s} {query_set:9s} LDS {result.lds:6.3f} "
                f"[{result.ci[0]:6.3f}, {result.ci[1]:6.3f}]  {seconds:6.1f} s",
                flush=True,
            )
    return results


def calibration_rows(
    benchmark: LDSBenchmark, labels: list[str], run: Path, n_bootstrap: int
) -> list[Result]:
    """The LDS of rows already scored by :func:`score_rows` on the calibration queries only."""
    return [
        (
            label,
            lds_score(
                benchmark,
                Scores.load(_row_dir(run, label, query_set)),
                query_set,
                part="calibration",
                n_bootstrap=n_bootstrap,
            ),
            0.0,
        )
        for label in labels
        for query_set in benchmark.queries
        if label not in GENERATED_ONLY or query_set == "generated"
    ]


def write_results(
    name: str,
    table: str,
    settings: dict[str, Any],
    results: list[Result],
    **extra: Any,
) -> None:
    """Print the table; write results/lds-<name>.json and .md and the README's table."""
    print("\n" + table)
    out = HERE / "results" / f"lds-{name}"
    out.parent.mkdir(exist_ok=True)
    records = [{"label": lb, "seconds": round(s, 2), **r.to_dict()} for lb, r, s in results]
    out.with_suffix(".json").write_text(
        json.dumps({"settings": settings, "results": records, **extra}, indent=1) + "\n"
    )
    out.with_suffix(".md").write_text(table + "\n")
    update_readme(name, table)


def merged(name: str, results: list[Result]) -> list[Result]:
    """``results`` in place of the same rows of the recorded results; the other rows kept.

    So that ``--only`` adds or refreshes rows without dropping the rest of the table.
    """
    path = HERE / "results" / f"lds-{name}.json"
    if not path.exists():
        return results
    new = {(label, result.query_set): (label, result, s) for label, result, s in results}
    out = []
    for record in json.loads(path.read_text())["results"]:
        key = (record["label"], record["query_set"])
        out.append(new.pop(key) if key in new else _recorded(record))
    return out + list(new.values())


def _recorded(record: dict[str, Any]) -> Result:
    result = LDSResult(
        method=record["method"],
        query_set=record["query_set"],
        lds=record["lds"],
        ci=tuple(record["ci"]),
        per_query=np.asarray(record["per_query"]),
        split_half=record["split_half"],
        ceiling=record["ceiling"],
        ceiling_basis=record["ceiling_basis"],
        n_subsets=record["n_subsets"],
        settings=record["settings"],
    )
    return record["label"], result, record["seconds"]


def update_readme(name: str, table: str) -> None:
    """Put ``table`` between the ``<!-- lds:<name> -->`` markers of benchmarks/README.md."""
    readme = HERE / "README.md"
    marker = f"<!-- lds:{name} -->"
    if readme.exists() and readme.read_text().count(marker) == 2:
        text = readme.read_text()
        pattern = re.escape(marker) + r".*?" + re.escape(marker)
        readme.write_text(
            re.sub(pattern, lambda _: f"{marker}\n{table}\n{marker}", text, flags=re.S)
        )
        print(f"updated {readme}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--benchmark", default=str(HERE / "digits-mlp"))
    parser.add_argument("--timesteps", type=int, default=10)
    parser.add_argument("--proj-dim", type=int, default=2048)
    parser.add_argument("--max-memory-mb", type=int, default=8192)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--no-tracin", dest="tracin", action="store_false")
    parser.add_argument("--only", nargs="+", help="only these row labels")
    parser.add_argument("--run", default="runs/lds-table", help="feature stores and snapshots")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    benchmark = LDSBenchmark.open(args.benchmark)
    name = benchmark.path.name
    run = Path(args.run) / name
    train_data = benchmark.train_data()
    rows = methods(benchmark, train_data, args, run)
    results = score_rows(benchmark, rows, run, args.bootstrap)
    if args.only:
        results = merged(name, results)
    table = markdown(results, args)
    print("\n" + table)
    settings = {"timesteps": args.timesteps, "proj_dim": args.proj_dim, "benchmark": benchmark.id}
    write_results(name, table, settings, results)


if __name__ == "__main__":
    main()

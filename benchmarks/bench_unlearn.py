"""What restricting unlearning's loss pass to DAS's top-M costs and loses, M = 50, 200, all.

    .venv/bin/python benchmarks/bench_unlearn.py            # digits-mlp, after lds_table.py

The LDS of each variant is read from ``results/lds-<benchmark>.json`` (the rows ``Unlearning``,
``Unlearning, DAS top-50`` and ``Unlearning, DAS top-200`` of ``lds_table.py``, which scored
them). The cost is measured here in CPU seconds of one thread (``time.process_time``: on a
shared machine wall time measures the neighbours), on the benchmark's generated queries: the
fit (the Fisher) once, then scoring the first ``--small`` and the first ``--large`` queries; the
difference gives the cost per query, the rest the cost paid once per scoring call (the loss
pass before unlearning over the union of the candidates). The candidates are the ``DAS`` row's
saved scores, whose own cost (DAS's featurisation and scores) is that row's.

Writes ``results/unlearn-<benchmark>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from diffattr.evaluation import LDSBenchmark
from diffattr.features import FeatureConfig, PlanConfig, ProjectionConfig
from diffattr.methods import Attribution, Unlearn, UnlearnConfig
from lds_table import HERE, _row_dir

VARIANTS = {"Unlearning": None, "Unlearning, DAS top-200": 200, "Unlearning, DAS top-50": 50}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--benchmark", default=str(HERE / "digits-mlp"))
    parser.add_argument("--run", default="runs/lds-table", help="lds_table.py's --run")
    parser.add_argument("--small", type=int, default=2)
    parser.add_argument("--large", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    benchmark = LDSBenchmark.open(args.benchmark)
    name = benchmark.path.name
    recorded = json.loads((HERE / "results" / f"lds-{name}.json").read_text())["results"]
    lds = {(r["label"], r["query_set"]): r for r in recorded}
    train = benchmark.train_data()
    queries = benchmark.queries["generated"]
    candidates = _row_dir(Path(args.run) / name, "DAS", "generated")
    # The features only pass the dtype and parameters (unlearning differentiates all of them).
    features = FeatureConfig(plan=PlanConfig(num_steps=10), projection=ProjectionConfig(dim=2048))
    rows = []
    for label, top_m in VARIANTS.items():
        config = (
            UnlearnConfig()
            if top_m is None
            else UnlearnConfig(candidates=str(candidates), top_m=top_m)
        )
        seconds = {}
        with tempfile.TemporaryDirectory() as folder:
            run = Attribution(folder, [benchmark.base], train, features, progress=False)
            began = time.process_time()
            method = run.fit(Unlearn(config))
            seconds["fit"] = time.process_time() - began
            for n in (args.small, args.large):
                began = time.process_time()
                run.score(method, queries.select(queries.ids[:n]))
                seconds[n] = time.process_time() - began
        per_query = (seconds[args.large] - seconds[args.small]) / (args.large - args.small)
        once = seconds["fit"] + seconds[args.small] - args.small * per_query
        row = {
            "label": label,
            "top_m": top_m or len(train),
            "cpu_seconds_once": round(once, 2),
            "cpu_seconds_per_query": round(per_query, 3),
            "cpu_seconds_fit": round(seconds["fit"], 2),
            "cpu_seconds_scoring": {str(n): round(seconds[n], 2) for n in (args.small, args.large)},
        }
        for query_set in ("heldout", "generated"):
            entry = lds.get((label, query_set))
            row[f"lds_{query_set}"] = None if entry is None else entry["lds"]
            row[f"ci_{query_set}"] = None if entry is None else entry["ci"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    n_queries = sum(len(q) for q in benchmark.queries.values())
    lines = [
        "| loss pass over | LDS heldout (95% CI) | LDS generated (95% CI) | CPU s once "
        f"| CPU s per query | CPU s, all {n_queries} queries |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = []
        for query_set in ("heldout", "generated"):
            value, ci = row[f"lds_{query_set}"], row[f"ci_{query_set}"]
            cells.append("-" if value is None else f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]")
        total = row["cpu_seconds_once"] + n_queries * row["cpu_seconds_per_query"]
        over = "all N" if row["top_m"] == len(train) else f"DAS top-{row['top_m']}"
        lines.append(
            f"| {over} ({row['top_m']}) | {' | '.join(cells)} | {row['cpu_seconds_once']:.1f} "
            f"| {row['cpu_seconds_per_query']:.2f} | {total:.0f} |"
        )
    lines += [
        "",
        f"{name}: N = {len(train)} training images, UnlearnConfig defaults (10 steps, eta 0.01, "
        "Fisher weight 1, 100 loss timesteps). CPU seconds of one thread: once = the Fisher and "
        f"the loss pass before unlearning (over the candidates' union of {args.small} queries); "
        f"per query = (scoring {args.large} queries - scoring {args.small}) / "
        f"{args.large - args.small}; all queries: once + {n_queries} x per query (the union "
        "of the candidates, and so the pass before unlearning, grows with the queries). Not "
        "counted: DAS's own run, which the candidates need.",
    ]
    table = "\n".join(lines)
    print("\n" + table)
    out = HERE / "results" / f"unlearn-{name}"
    settings = {"benchmark": benchmark.id, "small": args.small, "large": args.large}
    out.with_suffix(".json").write_text(
        json.dumps({"settings": settings, "rows": rows}, indent=1) + "\n"
    )
    out.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()

"""Counterfactual remove-and-retrain on a shipped benchmark: one command, one table.

    .venv/bin/python benchmarks/counterfactual_table.py            # digits-mlp, 3 queries
    .venv/bin/python benchmarks/counterfactual_table.py --queries 8 --k 10

For the first ``--queries`` generated queries of the benchmark (ids 0, 1, ...; chosen by
position, not by any result), each method's top-k training images are removed, the base is
retrained with its recipe and seed on the rest (``retrain_like``), and the query is regenerated
from its seed with the sampler that made it (DDPM, default steps, the benchmark's guidance). The
same is done after removing k random images and after removing nothing (the control: 0 when
retraining is deterministic). See docs/methods.md, "Counterfactual remove-and-retrain".

The methods' scores are the rows that ``lds_table.py`` saved under
``RUN/<benchmark>/rows/<row>/generated/`` (the same scores as the LDS table's), so run that first
for these rows. Writes ``benchmarks/results/counterfactual-<benchmark>.json`` and ``.md`` and the
table between the ``<!-- counterfactual:<benchmark> -->`` markers of ``benchmarks/README.md``;
the retrained models' regenerations are kept (resumable) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np
import torch

from diffattr.evaluation import ClassConfidence, CounterfactualConfig, LDSBenchmark, counterfactual
from diffattr.methods import Scores
from lds_table import HERE, _row_dir

#: The LDS table's rows whose top-k are removed.
ROWS = ("DAS", "D-TRAK", "Journey-TRAK", "Unlearning")


def markdown(doc: dict, k: int) -> str:
    """The table: mean distances per removal, and per query how often a method beat random."""
    pixel, feature = doc["pixel_l2"], doc["feature_distance"]
    random = np.asarray(pixel["random-0"])
    lines = [
        "| removal (top-k of) | pixel RMS, mean | per query | class-probability L2, mean "
        "| queries moved further than random |",
        "|---|---|---|---|---|",
    ]
    for label in pixel:
        values = np.asarray(pixel[label])
        per_query = ", ".join(f"{v:.3f}" for v in values)
        shown = f"{np.mean(feature[label]):.3f}" if label in feature else "-"
        beaten = "-" if label == "random-0" else f"{int((values > random).sum())}/{len(values)}"
        lines.append(f"| {label} | {values.mean():.3f} | {per_query} | {shown} | {beaten} |")
    control = np.asarray(doc["control_pixel_l2"])
    lines += [
        "",
        f"k = {k} training images removed per query and method; queries: generated ids "
        f"{', '.join(str(q) for q in doc['query_ids'])}; random-0: k random images per query "
        f"(seeded); control (nothing removed) pixel RMS {control.max():.2e} (max over queries); "
        f"{doc['retrained_models']} retrained models (6000 steps each, one thread; kept as "
        "resumable pieces, so the time of a run is not recorded here).",
    ]
    return "\n".join(lines)


def update_readme(name: str, table: str) -> None:
    """Put ``table`` between the ``<!-- counterfactual:<name> -->`` markers of the README."""
    readme = HERE / "README.md"
    marker = f"<!-- counterfactual:{name} -->"
    if readme.exists() and readme.read_text().count(marker) == 2:
        pattern = re.escape(marker) + r".*?" + re.escape(marker)
        text = re.sub(
            pattern, lambda _: f"{marker}\n{table}\n{marker}", readme.read_text(), flags=re.S
        )
        readme.write_text(text)
        print(f"updated {readme}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--benchmark", default=str(HERE / "digits-mlp"))
    parser.add_argument("--queries", type=int, default=3, help="the first N generated queries")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), help="lds_table.py row labels")
    parser.add_argument("--run", default="runs/lds-table", help="lds_table.py's --run")
    parser.add_argument("--out", default="runs/counterfactual", help="retraining folder")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    # One thread: retraining is then deterministic and reproduces the base (the control).
    torch.set_num_threads(args.threads)
    benchmark = LDSBenchmark.open(args.benchmark)
    name = benchmark.path.name
    generated = benchmark.queries["generated"]
    queries = generated.select(generated.ids[: args.queries])
    scores = {}
    for label in args.rows:
        folder = _row_dir(Path(args.run) / name, label, "generated")
        if not folder.is_dir():
            raise SystemExit(f"{folder} is missing: run lds_table.py --only {label!r} first")
        scores[label] = Scores.load(folder)
    train = benchmark.train_data()
    config = CounterfactualConfig(
        k=args.k, guidance_scale=float(benchmark.config.guidance_scale), seed=0
    )
    began = time.perf_counter()
    result = counterfactual(
        benchmark.base,
        queries,
        scores,
        config,
        Path(args.out) / name,
        feature_map=ClassConfidence(train).probabilities,
        progress=False,
    )
    seconds = time.perf_counter() - began
    doc = json.loads((Path(args.out) / name / "counterfactual.json").read_text())
    doc.update(
        benchmark=benchmark.id,
        rows=list(args.rows),
        retrained_models=1 + len(queries) * (len(scores) + config.n_random),
        seconds_this_invocation=round(seconds, 1),
        threads=args.threads,
    )
    assert set(doc["pixel_l2"]) == set(result.pixel_l2)
    table = markdown(doc, args.k)
    print(table)
    out = HERE / "results" / f"counterfactual-{name}"
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    out.with_suffix(".md").write_text(table + "\n")
    update_readme(name, table)


if __name__ == "__main__":
    main()

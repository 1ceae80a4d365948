"""An attribution run as an index: the cost of one new query against the cost of a refit.

    .venv/bin/python benchmarks/bench_index.py                    # N = 1k, 10k, 100k; LDS check
    .venv/bin/python benchmarks/bench_index.py --sizes 1000 10000 --skip-lds

Two parts, printed as tables and written to ``benchmarks/results/index.json``:

1. **Latency and storage against N.** Training features for N = 1k, 10k and 100k images are
   synthetic (k = 2048 Gaussian rows written into a real feature store; what DAS's fit and
   scoring cost depends on the shapes, not the values). For each N: the refit (DAS's kernel
   and directions from the store), one new query scored against a saved fit (reopened from
   disk, as a new process would), and the disk the training features and the fit take, in
   float32 and in float16 storage. One query's featurisation is measured once on the real
   ``unet-tiny`` at 16x16 (T = 10, factored backend, k = 2048), since it does not depend on N;
   latency = featurise + score.
2. **float16 storage on the shipped digits-mlp benchmark**: DAS's LDS with the features stored
   in float16 next to float32 (library defaults otherwise, T = 10, k = 2048), both query sets,
   with bootstrap intervals.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from diffattr.data import load_digits
from diffattr.evaluation import LDSBenchmark, lds_score
from diffattr.features import FeatureConfig, FeatureStore, PlanConfig, ProjectionConfig, featurize
from diffattr.methods import DAS, Attribution
from diffattr.models import build_model, default_scheduler_config, model_spec

HERE = Path(__file__).resolve().parent
K = 2048
FEATURES = FeatureConfig(
    plan=PlanConfig(num_steps=10), projection=ProjectionConfig(kind="auto", dim=K)
)


def synthetic_store(path: Path, n: int, storage: str) -> FeatureStore:
    """A finished DAS training store of N random rows (features, losses) in a real store."""
    settings = {"features": DAS().features(replace(FEATURES, backend="factored")).identity()}
    settings["features"]["storage"] = storage
    dtype = "float16" if storage == "float16" else "float32"
    arrays = {"features": ((1, K), dtype), "losses": ((10,), "float32")}
    store = FeatureStore.create_or_resume(
        path, settings=settings, ids=np.arange(n), arrays=arrays, chunk_size=8192
    )
    rng = np.random.default_rng(0)
    for chunk in store.pending_chunks():
        rows = len(store.chunk_ids(chunk))
        values = {
            "features": rng.standard_normal((rows, 1, K), dtype=np.float32) / np.sqrt(K),
            "losses": rng.uniform(0.01, 0.1, (rows, 10)).astype(np.float32),
        }
        store.write_chunk(chunk, values)
    store.finalize()
    return store


def disk_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def query_featurisation_seconds(repeats: int) -> float:
    """One query through featurize on unet-tiny at 16x16 (median of repeats, after a warm-up)."""
    model = build_model(model_spec("unet-tiny", in_channels=1, sample_size=16))
    query = load_digits(size=16).select([0])
    settings = DAS().features(FEATURES)
    times = []
    with tempfile.TemporaryDirectory() as folder:
        for r in range(repeats + 1):
            began = time.perf_counter()
            featurize(
                model,
                default_scheduler_config(),
                query,
                settings,
                Path(folder) / f"q{r}",
                model_id="bench",
                batch_size=1,
                progress=False,
            )
            times.append(time.perf_counter() - began)
    return float(np.median(times[1:]))


def scaling(sizes: list[int], featurise_s: float, root: Path) -> list[dict[str, float]]:
    from diffattr.methods import _run  # the run's own fit cache

    rows = []
    for n in sizes:
        for storage in ("compute", "float16"):
            folder = root / f"n{n}-{storage}"
            store = synthetic_store(folder / "train", n, storage)
            began = time.perf_counter()
            method = DAS().fit(store)
            refit = time.perf_counter() - began
            _run._save_state(folder / "fitted", method, method.saved_state())
            synthetic_store(folder / "query", 1, storage)
            # A new process: reopen the store and the fit from disk, then score one query.
            began = time.perf_counter()
            reopened = FeatureStore.open(folder / "train")
            state = _run._load_state(folder / "fitted", method, 1)
            fresh = DAS().restore([reopened], state)
            fresh.score(FeatureStore.open(folder / "query"))
            score = time.perf_counter() - began
            rows.append(
                {
                    "n": n,
                    "storage": "float32" if storage == "compute" else storage,
                    "refit_s": round(refit, 3),
                    "score_one_s": round(score, 4),
                    "latency_s": round(featurise_s + score, 3),
                    "features_mb": round(disk_mb(folder / "train"), 1),
                    "fit_mb": round(disk_mb(folder / "fitted"), 1),
                }
            )
            print(rows[-1], flush=True)
            shutil.rmtree(folder)
    return rows


def lds_float16(run_root: Path) -> list[dict[str, object]]:
    benchmark = LDSBenchmark.open(HERE / "digits-mlp")
    train = benchmark.train_data()
    rows = []
    for storage in ("compute", "float16"):
        run = Attribution(
            run_root / storage,
            benchmark.base,
            train,
            replace(FEATURES, storage=storage),
            batch_size=64,
            chunk_size=2048,
            progress=False,
        )
        for query_set, queries in benchmark.queries.items():
            result = lds_score(benchmark, run.score(DAS(), queries), query_set)
            rows.append(
                {
                    "storage": "float32" if storage == "compute" else storage,
                    "query_set": query_set,
                    "lds": round(result.lds, 4),
                    "ci": [round(v, 4) for v in result.ci],
                }
            )
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-lds", action="store_true")
    parser.add_argument("--skip-scaling", action="store_true")
    parser.add_argument("--run", default="runs/bench-index")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = HERE / "results" / "index"
    record = (
        json.loads(out.with_suffix(".json").read_text())
        if out.with_suffix(".json").exists()
        else {}
    )
    root = Path(args.run)
    root.mkdir(parents=True, exist_ok=True)
    if not args.skip_scaling:
        featurise_s = query_featurisation_seconds(args.repeats)
        print(f"one query featurised (unet-tiny 16x16, T=10, k={K}): {featurise_s:.3f} s")
        record["featurise_one_query_s"] = featurise_s
        record["threads"] = args.threads
        record["scaling"] = scaling(args.sizes, featurise_s, root)
    if not args.skip_lds:
        record["lds_float16"] = lds_float16(root / "lds")
    lines = [
        "| N | storage | refit (s) | one new query: score (s) | latency (s) | features (MB) "
        "| fit (MB) |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['n']:,} | {r['storage']} | {r['refit_s']} | {r['score_one_s']} | "
        f"{r['latency_s']} | {r['features_mb']} | {r['fit_mb']} |"
        for r in record.get("scaling", [])
    ]
    lines.append("")
    lines.append(
        f"Latency = one query's featurisation ({record.get('featurise_one_query_s', 0):.3f} s on "
        f"unet-tiny at 16x16, T = 10, k = {K}, {record.get('threads')} thread(s)) + scoring it "
        "against the saved fit, reopened from disk (both verified on opening). Refit = DAS's "
        "kernel and directions from the training store."
    )
    if record.get("lds_float16"):
        lines += ["", "| DAS features | query set | LDS (95% CI) |", "|---|---|---|"]
        lines += [
            f"| {r['storage']} | {r['query_set']} | {r['lds']:.3f} [{r['ci'][0]:.3f}, "
            f"{r['ci'][1]:.3f}] |"
            for r in record["lds_float16"]
        ]
    table = "\n".join(lines)
    print("\n" + table)
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    out.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()

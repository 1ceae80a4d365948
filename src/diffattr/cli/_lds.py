"""The evaluation commands: ``diffattr lds`` and ``diffattr counterfactual``.

``lds`` builds a benchmark (sharded and resumable), merges it and scores saved scores;
``counterfactual`` removes top attributed images, retrains and regenerates.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, get_args

from diffattr._device import resolve_device
from diffattr._io import check_output, write_json
from diffattr.cli._common import locking_out
from diffattr.cli._options import (
    add_dataclass_options,
    add_trust_option,
    dataclass_from_args,
    non_negative_int,
    positive_int,
)
from diffattr.data import load_dataset
from diffattr.errors import ConfigError
from diffattr.evaluation import (
    ClassConfidence,
    CounterfactualConfig,
    LDSBenchmark,
    LDSConfig,
    LDSResult,
    QueryPart,
    counterfactual,
    lds_score,
)
from diffattr.methods import Scores
from diffattr.models import load_checkpoint


def add_parser(commands: Any) -> None:
    """Register ``diffattr lds`` and its subcommands."""
    lds = commands.add_parser("lds", help="linear datamodeling score: build benchmarks, score")
    sub = lds.add_subparsers(dest="lds_command", required=True, metavar="STEP")

    init = sub.add_parser("init", help="set up a benchmark: copy the base, draw masks and queries")
    _add_setup_options(init, required=True)
    init.set_defaults(run=init_command)

    build = sub.add_parser(
        "build", help="retrain and measure the subset models (resumable, shardable)"
    )
    _add_setup_options(build, required=False)
    build.add_argument("--shard", type=_shard, default=(0, 1), help="i/n: this process's share")
    build.add_argument(
        "--max-models", type=non_negative_int, help="stop after training this many; rerun"
    )
    build.add_argument(
        "--keep-models", action="store_true", help="keep subset checkpoints under models/"
    )
    build.add_argument("--batch-size", type=int, default=1024, help="pairs per measuring pass")
    build.set_defaults(run=build_command)

    merge = sub.add_parser("merge", help="check every piece and write ground_truth.npz")
    merge.add_argument("benchmark", help="benchmark directory")
    merge.set_defaults(run=merge_command)

    status = sub.add_parser("status", help="how many subset models are measured")
    status.add_argument("benchmark", help="benchmark directory")
    status.set_defaults(run=status_command)

    score = sub.add_parser("score", help="LDS of saved scores on a benchmark")
    score.add_argument("benchmark", help="benchmark directory")
    score.add_argument("scores", nargs="+", help="scores directories (from diffattr attribute)")
    score.add_argument(
        "--query-set",
        default=None,
        help="heldout or generated (default: the one whose ids the scores have)",
    )
    score.add_argument(
        "--part",
        choices=get_args(QueryPart),
        default="reported",
        help="reported: the queries outside the calibration split (default); calibration: only "
        "those kept for choosing settings; all: both",
    )
    score.add_argument(
        "--bootstrap", type=non_negative_int, default=1000, help="resamples for the interval"
    )
    score.add_argument("--out", help="also write the results as JSON here")
    score.set_defaults(run=score_command)


def _add_setup_options(parser: argparse.ArgumentParser, *, required: bool) -> None:
    parser.add_argument("benchmark", help="benchmark directory")
    parser.add_argument(
        "--base",
        required=required,
        help="trained base checkpoint (needed when the benchmark does not exist yet)",
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_trust_option(parser)
    add_dataclass_options(parser, LDSConfig)


def _open_or_create(args: argparse.Namespace) -> LDSBenchmark:
    path = Path(args.benchmark)
    config = dataclass_from_args(LDSConfig, args)
    if args.base is None:
        benchmark = LDSBenchmark.open(path, trust_remote_code=args.trust_remote_code)
        if any(getattr(args, f, None) is not None for f in config.to_dict()):
            raise ConfigError("settings are fixed when a benchmark is set up: drop them, or --base")
        return benchmark
    # Setting up samples the generated queries first: find an unwritable directory before.
    check_output(path)
    return LDSBenchmark.create(
        path,
        args.base,
        config,
        device=resolve_device(args.device),
        progress=not args.quiet,
        trust_remote_code=args.trust_remote_code,
    )


def init_command(args: argparse.Namespace) -> None:
    """``diffattr lds init``."""
    benchmark = _open_or_create(args)
    config = benchmark.config
    print(
        f"benchmark {benchmark.path} ({benchmark.id}): {config.num_subsets} subsets of "
        f"{config.fraction:g} x {len(benchmark.train_ids)} training images, "
        f"{config.model_seeds} seed(s) each; queries: "
        + ", ".join(f"{name} {len(q)}" for name, q in benchmark.queries.items())
    )


def build_command(args: argparse.Namespace) -> None:
    """``diffattr lds build``."""
    benchmark = _open_or_create(args)
    report = benchmark.build(
        shard=args.shard,
        device=resolve_device(args.device),
        max_models=args.max_models,
        keep_models=args.keep_models,
        batch_size=args.batch_size,
        progress=not args.quiet,
    )
    done, total = benchmark.status()
    index, count = args.shard
    print(
        f"shard {index}/{count}: trained {len(report.trained)} model(s) in {report.seconds:.0f} s, "
        f"{report.already_done} already done, {report.remaining} left; "
        f"benchmark: {done}/{total} measured"
    )
    if done == total:
        print(f"ground truth: {benchmark.merge()}")


def merge_command(args: argparse.Namespace) -> None:
    """``diffattr lds merge``."""
    print(f"ground truth: {_open_without_models(args.benchmark).merge()}")


def status_command(args: argparse.Namespace) -> None:
    """``diffattr lds status``."""
    benchmark = _open_without_models(args.benchmark)
    done, total = benchmark.status()
    print(f"{benchmark.path}: {done}/{total} subset models measured")


def score_command(args: argparse.Namespace) -> None:
    """``diffattr lds score``: one row per scores directory."""
    if args.out:
        check_output(args.out, file=True)
    benchmark = _open_without_models(args.benchmark)
    results = []
    for directory in args.scores:
        scores = Scores.load(directory)
        query_set = args.query_set or _query_set_of(benchmark, scores)
        results.append(
            lds_score(benchmark, scores, query_set, part=args.part, n_bootstrap=args.bootstrap)
        )
    print(format_table(results))
    if args.out:
        write_json(
            Path(args.out), {"benchmark": benchmark.id, "results": [r.to_dict() for r in results]}
        )


def _open_without_models(path: str) -> LDSBenchmark:
    # Trusted: merge, status and score read measurements and build no model from the base.
    return LDSBenchmark.open(path, trust_remote_code=True)


def _query_set_of(benchmark: LDSBenchmark, scores: Scores) -> str:
    ids = {int(i) for i in scores.query_ids}
    for name, queries in benchmark.queries.items():
        if ids == {int(i) for i in queries.ids}:
            return name
    raise ConfigError(
        f"the query ids of {scores.method}'s scores match none of the benchmark's query sets "
        f"({sorted(benchmark.queries)}); pass --query-set to see which ids differ"
    )


def format_table(results: list[LDSResult]) -> str:
    """A plain-text table: method, query set, LDS with interval, ceiling, LDS / ceiling."""
    header = ("method", "queries", "LDS", "95% CI", "ceiling", "of ceil")
    lines = ["{:14s} {:10s} {:>7s} {:>17s} {:>8s} {:>8s}".format(*header)]
    for r in results:
        ceiling = f"{r.ceiling:8.3f}" if r.ceiling is not None else f"{'-':>8s}"
        share = f"{r.lds / r.ceiling:8.0%}" if r.ceiling else f"{'-':>8s}"
        lines.append(
            f"{r.method:14s} {r.query_set:10s} {r.lds:7.3f} "
            f"[{r.ci[0]:6.3f}, {r.ci[1]:6.3f}] {ceiling} {share}"
        )
    return "\n".join(lines)


def _shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected i/n (e.g. 0/4), got {text!r}") from None
    if count < 1 or not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"shard {text!r}: need n >= 1 and 0 <= i < n")
    return index, count


def add_counterfactual_parser(commands: Any) -> None:
    """Register ``diffattr counterfactual``."""
    parser = commands.add_parser(
        "counterfactual",
        help="remove each query's top attributed images, retrain, regenerate, measure",
    )
    parser.add_argument("checkpoint", help="the checkpoint that generated the queries")
    parser.add_argument("--queries", required=True, help="generated samples dir or .npz")
    parser.add_argument("--scores", nargs="+", required=True, help="scores dirs, one per method")
    parser.add_argument("--n-queries", type=positive_int, help="only the first N queries")
    parser.add_argument("--out", required=True, help="output directory (resumed if present)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_trust_option(parser)
    add_dataclass_options(parser, CounterfactualConfig)
    parser.set_defaults(run=counterfactual_command)


@locking_out
def counterfactual_command(args: argparse.Namespace) -> None:
    """``diffattr counterfactual``: one row per removal, mean distances over the queries."""
    base = load_checkpoint(args.checkpoint, trust_remote_code=args.trust_remote_code)
    queries = load_dataset(args.queries)
    if args.n_queries is not None:
        queries = queries.select(queries.ids[: args.n_queries])
    scores = {}
    for directory in args.scores:
        loaded = Scores.load(directory)
        scores[loaded.method] = loaded
    train_data = base.training_data()
    has_classes = train_data.labels is not None and len(set(train_data.labels.tolist())) > 1
    feature_map = ClassConfidence(train_data).probabilities if has_classes else None
    result = counterfactual(
        base,
        queries,
        scores,
        dataclass_from_args(CounterfactualConfig, args),
        args.out,
        feature_map=feature_map,
        device=resolve_device(args.device),
        progress=not args.quiet,
    )
    feature = "class-probability L2" if feature_map else "no feature map (unlabelled data)"
    print(f"{'removal':14s} {'pixel RMS':>10s} {'feature':>10s}   ({feature})")
    for label, means in result.summary().items():
        value = means.get("feature_distance")
        shown = f"{value:10.4f}" if value is not None else f"{'-':>10s}"
        print(f"{label:14s} {means['pixel_l2']:10.4f} {shown}")
    print(
        f"control (nothing removed): pixel RMS {result.control_l2.mean():.2e}\n"
        f"results: {Path(args.out) / 'counterfactual.json'}, grid: "
        f"{Path(args.out) / 'counterfactual.png'}"
    )

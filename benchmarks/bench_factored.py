"""Factored (Kronecker) gradient features against vmap + dense/sparse projection and a train step.

Run: ``.venv/bin/python benchmarks/bench_factored.py [--models unet-tiny,unet-cifar,sd-small]
[--batch 8] [--big-batch 4] [--dim 4096] [--repeats 3] [--rounds 1]
[--methods factored,dense,sparse,train]
[--device auto] [--threads N] [--max-seconds 300] [--out benchmarks/results/factored.txt]``.

For each model, at the same batch size, the loss output at timestep 500, float32, it times:

- ``factored``: ``FactoredGradientComputer.compute_features`` with a ``kind="kronecker"``
  projection of ``--dim`` features (its projection is included; its k, ``computer.proj_dim``,
  can be slightly below ``--dim``).
- ``vmap+dense``: ``GradientComputer.compute`` (per-sample gradients by vmap), then a dense
  random projection to the same k as the factored layout. ``Projector.prepare`` is called first:
  it keeps the p x k matrix when it fits in ``ProjectionConfig.max_memory_mb`` (2048), else the
  matrix is regenerated in blocks on every call, which is then most of the cost.
- ``vmap+sparse``: the same with a sparse JL projection (4 non-zeros per coordinate).
- ``train step``: ``model.train()``, zero_grad, forward, the mean epsilon MSE's backward and an
  AdamW step (its state is built in the warm-up call): the reference.

Each (model, method) runs in a fresh subprocess. Columns:

- ``params``: the model's trainable parameters (all of them are differentiated, unless the note
  below the table lists some left out).
- ``batch``: samples per call (``--batch`` for unet-tiny, ``--big-batch`` for unet-cifar and
  sd-small).
- ``rows/s``: (sample, timestep) feature rows per second, the median of ``--repeats`` calls
  after one warm-up call; for the train step, samples per second.
- ``ratio``: rows/s divided by the train step's samples/s (the same batch, in the same round);
  with ``--rounds N`` every method is measured N times back to back and the table gives the
  median rate and the median of the per-round ratios (this machine's load varies).
- ``peak extra MB``: peak memory over the level right after the model, inputs and computer (or
  optimiser) were built, so it leaves out the model and the computer's copy of it but counts the
  projector's kept matrix or CSR blocks, the per-sample gradients and the AdamW state. On CUDA:
  ``torch.cuda.max_memory_allocated``; on CPU: the process's peak RSS (``VmHWM`` after resetting
  it through ``/proc/self/clear_refs`` where allowed, else ``getrusage``'s ``ru_maxrss``).
- ``note``: why a row has no timing: a warm-up call over ``--max-seconds`` (stopped at the first
  chance after the limit), out of memory, or an error.

Below the table, one line per model: its parameter memory (params x 4 bytes), the factored
layout's total k and the k of the dense/sparse projections, and any parameters left out.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from diffusers import UNet2DConditionModel
from torch import nn

from diffattr._device import resolve_device
from diffattr._probe import PeakMemory
from diffattr.features import (
    FactoredGradientComputer,
    GradientComputer,
    KroneckerLayout,
    OutputConfig,
    ProjectionConfig,
    make_projector,
    select_parameters,
)
from diffattr.features._kronecker import uncovered_parameters
from diffattr.models import (
    build_model,
    count_parameters,
    default_scheduler_config,
    model_spec,
    predict,
)

TIMESTEP = 500
#: Model name -> (channels, image side).
MODELS = {"unet-tiny": (1, 16), "unet-cifar": (3, 32), "sd-small": (4, 32)}
#: Models that use ``--big-batch``.
BIG = ("unet-cifar", "sd-small")
#: Method key -> label in the table (``--methods`` takes either).
METHODS = {
    "factored": "factored",
    "dense": "vmap+dense",
    "sparse": "vmap+sparse",
    "train": "train step",
}
#: sd-small: Stable Diffusion 1.5's UNet layout at reduced width (about 13M parameters).
SD_SMALL = {
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "block_out_channels": (64, 128, 128, 128),
    "layers_per_block": 2,
    "cross_attention_dim": 128,
    "attention_head_dim": 8,
}
CONTEXT_TOKENS = 77


# ------------------------------------------------------------------------------ models


class TextConditioned(nn.Module):
    """A ``UNet2DConditionModel`` called as ``model(x_t, t)`` with a fixed random text context."""

    def __init__(self, unet: UNet2DConditionModel, generator: torch.Generator) -> None:
        super().__init__()
        self.unet = unet
        self.in_channels = int(unet.config.in_channels)
        self.sample_size = int(unet.config.sample_size)
        width = int(unet.config.cross_attention_dim)
        context = torch.randn((1, CONTEXT_TOKENS, width), generator=generator)
        self.register_buffer("context", context)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The UNet's prediction for ``x_t`` at timesteps ``t``, every sample with the context."""
        context = self.context.expand(x_t.shape[0], -1, -1)
        return self.unet(x_t, t, encoder_hidden_states=context).sample


def build(name: str) -> nn.Module:
    """A freshly initialised model (seed 0), on the CPU."""
    channels, side = MODELS[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if name == "sd-small":
            return TextConditioned(
                UNet2DConditionModel(**SD_SMALL), torch.Generator().manual_seed(1)
            )
        return build_model(model_spec(name, in_channels=channels, sample_size=side))


# ------------------------------------------------------------------------------ measuring


class _TooSlowError(Exception):
    """Raised by the SIGALRM handler when a warm-up call runs over ``--max-seconds``."""


@contextlib.contextmanager
def _deadline(limit: float) -> Iterator[None]:
    """Raise :class:`_TooSlowError` in the body once ``limit`` seconds have passed (0: no limit).

    Python runs the handler between bytecodes, so a long native call (one vmap backward) ends
    before the body stops; a loop over projection blocks stops at the next block.
    """
    if limit <= 0:
        yield
        return

    def expire(signum: int, frame: object) -> None:
        raise _TooSlowError

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(
    fn: Callable[[], object], repeats: int, device: torch.device, max_seconds: float
) -> tuple[float | None, float, bool]:
    """(median wall time of ``fn`` after one warm-up call, the warm-up's time, stopped).

    The median is None when the warm-up call took over ``max_seconds``; ``stopped`` says
    whether :func:`_deadline` cut the call short.
    """
    began = time.perf_counter()
    try:
        with _deadline(max_seconds):
            fn()
            _sync(device)
    except _TooSlowError:
        return None, time.perf_counter() - began, True
    warm = time.perf_counter() - began
    if 0 < max_seconds < warm:
        return None, warm, False
    times = []
    for _ in range(repeats):
        _sync(device)
        began = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - began)
    return statistics.median(times), warm, False


def _current_rss() -> int:
    """This process's resident set size now, in bytes."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _Memory:
    """Peak memory over a baseline taken at construction (CUDA allocator, else RSS).

    The library's rule (``diffattr._probe.PeakMemory``); where the RSS mark cannot be reset,
    the process's lifetime ``ru_maxrss`` over the baseline.
    """

    def __init__(self, device: torch.device) -> None:
        gc.collect()
        self.peak = PeakMemory(device)
        self.base = _current_rss()

    def extra_mb(self) -> float:
        """Peak bytes over the baseline, in MiB."""
        extra = self.peak.extra_bytes()
        if extra is None:
            lifetime = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
            extra = max(lifetime - self.base, 0)
        return extra / 2**20


def _is_oom(err: BaseException) -> bool:
    if isinstance(err, torch.OutOfMemoryError | MemoryError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text
    )


def measure(name: str, method: str, args: argparse.Namespace) -> dict[str, Any]:
    """Time one method on one model in this process; the record the parent prints."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    model = build(name).to(device)
    channels, side = MODELS[name]
    batch = args.big_batch if name in BIG else args.batch
    draw = torch.Generator().manual_seed(0)
    shape = (batch, channels, side, side)
    x0 = (torch.rand(shape, generator=draw) * 2 - 1).to(device)
    noise = torch.randn(shape, generator=draw).to(device)
    scheduler_config = default_scheduler_config()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    excluded = uncovered_parameters(model, trainable)
    patterns = None
    if excluded:
        # Exact names are globs that match only themselves: select everything covered.
        patterns = [n for n, p in model.named_parameters() if p.requires_grad and n not in excluded]
    names = select_parameters(model, patterns)
    selected = set(names)
    kronecker = ProjectionConfig(kind="kronecker", dim=args.dim)
    # The factored computer's proj_dim is its layout's: the dense/sparse k without building it.
    proj_dim = KroneckerLayout(model, names, kronecker).proj_dim
    record: dict[str, Any] = {
        "model": name,
        "method": method,
        "params": count_parameters(model),
        "batch": batch,
        "proj_dim": proj_dim,
        "grad_dim": sum(p.numel() for n, p in model.named_parameters() if n in selected),
        "excluded": excluded,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "rows_per_s": None,
        "peak_mb": None,
        "note": "",
    }
    rows = batch
    memory = None
    try:
        if method == "train":
            model.train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            t = torch.full((batch,), TIMESTEP, device=device)

            def call() -> object:
                optimizer.zero_grad(set_to_none=True)
                x_t = 0.5 * x0 + 0.75 * noise  # the schedule's values do not change the cost
                F.mse_loss(predict(model, x_t, t), noise).backward()
                optimizer.step()
                return None

            memory = _Memory(device)
        elif method == "factored":
            computer = FactoredGradientComputer(
                model,
                scheduler_config,
                OutputConfig(kind="loss"),
                kronecker,
                patterns,
                dtype=torch.float32,
                device=device,
            )
            record["proj_dim"] = computer.proj_dim
            rows = batch * computer.num_outputs
            memory = _Memory(device)

            def call() -> object:
                return computer.compute_features(x0, TIMESTEP, noise).features

        else:
            vmapped = GradientComputer(
                model,
                scheduler_config,
                OutputConfig(kind="loss"),
                patterns,
                dtype=torch.float32,
                device=device,
            )
            p = vmapped.num_parameters
            projector = make_projector(ProjectionConfig(kind=method, dim=proj_dim), p, device)
            rows = batch * vmapped.num_outputs
            memory = _Memory(device)  # before prepare(): a kept matrix counts as the method's
            projector.prepare()

            def call() -> object:
                grads = vmapped.compute(x0, TIMESTEP, noise).grads
                return projector.project(grads.reshape(-1, p))

        with warnings.catch_warnings():
            # vmap's "no batching rule, falling back to a loop" performance warnings.
            warnings.simplefilter("ignore", UserWarning)
            median, warm, stopped = seconds(call, args.repeats, device, args.max_seconds)
        record["peak_mb"] = memory.extra_mb()
        if median is None:
            took = f"over {warm:.1f} s, stopped" if stopped else f"{warm:.1f} s"
            record["note"] = f"skipped (one call took {took})"
        else:
            record["rows_per_s"] = rows / median
    except Exception as err:  # every failure becomes a row's note
        if not _is_oom(err):
            record["note"] = f"error: {type(err).__name__}: {err}"
        else:
            record["note"] = "out of memory"
            if memory is not None:
                record["peak_mb"] = memory.extra_mb()
    return record


# ------------------------------------------------------------------------------ driver


def _spawn(name: str, method: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run :func:`measure` in a fresh subprocess and return its record."""
    command = [
        sys.executable,
        __file__,
        *("--one", f"{name},{method}", "--batch", str(args.batch)),
        *("--big-batch", str(args.big_batch), "--dim", str(args.dim)),
        *("--repeats", str(args.repeats), "--device", args.device),
        *("--max-seconds", str(args.max_seconds)),
    ]
    if args.threads:
        command += ["--threads", str(args.threads)]
    began = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    print(f"[{name} {METHODS[method]}: {time.perf_counter() - began:.1f} s]", file=sys.stderr)
    lines = done.stdout.strip().splitlines()
    if done.returncode == 0 and lines:
        return json.loads(lines[-1])
    if done.returncode == -signal.SIGKILL:
        note = "out of memory (killed by SIGKILL)"
    else:
        tail = done.stderr.strip().splitlines()
        note = f"failed (exit {done.returncode}): {tail[-1] if tail else 'no output'}"
    return {"model": name, "method": method, "rows_per_s": None, "peak_mb": None, "note": note}


def _cell(value: float | None, spec: str, width: int) -> str:
    return f"{value:{width}{spec}}" if value is not None else f"{'-':>{width}s}"


def _aggregate(rounds: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """One record per method from several rounds: median rate, median of the per-round ratios.

    Each round measures every method once, back to back, so the ratio of a round compares
    measurements taken under the same load; the median over rounds damps a noisy machine.
    """
    records = {}
    for method in rounds[0]:
        record = dict(rounds[0][method])
        rates = [r[method]["rows_per_s"] for r in rounds if r[method]["rows_per_s"] is not None]
        ratios = [
            r[method]["rows_per_s"] / r["train"]["rows_per_s"]
            for r in rounds
            if r[method]["rows_per_s"] is not None
            and r.get("train", {}).get("rows_per_s") is not None
        ]
        peaks = [r[method]["peak_mb"] for r in rounds if r[method]["peak_mb"] is not None]
        record["rows_per_s"] = statistics.median(rates) if rates else None
        record["ratio"] = statistics.median(ratios) if ratios else None
        record["peak_mb"] = max(peaks) if peaks else None
        records[method] = record
    return records


def _model_rows(name: str, records: dict[str, dict[str, Any]]) -> list[str]:
    """The table rows of one model, in METHODS order, with ratios to its train step."""
    lines = []
    for method in METHODS:
        if method not in records:
            continue
        row = records[method]
        rate, ratio = row["rows_per_s"], row["ratio"]
        params = f"{row['params']:,d}" if "params" in row else "-"
        batch = str(row.get("batch", "-"))
        lines.append(
            f"{name:10s} {params:>11s} {batch:>5s} {METHODS[method]:11s} "
            f"{_cell(rate, '.1f', 10)} {_cell(ratio, '.3f', 7)} "
            f"{_cell(row['peak_mb'], '.1f', 13)}  {row['note']}".rstrip()
        )
    return lines


def _model_note(name: str, records: dict[str, dict[str, Any]], dim: int) -> str:
    """The line under the table: parameter memory, the factored k and the vmap k."""
    known = [r for r in records.values() if "params" in r]
    if not known:
        return f"{name}: no measurement finished"
    first = known[0]
    factored = records.get("factored", {}).get("proj_dim")
    vmap = [
        r["proj_dim"] for m, r in records.items() if m in ("dense", "sparse") and "proj_dim" in r
    ]
    parts = [
        f"{name}: {first['params']:,d} parameters = {first['params'] * 4 / 2**20:.1f} MB in "
        f"float32, p = {first['grad_dim']:,d} differentiated",
        f"factored k = {factored if factored is not None else first['proj_dim']} (--dim {dim})",
        f"vmap dense/sparse k = {vmap[0] if vmap else first['proj_dim']}",
    ]
    if factored is not None and vmap and any(k != factored for k in vmap):
        parts.append("WARNING: the factored and vmap k differ")
    excluded = first["excluded"]
    if excluded:
        shown = ", ".join(excluded[:6]) + (", ..." if len(excluded) > 6 else "")
        parts.append(
            f"{len(excluded)} parameters not covered by the factored backend left out of both "
            f"the factored and vmap computers: {shown}"
        )
    return "; ".join(parts)


def _methods(text: str) -> list[str]:
    """``--methods``: keys or labels, in the order they are run (train first, for the ratios)."""
    labels = {label: key for key, label in METHODS.items()}
    wanted = set()
    for item in text.split(","):
        item = item.strip()
        key = labels.get(item, item)
        if key not in METHODS:
            raise SystemExit(f"--methods: unknown {item!r}; choose from {', '.join(METHODS)}")
        wanted.add(key)
    return [m for m in ("train", "factored", "dense", "sparse") if m in wanted]


def main() -> None:
    """Parse the arguments; run every (model, method) in a subprocess and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated models")
    parser.add_argument("--batch", type=int, default=8, help="batch size of unet-tiny")
    parser.add_argument(
        "--big-batch",
        type=int,
        default=None,
        help="batch size of unet-cifar and sd-small (default: 4 on the CPU, else --batch)",
    )
    parser.add_argument("--dim", type=int, default=4096, help="requested projection dim k")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per measurement")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure every method this many times, back to back; report medians",
    )
    parser.add_argument(
        "--methods", default=",".join(METHODS), help="comma-separated: " + ", ".join(METHODS)
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=300.0,
        help="skip a method whose warm-up call takes longer (0: no limit)",
    )
    parser.add_argument("--out", default=None, help="also write the table to this file")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = resolve_device(args.device)
    if args.big_batch is None:
        args.big_batch = 4 if device.type == "cpu" else args.batch
    if args.one:
        name, method = args.one.split(",")
        print(json.dumps(measure(name, method, args)))
        return

    models = [m.strip() for m in args.models.split(",")]
    for name in models:
        if name not in MODELS:
            raise SystemExit(f"--models: unknown {name!r}; choose from {', '.join(MODELS)}")
    methods = _methods(args.methods)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = shlex.join(["benchmarks/bench_factored.py", *sys.argv[1:]])
    lines = [
        f"# .venv/bin/python {command} ({time.strftime('%Y-%m-%d %H:%M')}, {device}, "
        f"{torch.get_num_threads()} threads)",
        f"# loss output at t = {TIMESTEP}, float32; batch {args.batch} (unet-cifar, sd-small: "
        f"{args.big_batch}); median of {args.repeats} calls after one warm-up; "
        f"{args.rounds} round(s), medians over rounds (ratio: of the per-round ratios)",
        f"{'model':10s} {'params':>11s} {'batch':>5s} {'method':11s} {'rows/s':>10s} "
        f"{'ratio':>7s} {'peak extra MB':>13s}  note",
    ]
    for line in lines:
        print(line, flush=True)
    notes = []
    for name in models:
        rounds = [{method: _spawn(name, method, args) for method in methods}]
        rounds += [
            {method: _spawn(name, method, args) for method in methods}
            for _ in range(args.rounds - 1)
        ]
        records = _aggregate(rounds)
        rows = _model_rows(name, records)
        for line in rows:
            print(line, flush=True)
        lines += rows
        notes.append(_model_note(name, records, args.dim))
    for line in notes:
        print(line)
    lines += notes
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(lines) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()

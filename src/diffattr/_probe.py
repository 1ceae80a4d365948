"""Timing and memory probes for the plans (``diffattr plan``): one rule for every estimate.

A probe calls a function once to warm up (allocations, kernel selection, first-call costs),
then ``repeats`` more times, and reports the fastest call and the memory the calls took above
what was in use before the warm-up:

- on CUDA, the allocator's peak (``torch.cuda.max_memory_allocated``) over its level before;
- on the CPU, the process's resident set: its high-water mark (``VmHWM``) after the calls over
  its size (``VmRSS``) before them, the mark first reset through ``/proc/self/clear_refs``
  (Linux). Elsewhere, or where the reset is refused, the memory is not measured (None).

The CPU figure counts what the allocator keeps and the library pages the calls first touch:
what a run in a fresh process pays too. The reset moves the process's peak mark (``VmHWM``,
and with it ``getrusage``'s ``ru_maxrss``): a caller that wants its lifetime peak reads it
before probing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass(frozen=True)
class Probe:
    """What :func:`measure` measured.

    Attributes:
        seconds: The fastest of the timed calls.
        peak_bytes: Memory the calls took above the level before them (see the module
            docstring), or None where it cannot be measured.
    """

    seconds: float
    peak_bytes: int | None


def measure(fn: Callable[[], Any], repeats: int, device: torch.device) -> Probe:
    """Warm ``fn`` up, time ``repeats`` calls (at least one), and measure their peak memory."""
    began_bytes = _begin_memory(device)
    fn()
    best = float("inf")
    for _ in range(max(1, repeats)):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        began = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - began)
    return Probe(best, _peak_memory(device, began_bytes))


def _begin_memory(device: torch.device) -> int | None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
    try:
        _CLEAR_REFS.write_text("5")  # resets VmHWM to the current VmRSS
        return _status_kb("VmRSS") * 1024
    except (OSError, ValueError):
        return None


def _peak_memory(device: torch.device, began: int | None) -> int | None:
    if began is None:
        return None
    if device.type == "cuda":
        return max(0, torch.cuda.max_memory_allocated(device) - began)
    try:
        return max(0, _status_kb("VmHWM") * 1024 - began)
    except (OSError, ValueError):
        return None


def _status_kb(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise ValueError(f"{_STATUS} has no {field}")

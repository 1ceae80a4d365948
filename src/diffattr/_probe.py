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


class PeakMemory:
    """Memory taken since construction (the module docstring's rule), for a probe or a region.

    Args:
        device: Where the memory is counted.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base = self._begin()

    def extra_bytes(self) -> int | None:
        """The peak since construction over the level then, or None where not measurable."""
        if self.base is None:
            return None
        if self.device.type == "cuda":
            return max(0, torch.cuda.max_memory_allocated(self.device) - self.base)
        try:
            return max(0, _status_kb("VmHWM") * 1024 - self.base)
        except (OSError, ValueError):
            return None

    def _begin(self) -> int | None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return torch.cuda.memory_allocated(self.device)
        if self.device.type != "cpu":
            return None
        try:
            _CLEAR_REFS.write_text("5")  # resets VmHWM to the current VmRSS
            return _status_kb("VmRSS") * 1024
        except (OSError, ValueError):
            return None


def measure(fn: Callable[[], Any], repeats: int, device: torch.device) -> Probe:
    """Warm ``fn`` up, time ``repeats`` calls (at least one), and measure their peak memory."""
    memory = PeakMemory(device)
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
    return Probe(best, memory.extra_bytes())


def _status_kb(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise ValueError(f"{_STATUS} has no {field}")

"""The probe every plan times and measures with."""

from pathlib import Path

import pytest
import torch

from diffattr._probe import measure

LINUX_RSS = Path("/proc/self/clear_refs").exists()


def test_fastest_of_the_timed_calls_after_a_warm_up():
    calls = []
    result = measure(lambda: calls.append(1), repeats=3, device=torch.device("cpu"))
    assert len(calls) == 4  # one warm-up, three timed
    assert 0 <= result.seconds < 1


@pytest.mark.skipif(not LINUX_RSS, reason="the CPU's peak is read from /proc (Linux)")
def test_cpu_peak_counts_what_the_calls_touch_and_not_what_was_there():
    held = torch.ones(32 << 20, dtype=torch.uint8)  # 32 MB in use before: not counted

    def allocate() -> None:
        torch.ones(64 << 20, dtype=torch.uint8)  # 64 MB, touched, then freed

    peak = measure(allocate, repeats=1, device=torch.device("cpu")).peak_bytes
    if peak is None:
        pytest.skip("this process may not reset its resident set's high-water mark")
    assert 60 << 20 <= peak < 96 << 20
    idle = measure(lambda: None, repeats=1, device=torch.device("cpu")).peak_bytes
    assert idle is not None
    assert idle < 16 << 20
    del held


def test_memory_is_not_measured_where_there_is_no_way_to():
    assert measure(lambda: None, repeats=1, device=torch.device("meta")).peak_bytes is None

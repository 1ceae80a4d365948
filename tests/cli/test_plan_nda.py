"""``diffattr plan --method nda``: NDA's memory and time from a probe, no model needed."""

from __future__ import annotations

import json

import pytest

from diffattr.cli import main

ARGV = ["plan", "--method", "nda", "--n-train", "300", "--n-queries", "7", "--device", "cpu"]


def test_plan_nda_prints_memory_and_time_per_query(capsys: pytest.CaptureFixture[str]) -> None:
    argv = [*ARGV, "--image-size", "8", "--channels", "3", "--top-k", "20"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("nda: 7 queries x 300 training images of 3x8x8, top-K 20, 5 timesteps")
    for line in ("keys (one timestep)", "score tables (a batch)", "sum (upper bound)", "total"):
        assert line in out
    assert "per query: " in out
    assert "against 300 random training images" in out  # a small N is probed whole


def test_plan_nda_json_follows_the_settings(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*ARGV, "--image-size", "6", "--json"]) == 0
    base = json.loads(capsys.readouterr().out)
    assert base["n_train"] == 300
    assert base["n_queries"] == 7
    assert base["image_shape"] == [1, 6, 6]
    assert base["seconds"]["queries"] == pytest.approx(7 * base["seconds_per_query"])
    assert base["peak_memory_bytes"] == sum(base["memory_bytes"].values())
    # Per query row of a batch: the float32 (P, N) log-sum tables, then float64 shares.
    tables = base["memory_bytes"]["score tables (a batch)"]
    assert tables == base["batch"] * 36 * 300 * (4 + 8)
    assert main([*ARGV, "--image-size", "6", "--json", "--dtype", "float64"]) == 0
    double = json.loads(capsys.readouterr().out)
    assert double["memory_bytes"]["score tables (a batch)"] == double["batch"] * 36 * 300 * 16
    assert double["memory_bytes"]["training images"] == 2 * base["memory_bytes"]["training images"]


def test_plan_nda_rejects_a_bad_setting(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*ARGV, "--patch-size", "2"]) == 1
    assert "NDAConfig.patch_size=2" in capsys.readouterr().err

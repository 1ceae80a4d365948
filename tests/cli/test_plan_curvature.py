"""``diffattr plan --method curvature``: the K-FAC / EK-FAC stage's memory, disk and time."""

from __future__ import annotations

import json

import pytest

from diffattr.cli import main
from diffattr.features._curvature_plan import curvature_layer_bytes

ARGV = ["plan", "--method", "curvature", "--model", "mlp-tiny", "--image-size", "4"]
ARGV += ["--n-train", "40", "--timesteps", "2", "--batch-size", "4", "--device", "cpu"]


def test_plan_curvature_prints_memory_disk_and_time(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(ARGV) == 0
    out = capsys.readouterr().out
    assert out.startswith("curvature stage of mlp-tiny: ")
    assert "40 images x 2 timesteps x 1 output directions, batch 4" in out
    for line in ("factor_pass", "decomposition", "eigen_pass", "peak", "curvature.safetensors"):
        assert line in out
    for line in ("factors", "eigendecompositions", "eigenvalues", "total", "probe: "):
        assert line in out


def test_plan_curvature_json_follows_the_settings(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*ARGV, "--json", "--fisher", "exact"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["directions"] == 16  # the exact Fisher: every output value of a 1x4x4 image
    assert plan["n_images"] == 40
    assert plan["disk_bytes"] == plan["rest"] * 8 + sum(
        sum(curvature_layer_bytes(layer["d_out"], layer["d_in"]).values())
        for layer in plan["layers"]
    )
    assert plan["peak_memory_bytes"] == max(plan["memory_bytes"].values())

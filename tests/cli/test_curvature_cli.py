"""``diffattr attribute --method kfac|ekfac`` and ``--method das --curvature ekfac``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from diffattr.cli import main
from diffattr.methods import Scores

from .test_cli import TRAIN_ARGS, _expect_error, _write_npz

FAST = ["--timesteps", "1", "--proj-dim", "64", "--quiet", "--device", "cpu"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("curvature-cli")
    data = _write_npz(root / "toy.npz", n=24)
    assert main(["train", "--data", str(data), "--out", str(root / "ckpt"), *TRAIN_ARGS]) == 0
    return root / "ckpt"


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("ekfac", []),
        ("kfac", ["--route", "projected", "--damping", "0.1"]),
        ("das", ["--curvature", "ekfac", "--route", "projected"]),
    ],
)
def test_attribute_with_curvature(checkpoint: Path, method: str, options: list[str]) -> None:
    out = checkpoint.parent / f"attr-{method}"
    argv = ["attribute", str(checkpoint), "--out", str(out), "--method", method, *options, *FAST]
    assert main(argv) == 0
    scores = Scores.load(out / "scores" / method)
    assert scores.values.shape == (2, 22)
    assert np.isfinite(scores.values).all()
    record = scores.settings["preconditioner"][0]
    assert record["kind"] == ("kfac" if method == "kfac" else "ekfac")
    assert record["lambda"] == pytest.approx(record["damping"] * record["mean_eigenvalue"])
    assert len(list((out / "curvature").glob("*/*/curvature.safetensors"))) == 1
    # A rerun loads the curvature and the stores, and gives the same scores.
    assert main(argv) == 0
    np.testing.assert_array_equal(Scores.load(out / "scores" / method).values, scores.values)


def test_curvature_option_is_das_only(checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["attribute", str(checkpoint), "--out", str(checkpoint.parent / "bad")]
    _expect_error(
        capsys,
        [*argv, "--method", "ekfac", "--curvature", "kfac", *FAST],
        "--curvature does not apply",
    )

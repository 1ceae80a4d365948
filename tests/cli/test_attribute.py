from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffattr.cli import build_parser, main
from diffattr.methods import Scores

from .test_cli import TRAIN_ARGS, _expect_error, _write_npz

FAST = ["--timesteps", "1", "--proj-dim", "16", "--quiet", "--device", "cpu"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("attribute")
    data = _write_npz(root / "toy.npz", n=24)
    argv = ["train", "--data", str(data), "--out", str(root / "ckpt"), *TRAIN_ARGS]
    argv[argv.index("--checkpoint-every") + 1] = "1"
    assert main([*argv, "--snapshots"]) == 0
    return root


@pytest.mark.parametrize("method", ["das", "trak", "dtrak", "grad-cos"])
def test_attribute_scores_the_held_out_split(
    run: Path, method: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = run / f"attr-{method}"
    argv = ["attribute", str(run / "ckpt"), "--out", str(out), "--method", method, *FAST]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert f"{method}: 2 queries x 22 training images, 1 checkpoint(s)" in stdout
    assert stdout.count("query ") == 2
    scores = Scores.load(out / "scores" / method)
    assert scores.values.shape == (2, 22)
    assert scores.method == method
    # A rerun resumes the finished stores and gives the same scores.
    assert main(argv) == 0
    np.testing.assert_array_equal(Scores.load(out / "scores" / method).values, scores.values)


def test_backend_default_and_choice(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["attribute", str(run / "ckpt"), "--method", "das", *FAST]
    assert main([*base, "--out", str(run / "attr-auto")]) == 0
    assert "1 checkpoint(s), 1 timesteps, k=16 (factored backend)" in capsys.readouterr().out
    features = Scores.load(run / "attr-auto" / "scores" / "das").settings["features"]
    assert (features["backend"], features["projection"]["kind"]) == ("factored", "kronecker")
    assert main([*base, "--out", str(run / "attr-vmap"), "--backend", "vmap"]) == 0
    features = Scores.load(run / "attr-vmap" / "scores" / "das").settings["features"]
    assert (features["backend"], features["projection"]["kind"]) == ("vmap", "dense")
    _expect_error(
        capsys,
        [*base, "--out", str(run / "bad"), "--backend", "factored", "--projection", "sparse"],
        "--projection sparse needs --backend vmap",
    )


def test_tracin_sums_over_training_snapshots(run: Path) -> None:
    snapshots = sorted(str(p) for p in (run / "ckpt" / "snapshots").iterdir())
    assert len(snapshots) == 3
    out = run / "attr-tracin"
    argv = ["attribute", *snapshots, "--out", str(out), "--method", "tracin", *FAST]
    assert main(argv) == 0
    scores = Scores.load(out / "scores" / "tracin")
    assert len(scores.settings["checkpoints"]) == 3
    assert len(scores.settings["config"]["learning_rates"]) == 3


def test_attribute_rejects_bad_input(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["attribute", str(run / "ckpt"), "--out", str(run / "bad"), *FAST]
    _expect_error(
        capsys,
        [*base, "--method", "trak", "--residual", "rms"],
        "--residual",
        "does not apply to trak",
    )
    _expect_error(capsys, [*base, "--queries", str(run / "missing.npz")], "missing.npz")
    _expect_error(capsys, [*base, "--proj-dim", "10000000"], "exceeds the number of parameters")
    _expect_error(capsys, [*base, "--parameters", "nothing*"], "nothing*")
    wrong_size = _write_npz(run / "big.npz", n=3, size=16)
    _expect_error(capsys, [*base, "--queries", str(wrong_size)], "(1, 16, 16) differ")
    with pytest.raises(SystemExit) as info:
        main([*base, "--method", "nope"])
    assert info.value.code == 2


def test_info_describes_stores_and_scores(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = run / "attr-info"
    argv = ["attribute", str(run / "ckpt"), "--out", str(out), "--method", "trak", *FAST]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(["info", str(out / "scores" / "trak")]) == 0
    text = capsys.readouterr().out
    assert '"method": "trak"' in text
    assert '"shape": [\n    2,\n    22\n  ]' in text
    store = next((out / "features").glob("*/*/train-*"))
    assert main(["info", str(store)]) == 0
    text = capsys.readouterr().out
    assert '"complete": true' in text
    assert '"n": 22' in text


@pytest.mark.parametrize("method", ["nda", "pixel-cos"])
def test_model_free_methods_need_no_gradients(
    run: Path, method: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = run / f"attr-{method}"
    argv = ["attribute", str(run / "ckpt"), "--out", str(out), "--method", method, "--quiet"]
    if method == "nda":
        argv += ["--nda-timesteps", "50,150", "--patch-size", "1", "--top-k", "none"]
        argv += ["--heatmaps", "1"]
    assert main(argv) == 0
    assert f"{method}: 2 queries x 22 training images" in capsys.readouterr().out
    scores = Scores.load(out / "scores" / method)
    assert scores.values.shape == (2, 22)
    if method == "nda":
        assert scores.settings["timesteps"] == [50, 150]
        assert scores.settings["top_k"] is None
        # top_k None: each query patch's weights sum to one over all training positions.
        np.testing.assert_allclose(scores.values.sum(axis=1), 64.0, rtol=1e-4)
        query_id = int(scores.query_ids[0])
        best = int(scores.top_k(query_id, 1)[0][0])
        for side in ("query", "train"):
            png = out / "heatmaps" / f"query-{query_id}-train-{best}-{side}.png"
            assert Image.open(png).size == (64, 64)


def test_model_free_methods_reject_gradient_options(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["attribute", str(run / "ckpt"), "--out", str(run / "bad"), "--quiet"]
    _expect_error(
        capsys, [*base, "--method", "nda", "--damping", "1"], "--damping does not apply to nda"
    )
    _expect_error(
        capsys,
        [*base, "--method", "pixel-cos", "--patch-size", "3"],
        "--patch-size does not apply to pixel-cos",
    )


def test_mixed_precision_option(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = run / "attr-bf16"
    argv = ["attribute", str(run / "ckpt"), "--out", str(out), "--method", "das", *FAST]
    assert main([*argv, "--mixed-precision", "bf16"]) == 0
    scores = Scores.load(out / "scores" / "das")
    assert scores.settings["features"]["mixed_precision"] == "bf16"
    capsys.readouterr()
    _expect_error(capsys, [*argv, "--mixed-precision", "tf32"], "CUDA matmul mode")


def test_feature_options_default_to_the_library_defaults() -> None:
    from diffattr.cli._options import FEATURE_OPTIONS, features_from_args
    from diffattr.features import FeatureConfig

    args = build_parser().parse_args(["attribute", "m", "--out", "x"])
    assert features_from_args(args) == FeatureConfig()
    default = FeatureConfig()
    for flag, path in FEATURE_OPTIONS.items():
        value: object = default
        for name in path:
            value = getattr(value, name)
        assert getattr(args, flag.replace("-", "_")) == value, flag


def test_feature_options_set_their_fields() -> None:
    from diffattr.cli._options import features_from_args
    from diffattr.features import FeatureConfig, PlanConfig, ProjectionConfig

    argv = ["attribute", "m", "--out", "x", "--timesteps", "3", "--noise", "per_sample"]
    argv += ["--proj-dim", "64", "--backend", "vmap", "--max-memory-mb", "16"]
    argv += ["--precision", "float64", "--parameters", "*.weight"]
    features = features_from_args(build_parser().parse_args(argv))
    assert features == FeatureConfig(
        plan=PlanConfig(num_steps=3, noise="per_sample"),
        projection=ProjectionConfig(kind="dense", dim=64, max_memory_mb=16),
        backend="vmap",
        dtype="float64",
        parameters=("*.weight",),
    )


def test_a_rerun_with_new_queries_scores_them_against_the_saved_fit(
    run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from diffattr.methods import DAS

    out = run / "index"
    argv = ["attribute", str(run / "ckpt"), "--out", str(out), *FAST]
    assert main([*argv, "--queries", str(run / "toy.npz"), "--n-queries", "3"]) == 0
    trains = sorted(out.glob("features/*/*/train-*"))
    assert len(trains) == 1

    def refit(*args: object) -> None:
        raise AssertionError("the rerun fitted DAS again")

    monkeypatch.setattr(DAS, "_fit_one", refit)
    assert main([*argv, "--queries", str(run / "toy.npz"), "--n-queries", "5"]) == 0
    assert sorted(out.glob("features/*/*/train-*")) == trains
    assert len(list(out.glob("features/*/*/query-*"))) == 2
    assert Scores.load(out / "scores" / "das").values.shape == (5, 22)

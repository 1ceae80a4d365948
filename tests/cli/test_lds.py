from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from diffattr.cli import main
from diffattr.evaluation import LDSBenchmark
from diffattr.methods import Scores

from .test_cli import TRAIN_ARGS, _expect_error, _write_npz

SETUP = ["--num-subsets", "3", "--model-seeds", "2", "--n-heldout", "3", "--n-generated", "2"]
SETUP += ["--truth-timesteps", "4", "--quiet", "--device", "cpu"]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lds-cli")
    data = _write_npz(root / "toy.npz", n=30)
    argv = ["train", "--data", str(data), "--out", str(root / "base"), *TRAIN_ARGS]
    argv += ["--query-fraction", "0.2"]
    assert main(argv) == 0
    return root


def test_build_in_shards_then_score(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bench = str(root / "bench")
    assert main(["lds", "init", bench, "--base", str(root / "base"), *SETUP]) == 0
    assert "3 subsets of 0.5 x 24 training images, 2 seed(s) each" in capsys.readouterr().out
    assert main(["lds", "build", bench, "--shard", "0/2", "--quiet", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "shard 0/2: trained 3 model(s)" in out
    assert "benchmark: 3/6 measured" in out
    assert main(["lds", "status", bench]) == 0
    assert "3/6 subset models measured" in capsys.readouterr().out
    _expect_error(capsys, ["lds", "merge", bench], "3 of 6 subset models are not measured")
    assert main(["lds", "build", bench, "--shard", "1/2", "--quiet", "--device", "cpu"]) == 0
    assert "ground truth:" in capsys.readouterr().out
    benchmark = LDSBenchmark.open(bench)
    for name, queries in benchmark.queries.items():
        values = np.random.default_rng(0).normal(size=(len(queries), len(benchmark.train_ids)))
        Scores(values, queries.ids, benchmark.train_ids, f"rand-{name}").save(root / name)
    result_file = root / "lds.json"
    argv = ["lds", "score", bench, str(root / "heldout"), str(root / "generated")]
    assert main([*argv, "--bootstrap", "20", "--out", str(result_file)]) == 0
    table = capsys.readouterr().out
    assert "rand-heldout   heldout" in table
    assert "rand-generated generated" in table
    results = json.loads(result_file.read_text())["results"]
    assert [r["query_set"] for r in results] == ["heldout", "generated"]
    assert results[0]["ceiling_basis"] == "model seeds"


def test_bad_lds_input_gets_a_clear_error(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _expect_error(capsys, ["lds", "status", str(root)], "not an LDS benchmark")
    _expect_error(capsys, ["lds", "build", str(root / "none"), "--quiet"], "not an LDS benchmark")
    with pytest.raises(SystemExit):
        main(["lds", "build", str(root / "bench"), "--shard", "2/2"])
    assert "need n >= 1 and 0 <= i < n" in capsys.readouterr().err
    bench = root / "bench-bad"
    argv = ["lds", "init", str(bench), "--base", str(root / "base"), *SETUP]
    _expect_error(capsys, [*argv, "--n-heldout", "99"], "holds out 6 images, fewer than")


def test_counterfactual_command(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    samples = root / "samples"
    argv = ["sample", str(root / "base"), "--out", str(samples), "--n", "2"]
    assert main([*argv, "--sampler", "ddim", "--steps", "3", "--quiet", "--device", "cpu"]) == 0
    attr = root / "attr"
    argv = ["attribute", str(root / "base"), "--out", str(attr), "--method", "pixel-cos"]
    assert main([*argv, "--queries", str(samples), "--quiet", "--device", "cpu"]) == 0
    capsys.readouterr()
    out = root / "cf"
    argv = ["counterfactual", str(root / "base"), "--queries", str(samples), "--out", str(out)]
    argv += ["--scores", str(attr / "scores" / "pixel-cos"), "--k", "2", "--n-queries", "1"]
    argv += ["--sampler", "ddim", "--sampling-steps", "3", "--quiet", "--device", "cpu"]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert "pixel-cos" in stdout
    assert "random-0" in stdout
    assert "no feature map (unlabelled data)" in stdout
    assert "control (nothing removed): pixel RMS 0.00e+00" in stdout
    assert (out / "counterfactual.png").is_file()
    argv[argv.index("ddim")] = "ddpm"
    _expect_error(capsys, argv, "not what", "pass the sampler used")

"""Outputs that cannot be written, bad counts, closed pipes and two writers of one output.

Each is refused with a one-line message and exit status 1 (2 for a bad option) before any work
is done, never with a traceback after it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from diffattr._io import LOCK_FILE, output_lock
from diffattr.cli import _attribute, _demo, _lds, _sample, _train, main
from diffattr.errors import OutputError
from diffattr.evaluation import LDSBenchmark
from diffattr.report import _report

TRAIN_ARGS = [
    "--model", "mlp-tiny", "--steps", "3", "--warmup-steps", "1", "--batch-size", "16",
    "--checkpoint-every", "0", "--quiet", "--device", "cpu",
]  # fmt: skip
FEATURE_ARGS = ["--timesteps", "1", "--proj-dim", "16", "--quiet", "--device", "cpu"]


def _expect_error(capsys: pytest.CaptureFixture[str], argv: list[str], *fragments: str) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("diffattr: error: ")
    assert err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err
    return err


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("outputs")


@pytest.fixture(scope="module")
def checkpoint(workdir: Path) -> Path:
    out = workdir / "ckpt"
    assert (
        main(["train", "--data", "digits", "--labels", "0,1", "--out", str(out), *TRAIN_ARGS]) == 0
    )
    return out


@pytest.fixture(scope="module")
def samples(workdir: Path, checkpoint: Path) -> Path:
    out = workdir / "samples"
    argv = ["sample", str(checkpoint), "--n", "3", "--steps", "2", "--sampler", "ddim"]
    assert main([*argv, "--out", str(out), "--quiet", "--device", "cpu"]) == 0
    return out


def _work_ran(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("the work ran although the output cannot be written")


def _argv(command: str, checkpoint: Path, samples: Path, out: Path) -> list[str]:
    """A command writing to ``out``."""
    return {
        "train": ["train", "--out", str(out), *TRAIN_ARGS],
        "train-vae": ["train-vae", "--out", str(out), "--steps", "2", "--quiet"],
        "sample": ["sample", str(checkpoint), "--out", str(out), "--n", "2", "--quiet"],
        "attribute": ["attribute", str(checkpoint), "--out", str(out), *FEATURE_ARGS],
        "nda": ["attribute", str(checkpoint), "--method", "nda", "--out", str(out), "--quiet"],
        "demo": ["demo", "--out", str(out), "--steps", "2", "--quiet"],
        "counterfactual": [
            "counterfactual", str(checkpoint), "--queries", str(samples), "--scores",
            str(samples), "--out", str(out), "--quiet",
        ],
        "lds init": ["lds", "init", str(out), "--base", str(checkpoint)],
        "report": ["report", str(samples), "--out", str(out)],
        "lds score": ["lds", "score", str(samples), str(samples), "--out", str(out)],
    }[command]  # fmt: skip


#: What each command would spend its time on; it must not be reached.
WORK: dict[str, tuple[Any, str]] = {
    "train": (_train, "train_model"),
    "train-vae": (_train, "train_autoencoder"),
    "sample": (_sample, "sample_checkpoint"),
    "attribute": (_attribute, "Attribution"),
    "nda": (_attribute, "Attribution"),
    "demo": (_demo, "train_model"),
    "counterfactual": (_lds, "counterfactual"),
    "lds init": (LDSBenchmark, "create"),
    "report": (_report, "load_run"),
    "lds score": (_lds, "lds_score"),
}
DIRECTORY_OUTPUTS = [c for c in WORK if c not in ("report", "lds score")]


@pytest.fixture
def sabotage(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    def prevent(command: str) -> None:
        owner, name = WORK[command]
        monkeypatch.setattr(owner, name, _work_ran)

    return prevent


@pytest.mark.parametrize("command", DIRECTORY_OUTPUTS)
def test_a_file_as_out_is_refused_before_the_work(
    command: str,
    checkpoint: Path,
    samples: Path,
    tmp_path: Path,
    sabotage: Callable[[str], None],
    capsys: pytest.CaptureFixture[str],
) -> None:
    sabotage(command)
    taken = tmp_path / "taken"
    taken.write_text("not a directory")
    argv = _argv(command, checkpoint, samples, taken)
    _expect_error(capsys, argv, f"{taken} exists and is not a directory")
    below = taken / "run"
    argv = _argv(command, checkpoint, samples, below)
    _expect_error(capsys, argv, f"{below} cannot be created: {taken} is not a directory")


@pytest.mark.parametrize("command", ["report", "lds score"])
def test_a_directory_as_an_output_file_is_refused_before_the_work(
    command: str,
    checkpoint: Path,
    samples: Path,
    tmp_path: Path,
    sabotage: Callable[[str], None],
    capsys: pytest.CaptureFixture[str],
) -> None:
    sabotage(command)
    folder = tmp_path / "x.html"
    folder.mkdir()
    argv = _argv(command, checkpoint, samples, folder)
    _expect_error(capsys, argv, f"{folder} is a directory; give a file name")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
@pytest.mark.parametrize("command", ["train", "sample", "attribute", "lds init", "report"])
def test_a_read_only_directory_is_refused_before_the_work(
    command: str,
    checkpoint: Path,
    samples: Path,
    tmp_path: Path,
    sabotage: Callable[[str], None],
    capsys: pytest.CaptureFixture[str],
) -> None:
    sabotage(command)
    locked = tmp_path / "read-only"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        out = locked / ("r.html" if command == "report" else "run")
        argv = _argv(command, checkpoint, samples, out)
        _expect_error(capsys, argv, str(out), "Permission denied")
    finally:
        locked.chmod(0o755)


def test_an_os_error_during_the_work_is_one_line_naming_the_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def full(*args: Any, **kwargs: Any) -> Any:
        raise OSError(28, "No space left on device", str(tmp_path / "m" / "weights.safetensors"))

    monkeypatch.setattr(_train, "train_model", full)
    argv = ["train", "--out", str(tmp_path / "m"), *TRAIN_ARGS]
    err = _expect_error(capsys, argv)
    assert (
        err
        == f"diffattr: error: {tmp_path / 'm' / 'weights.safetensors'}: No space left on device\n"
    )
    with pytest.raises(OSError, match="No space"):
        main(["--debug", *argv])


@pytest.mark.parametrize(
    "argv",
    [
        ["attribute", "m", "--out", "o", "--n-queries", "-3"],
        ["attribute", "m", "--out", "o", "--n-queries", "0"],
        ["attribute", "m", "--out", "o", "--show", "-1"],
        ["attribute", "m", "--out", "o", "--show-top", "0"],
        ["attribute", "m", "--out", "o", "--method", "nda", "--heatmaps", "-1"],
        ["counterfactual", "m", "--queries", "q", "--scores", "s", "--out", "o",
         "--n-queries", "-3"],
        ["train", "--data", "missing.npz", "--out", "o", "--until", "0"],
        ["sample", "m", "--out", "o", "--n", "-3"],
        ["demo", "--out", "o", "--device", "none", "--n-samples", "0"],
        ["lds", "build", "b", "--max-models", "-1"],
        ["lds", "score", "b", "s", "--bootstrap", "-5"],
    ],
    ids=lambda argv: " ".join(argv[-2:]),
)  # fmt: skip
def test_negative_or_zero_counts_are_usage_errors(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    # Refused while parsing; the paths do not exist, so nothing would run before the fix either.
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "expected an integer >= " in capsys.readouterr().err


def test_n_queries_scores_the_first_n(
    checkpoint: Path, samples: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["attribute", str(checkpoint), "--queries", str(samples), "--n-queries", "2"]
    assert main([*argv, "--out", str(tmp_path / "a"), *FEATURE_ARGS]) == 0
    assert "das: 2 queries x" in capsys.readouterr().out


def test_layout_option_loads_an_ambiguous_npz(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # (N, 3, 8, 3): three channels first or last; only the user knows which.
    images = np.random.default_rng(0).integers(0, 256, (40, 3, 8, 3), dtype=np.uint8)
    data = tmp_path / "ambiguous.npz"
    np.savez(data, images=images)
    argv = ["train", "--data", str(data), "--out", str(tmp_path / "m"), "--size", "8", *TRAIN_ARGS]
    _expect_error(capsys, argv, "--layout NCHW or --layout NHWC")
    assert main([*argv, "--layout", "NHWC"]) == 0
    assert "on ambiguous (36 training images" in capsys.readouterr().out


def _diffattr() -> list[str]:
    script = Path(sys.executable).with_name("diffattr")
    return [str(script)] if script.exists() else [sys.executable, "-m", "diffattr"]


def test_a_reader_that_goes_away_ends_the_output_quietly() -> None:
    # `diffattr info digits | head -3`, with the reader gone before the first line is written.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [*_diffattr(), "info", "digits"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    assert process.stdout is not None
    assert process.stderr is not None
    process.stdout.close()
    err = process.stderr.read()
    assert process.wait(timeout=300) == 1
    assert err == ""


@pytest.mark.parametrize("command", ["train", "sample", "attribute", "counterfactual"])
def test_a_second_writer_is_refused_naming_the_holder(
    command: str,
    checkpoint: Path,
    samples: Path,
    tmp_path: Path,
    sabotage: Callable[[str], None],
    capsys: pytest.CaptureFixture[str],
) -> None:
    sabotage(command)
    out = tmp_path / "busy"
    argv = _argv(command, checkpoint, samples, out)
    with output_lock(out):
        err = _expect_error(capsys, argv, f"{out} is being written by another diffattr process")
    assert f"pid {os.getpid()} on " in err
    assert Path(sys.argv[0]).name in err  # the holder's command


def _holder(directory: Path) -> subprocess.Popen[str]:
    """Another process that holds ``directory``'s lock until its stdin closes."""
    code = (
        "import sys\nfrom diffattr._io import output_lock\n"
        f"with output_lock({str(directory)!r}):\n"
        "    print('locked', flush=True)\n    sys.stdin.read()\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    assert process.stdout.readline() == "locked\n"
    return process


def test_the_lock_is_released_when_its_holder_exits_or_is_killed(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "s"
    argv = ["sample", str(checkpoint), "--out", str(out), "--n", "2", "--steps", "2"]
    argv += ["--sampler", "ddim", "--quiet", "--device", "cpu"]
    holder = _holder(out)
    _expect_error(capsys, argv, f"(pid {holder.pid} on ")
    holder.communicate("")  # closes its stdin: it leaves the block and exits
    assert main(argv) == 0
    assert (out / "samples.npz").is_file()
    # kill -9 leaves the lock file and its record, but the kernel has dropped the lock.
    killed = _holder(out)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=60)
    assert str(killed.pid) in (out / LOCK_FILE).read_text()
    assert main(argv) == 0
    assert not (out / LOCK_FILE).exists()  # removed by the process that took it over


def test_output_lock_creates_the_directory_and_leaves_no_trace_of_itself(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with (
        pytest.raises(OutputError, match="exists and is not a directory"),
        output_lock(tmp_path / "file"),
    ):
        pass
    with output_lock(tmp_path / "new" / "run") as directory:
        assert directory.is_dir()
        with pytest.raises(OutputError, match=f"pid {os.getpid()}"), output_lock(directory):
            pass
        (directory / "result").write_text("kept")
    assert [p.name for p in directory.iterdir()] == ["result"]
    with output_lock(directory):
        pass  # released when the block ended
    # A command that fails before writing leaves no folders behind, not even the parents.
    with pytest.raises(RuntimeError), output_lock(tmp_path / "a" / "b"):
        raise RuntimeError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "new"]

"""LDS in the LoRA setting: subsets of the fine-tuning set, each fine-tuned from one base."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from diffattr.data import load_digits, split_dataset
from diffattr.errors import CheckpointError
from diffattr.evaluation import LDSBenchmark, LDSConfig
from diffattr.models import LoRAConfig, TrainConfig, load_checkpoint, train
from tests.models.helpers import cunet_spec

CONFIG = LDSConfig(
    num_subsets=3, model_seeds=1, n_heldout=3, n_generated=2, truth_timesteps=4, guidance_scale=2.0
)


@pytest.fixture(scope="module")
def lora_base(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("lora-lds")
    digits = load_digits(prompts="a handwritten {label}")
    recipe = TrainConfig(steps=4, batch_size=8, checkpoint_every=0)
    pretrained = train(
        cunet_spec(), digits.select(digits.ids[:24]), recipe, root / "pretrained", progress=False
    )
    later = digits.select(digits.ids[100:124])
    split = split_dataset(later, query_fraction=0.25, seed=0)
    spec = pretrained.model_spec.with_lora(LoRAConfig(rank=2))
    base = train(
        spec, split.train, recipe, root / "lora", split=split, init=pretrained, progress=False
    )
    return root, pretrained, base


@pytest.fixture(scope="module")
def bench(lora_base) -> LDSBenchmark:
    root, _, base = lora_base
    return LDSBenchmark.create(root / "bench", base, CONFIG, progress=False)


def test_subset_models_fine_tune_the_copied_pretrained_model(lora_base, bench) -> None:
    _, pretrained, base = lora_base
    assert bench.init is not None
    assert bench.init.weights_id() == pretrained.weights_id()
    # The queries carry their prompts: held-out ones from the split, generated ones in turn.
    assert bench.queries["heldout"].prompts is not None
    generated = bench.queries["generated"].prompts
    assert generated == tuple(sorted(set(base.training_data().prompts)))[: len(generated)]
    report = bench.build(keep_models=True, progress=False)
    assert len(report.trained) == CONFIG.num_subsets
    unit = bench.units[0]
    model = load_checkpoint(bench.path / "models" / unit.name)
    assert model.metadata["init"]["weights"] == pretrained.weights_id()
    assert model.model_spec == base.model_spec
    truth = np.load(bench.merge())
    assert truth["heldout"].shape == (3, 1, CONFIG.truth_noise_draws, 3)
    assert np.isfinite(truth["generated"]).all()
    # Subsets differ by their data only, so the measured losses differ between subsets.
    assert np.ptp(truth["heldout"][:, 0, 0, 0]) > 0


def test_a_changed_pretrained_model_is_refused(bench, tmp_path) -> None:
    copy = tmp_path / "bench"
    shutil.copytree(bench.path, copy)
    init = load_checkpoint(copy / "init")
    weights = copy / "init" / init.files["ema"]
    weights.write_bytes(weights.read_bytes()[:-8] + bytes(8))
    with pytest.raises(CheckpointError, match="do not match the SHA-256"):
        LDSBenchmark.open(copy)

"""A tiny trained base model on real digits, for the evaluation tests."""

from __future__ import annotations

from pathlib import Path

from diffattr.data import load_digits, split_dataset
from diffattr.models import Checkpoint, TrainConfig, model_spec, train


def tiny_base(path: Path, n_train: int, steps: int, checkpoint_every: int = 0) -> Checkpoint:
    """mlp-tiny trained for ``steps`` steps of 8 on ``n_train`` digits of a 50/50 split."""
    split = split_dataset(load_digits(), query_fraction=0.5, seed=0)
    train_set = split.train.select(split.train.ids[:n_train])
    spec = model_spec("mlp-tiny", in_channels=1, sample_size=8)
    config = TrainConfig(steps=steps, batch_size=8, seed=0, checkpoint_every=checkpoint_every)
    return train(spec, train_set, config, path, split=split, progress=False)

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from diffattr.data import DatasetSplit, load_digits, split_dataset
from diffattr.models import Checkpoint, train

from .helpers import tiny_config, unet_spec

# Two cores shared with other work: intra-op threads only add contention for these tiny models.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits_split() -> DatasetSplit:
    """64 digits: 56 to train on (3 batches of 16 per epoch), 8 held out."""
    return split_dataset(load_digits().select(np.arange(64)), n_query=8, seed=0)


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory, digits_split: DatasetSplit) -> Checkpoint:
    """A tiny UNet trained 4 steps, with EMA; read-only: copy it before changing files."""
    out: Path = tmp_path_factory.mktemp("trained") / "ckpt"
    return train(
        unet_spec(),
        digits_split.train,
        tiny_config(steps=4, checkpoint_every=0, seed=5),
        out,
        split=digits_split,
        progress=False,
    )

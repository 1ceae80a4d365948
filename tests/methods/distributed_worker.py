"""Run by tests/methods/test_distributed.py under torchrun: attribute with every rank taking part.

    python -m torch.distributed.run --standalone --nproc-per-node 2 distributed_worker.py \
        CHECKPOINT OUT METHOD
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from diffattr.features import FeatureConfig, PlanConfig, ProjectionConfig
from diffattr.methods import (
    DAS,
    EKFAC,
    AttributionMethod,
    DASConfig,
    InfluenceConfig,
    attribute,
    get_method,
)
from diffattr.models import load_checkpoint

FEATURES = FeatureConfig(plan=PlanConfig(num_steps=2), projection=ProjectionConfig(dim=32))


def make(method: str) -> AttributionMethod:
    """A registered method with its defaults; "ekfac" and "das-ekfac": the projected route."""
    if method == "ekfac":
        return EKFAC(InfluenceConfig(route="projected"))
    if method == "das-ekfac":
        return DAS(DASConfig(curvature="ekfac", route="projected"))
    return get_method(method)()


def main() -> None:
    checkpoint_dir, out, method = sys.argv[1:4]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    checkpoint = load_checkpoint(checkpoint_dir)
    attribute(
        make(method),
        [checkpoint],
        checkpoint.training_data(),
        checkpoint.heldout_data(),
        FEATURES,
        out,
        batch_size=8,
        chunk_size=8,
        progress=False,
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

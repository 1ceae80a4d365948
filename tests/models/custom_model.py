"""A user-defined model importable as ``tests.models.custom_model:make`` (``module:factory``)."""

from __future__ import annotations

import torch
from torch import nn


class TinyConvNet(nn.Module):
    """Two 3x3 convolutions with an additive timestep embedding; returns a plain tensor."""

    def __init__(self, in_channels: int, width: int) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, width, 3, padding=1)
        self.time = nn.Linear(1, width)
        self.conv_out = nn.Conv2d(width, in_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device, dtype=x.dtype)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        h = self.conv_in(x) + self.time(t[:, None] / 1000)[:, :, None, None]
        return self.conv_out(nn.functional.silu(h))


def make(in_channels: int, sample_size: int, width: int = 16) -> nn.Module:
    return TinyConvNet(in_channels, width)


def not_a_module(in_channels: int, sample_size: int) -> str:
    return "not a module"


#: Inputs seen by :class:`Recorder` models, one (B, C, H, W) tensor per call.
RECORDED_INPUTS: list[torch.Tensor] = []


class Recorder(nn.Module):
    """Scales its input by a learnable factor and keeps a copy of every input it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        RECORDED_INPUTS.append(x.detach().clone())
        return self.scale * x


def make_recorder(in_channels: int, sample_size: int) -> nn.Module:
    return Recorder()

import torch
from diffusers.models.embeddings import get_timestep_embedding
from torch import nn


class _ResidualBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        x = self.fc1(self.norm(h)) + temb
        return h + self.fc2(nn.functional.silu(x))


class ResidualMLP(nn.Module):
    """A residual-MLP noise predictor over flattened images: the fastest model for CPU benchmarks.

    Called as ``model(x_t, t)`` with ``x_t`` of shape (B, C, H, W) and ``t`` a scalar or (B,)
    tensor of timesteps; returns the noise prediction with the shape of ``x_t``. A plain MLP
    without residual connections and normalisation saturates on this task, hence both.

    Args:
        in_channels: Image channels C.
        sample_size: Image side H = W.
        width: Hidden width of every block.
        depth: Number of residual blocks.
        time_dim: Size of the sinusoidal timestep embedding.
    """

    def __init__(
        self,
        in_channels: int,
        sample_size: int,
        width: int = 256,
        depth: int = 3,
        time_dim: int = 128,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.sample_size = sample_size
        self.time_dim = time_dim
        n_pixels = in_channels * sample_size * sample_size
        self.input = nn.Linear(n_pixels, width)
        self.time_mlp = nn.Sequential(
            nn.Linear(time_dim, width), nn.SiLU(), nn.Linear(width, width)
        )
        self.blocks = nn.ModuleList(_ResidualBlock(width) for _ in range(depth))
        self.out_norm = nn.LayerNorm(width)
        self.output = nn.Linear(width, n_pixels)
        # Start as the zero predictor so early training is stable.
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """Predict the noise in ``x_t`` at timestep ``t``."""
        t = torch.as_tensor(t, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        emb = get_timestep_embedding(t, self.time_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        temb = self.time_mlp(emb.to(x_t.dtype))
        h = self.input(x_t.flatten(1))
        for block in self.blocks:
            h = block(h, temb)
        return self.output(self.out_norm(h)).view_as(x_t)

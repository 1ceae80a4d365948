"""Model output functions f_t: the scalars (or r scalars) whose parameter gradients are features."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch

from diffattr._config import is_int, known_fields
from diffattr._seed import generator
from diffattr.errors import ConfigError

OutputKind = Literal["loss", "square_norm", "mean", "l1", "l2", "linf", "output_projection"]


@dataclass(frozen=True, kw_only=True, slots=True)
class OutputConfig:
    """Which function of a sample's prediction to differentiate.

    With eps_hat the prediction, eps the training target and D its number of elements: ``loss``
    = ||eps_hat - eps||^2 / D, ``square_norm`` = ||eps_hat||^2 / D, ``mean`` = sum(eps_hat) / D,
    ``l1`` = sum|eps_hat| / D, ``l2`` = ||eps_hat||_2, ``linf`` = max|eps_hat|,
    ``output_projection`` = the r values u_j . eps_hat for fixed random unit directions u_j.
    """

    kind: OutputKind = field(
        default="mean",
        metadata={"help": "function of the prediction: " + ", ".join(get_args(OutputKind))},
    )
    num_directions: int = field(
        default=4, metadata={"help": "output_projection: number r of random directions"}
    )
    seed: int = field(default=0, metadata={"help": "output_projection: seed of the directions"})

    def __post_init__(self) -> None:
        if self.kind not in get_args(OutputKind):
            raise ConfigError(
                f"OutputConfig.kind={self.kind!r} is invalid: must be one of "
                f"{list(get_args(OutputKind))}"
            )
        if not is_int(self.num_directions) or self.num_directions < 1:
            raise ConfigError(
                f"OutputConfig.num_directions={self.num_directions!r} is invalid: must be >= 1"
            )
        if not is_int(self.seed):
            raise ConfigError(f"OutputConfig.seed={self.seed!r} is invalid: must be an integer")

    @property
    def num_outputs(self) -> int:
        """Number r of scalars per sample: ``num_directions`` for output_projection, else 1."""
        return self.num_directions if self.kind == "output_projection" else 1

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as a JSON-serialisable dict."""
        return {"kind": self.kind, "num_directions": self.num_directions, "seed": self.seed}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OutputConfig:
        """Rebuild settings written by :meth:`to_dict`.

        Raises:
            ConfigError: ``data`` is not a dict, has unknown keys or invalid values.
        """
        return cls(**known_fields(cls, data))


def output_directions(
    num_directions: int, dim: int, seed: int, *, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Return the fixed random unit directions of ``output_projection``.

    Drawn as ``randn(r, D, generator=generator(seed, "output-directions"))`` in float32 on the
    CPU (so the same on every device), then converted to ``dtype``. When r <= D the rows are
    made orthonormal (QR), so that r = D directions carry the full output Jacobian exactly
    (J^T U^T U J = J^T J); with r > D they are only normalised.

    Args:
        num_directions: r.
        dim: D, the number of elements of one prediction.
        seed: Root seed.
        dtype: Dtype of the result.

    Returns:
        Tensor (r, D) on the CPU with unit-norm rows, orthonormal when r <= D.
    """
    draw = torch.randn(num_directions, dim, generator=generator(seed, "output-directions"))
    draw = draw.to(dtype)
    if num_directions <= dim:
        q, r = torch.linalg.qr(draw.T)
        # Fix QR's sign ambiguity so the directions are a pure function of the seed.
        return (q * torch.sign(torch.diagonal(r))).T.contiguous()
    return draw / torch.linalg.vector_norm(draw, dim=1, keepdim=True)


class OutputFunction:
    """The output function of one sample: ``f(prediction, target) -> Tensor (r,)``.

    Works on a single sample (no batch dimension); batch it with ``torch.func.vmap``.

    Args:
        config: Which function.
        sample_shape: Shape of one prediction, e.g. (C, H, W); D is its number of elements.
        dtype: Dtype of the predictions (the directions are made in it).
        device: Device of the predictions.

    Attributes:
        config: The settings.
        num_outputs: r.
        directions: Tensor (r, D) of unit directions for output_projection, else None.
    """

    def __init__(
        self,
        config: OutputConfig,
        sample_shape: tuple[int, ...],
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.config = config
        self.num_outputs = config.num_outputs
        dim = 1
        for size in sample_shape:
            dim *= int(size)
        self.directions: torch.Tensor | None = None
        if config.kind == "output_projection":
            self.directions = output_directions(
                config.num_directions, dim, config.seed, dtype=dtype
            ).to(device)

    def __call__(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Evaluate f on one sample.

        Args:
            prediction: The model's prediction eps_hat, any shape with D elements.
            target: The training target (noise, velocity or x0) of the same shape; only
                ``loss`` uses it.

        Returns:
            Tensor (r,): r = 1 except for output_projection.
        """
        kind = self.config.kind
        if kind == "output_projection":
            assert self.directions is not None
            return self.directions @ prediction.reshape(-1)
        if kind == "loss":
            value = (prediction - target).square().mean()
        elif kind == "square_norm":
            value = prediction.square().mean()
        elif kind == "mean":
            value = prediction.mean()
        elif kind == "l1":
            value = prediction.abs().mean()
        elif kind == "l2":
            value = torch.linalg.vector_norm(prediction)
        else:  # linf
            value = prediction.abs().amax()
        return value.reshape(1)

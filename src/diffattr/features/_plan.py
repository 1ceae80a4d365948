"""Timestep/noise plans: which (timestep, noise) pairs every gradient feature is computed at."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import numpy as np
import torch

from diffattr._config import is_int, known_fields
from diffattr._seed import derive_seed, generator
from diffattr.errors import ConfigError

Strategy = Literal["uniform", "cumulative", "random", "explicit"]
NoiseMode = Literal["per_sample", "shared"]


@dataclass(frozen=True, kw_only=True, slots=True)
class PlanConfig:
    """How to choose the plan's timesteps and noise draws.

    ``timesteps`` is normalised to a tuple of ints, and for ``strategy="explicit"`` ``num_steps``
    is set to ``len(timesteps)``, so equal plans always have equal settings.
    """

    strategy: Strategy = field(
        default="uniform",
        metadata={
            "help": "uniform: t = k*T//K; cumulative: t = 0..K-1; random: K distinct draws; "
            "explicit: the given timesteps"
        },
    )
    num_steps: int = field(
        default=10, metadata={"help": "number of timesteps K (explicit: len(timesteps))"}
    )
    timesteps: tuple[int, ...] | None = field(
        default=None, metadata={"help": "the timesteps of an explicit plan, in [0, T)"}
    )
    noise: NoiseMode = field(
        default="shared",
        metadata={
            "help": "shared: one noise draw per step for every sample (common random numbers); "
            "per_sample: each sample its own draw"
        },
    )
    seed: int = field(default=0, metadata={"help": "root seed of the random timesteps and noise"})

    def __post_init__(self) -> None:
        _check_choice("strategy", self.strategy, get_args(Strategy))
        _check_choice("noise", self.noise, get_args(NoiseMode))
        if not is_int(self.seed):
            raise ConfigError(f"PlanConfig.seed={self.seed!r} is invalid: must be an integer")
        if self.strategy == "explicit":
            self._normalise_timesteps()
        elif self.timesteps is not None:
            raise ConfigError(
                f"PlanConfig.timesteps={self.timesteps!r} is invalid with strategy="
                f"{self.strategy!r}: timesteps are only used with strategy='explicit'"
            )
        if not is_int(self.num_steps) or self.num_steps < 1:
            raise ConfigError(f"PlanConfig.num_steps={self.num_steps!r} is invalid: must be >= 1")

    def _normalise_timesteps(self) -> None:
        steps = self.timesteps
        if steps is None or isinstance(steps, str | bytes) or not isinstance(steps, Sequence):
            raise ConfigError(
                f"PlanConfig.timesteps={steps!r} is invalid: strategy='explicit' needs a "
                "non-empty list of distinct integer timesteps"
            )
        if not steps or not all(is_int(t) and t >= 0 for t in steps):
            raise ConfigError(
                f"PlanConfig.timesteps={steps!r} is invalid: must be a non-empty list of "
                "integers >= 0"
            )
        if len(set(steps)) != len(steps):
            raise ConfigError(f"PlanConfig.timesteps={steps!r} is invalid: must be distinct")
        # Frozen dataclass: normalising in __post_init__ needs object.__setattr__.
        object.__setattr__(self, "timesteps", tuple(int(t) for t in steps))
        object.__setattr__(self, "num_steps", len(steps))

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as a JSON-serialisable dict (tuples become lists)."""
        return {
            "strategy": self.strategy,
            "num_steps": self.num_steps,
            "timesteps": None if self.timesteps is None else list(self.timesteps),
            "noise": self.noise,
            "seed": self.seed,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PlanConfig:
        """Rebuild settings written by :meth:`to_dict`.

        Raises:
            ConfigError: ``data`` is not a dict, has unknown keys or invalid values.
        """
        return cls(**known_fields(cls, data))


@dataclass(frozen=True, slots=True)
class Plan:
    """The K (timestep, noise seed) pairs that features are computed at.

    Build it with :meth:`build`; the noise of step k for a sample depends only on (seed, k,
    sample id), never on batch size, batch order or device.

    Attributes:
        timesteps: The K timesteps, in plan order.
        noise_seeds: One seed per step, ``derive_seed(config.seed, "plan-noise", k)``.
        noise: ``"per_sample"`` or ``"shared"``.
        num_train_timesteps: T, the scheduler's number of training timesteps.
        config: The settings the plan was built from.
    """

    timesteps: tuple[int, ...]
    noise_seeds: tuple[int, ...]
    noise: NoiseMode
    num_train_timesteps: int
    config: PlanConfig

    @classmethod
    def build(cls, config: PlanConfig, num_train_timesteps: int = 1000) -> Plan:
        """Resolve settings to concrete timesteps and noise seeds.

        Args:
            config: The plan settings.
            num_train_timesteps: T; every timestep lies in [0, T).

        Returns:
            The plan.

        Raises:
            ConfigError: T < 1, K > T, or an explicit timestep outside [0, T).
        """
        big_t = num_train_timesteps
        if not is_int(big_t) or big_t < 1:
            raise ConfigError(f"num_train_timesteps={big_t!r} is invalid: must be >= 1")
        k = config.num_steps
        if config.strategy != "explicit" and k > big_t:
            raise ConfigError(
                f"PlanConfig.num_steps={k} is invalid: must be <= num_train_timesteps={big_t}"
            )
        if config.strategy == "uniform":
            timesteps = tuple(i * big_t // k for i in range(k))
        elif config.strategy == "cumulative":
            timesteps = tuple(range(k))
        elif config.strategy == "random":
            draw = torch.randperm(big_t, generator=generator(config.seed, "plan-t"))[:k]
            timesteps = tuple(sorted(int(t) for t in draw))
        else:
            assert config.timesteps is not None  # validated by PlanConfig
            outside = [t for t in config.timesteps if t >= big_t]
            if outside:
                raise ConfigError(
                    f"PlanConfig.timesteps has {outside} outside [0, {big_t}): "
                    f"num_train_timesteps is {big_t}"
                )
            timesteps = config.timesteps
        seeds = tuple(derive_seed(config.seed, "plan-noise", i) for i in range(len(timesteps)))
        return cls(timesteps, seeds, config.noise, big_t, config)

    def __len__(self) -> int:
        return len(self.timesteps)

    def noise_for(
        self,
        step: int,
        sample_ids: Sequence[int] | np.ndarray | torch.Tensor,
        shape: Sequence[int],
    ) -> torch.Tensor:
        """Return the noise of plan step ``step`` for the given samples.

        Args:
            step: Index into :attr:`timesteps`, in [0, K).
            sample_ids: B integer sample ids.
            shape: Per-sample shape, e.g. (C, H, W).

        Returns:
            Tensor (B, *shape), float32 on the CPU. ``per_sample``: each id's own standard normal
            draw; ``shared``: one draw repeated for every id.

        Raises:
            IndexError: ``step`` is outside [0, K).
        """
        if not 0 <= step < len(self):
            raise IndexError(f"plan step {step} is out of range for a plan of {len(self)} steps")
        shape = tuple(int(s) for s in shape)
        ids = [int(i) for i in np.asarray(sample_ids).reshape(-1)]
        seed = self.noise_seeds[step]
        if self.noise == "shared":
            draw = torch.randn(shape, generator=generator(seed, "shared"))
            return draw.expand(len(ids), *shape).clone()
        if not ids:
            return torch.empty((0, *shape))
        return torch.stack([torch.randn(shape, generator=generator(seed, "noise", i)) for i in ids])

    def to_dict(self) -> dict[str, Any]:
        """Return the plan as a JSON-serialisable dict: its settings and what they resolve to."""
        return {
            "config": self.config.to_dict(),
            "num_train_timesteps": self.num_train_timesteps,
            "timesteps": list(self.timesteps),
            "noise_seeds": list(self.noise_seeds),
            "noise": self.noise,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        """Rebuild a plan written by :meth:`to_dict`.

        Raises:
            ConfigError: ``data`` is malformed, or its recorded timesteps or seeds differ from
                what its settings resolve to now.
        """
        if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
            raise ConfigError(f"a plan must be a dict with a 'config' dict, got {data!r}")
        plan = cls.build(
            PlanConfig.from_dict(data["config"]), data.get("num_train_timesteps", 1000)
        )
        for key in ("timesteps", "noise_seeds"):
            if key in data and list(data[key]) != list(getattr(plan, key)):
                raise ConfigError(
                    f"plan {key} {data[key]!r} differ from what its settings give now "
                    f"({list(getattr(plan, key))!r}); the plan was written by another version"
                )
        return plan


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"PlanConfig.{name}={value!r} is invalid: must be one of {list(allowed)}")

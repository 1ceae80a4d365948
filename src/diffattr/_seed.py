"""Seed derivation: every random draw in diffattr comes from a recorded root seed.

Sub-seeds are hashed from the root seed and a tuple of keys (purpose, step, sample id...), so a
draw depends only on what it is for, never on batch size, batch order, device or process count.
"""

from __future__ import annotations

import hashlib

import torch

_SEED_BITS = 63


def derive_seed(seed: int, *keys: object) -> int:
    """Return a 63-bit seed derived from ``seed`` and ``keys``, stable across versions and machines.

    Args:
        seed: The root seed recorded in a run's metadata.
        *keys: What the draw is for, e.g. ``("train-noise", step)``; ints and strings.

    Returns:
        A non-negative integer below 2**63, suitable for ``torch.Generator.manual_seed``.

    Examples:
        >>> derive_seed(0, "noise", 3) == derive_seed(0, "noise", 3)
        True
        >>> derive_seed(0, "noise", 3) != derive_seed(0, "noise", 4)
        True
    """
    text = "\x1f".join([str(int(seed)), *(repr(k) for k in keys)])
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> (64 - _SEED_BITS)


def generator(seed: int, *keys: object) -> torch.Generator:
    """Return a CPU ``torch.Generator`` seeded with ``derive_seed(seed, *keys)``.

    Draws are made on the CPU and moved to the target device, so the numbers do not depend on the
    device.
    """
    return torch.Generator(device="cpu").manual_seed(derive_seed(seed, *keys))

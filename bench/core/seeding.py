"""Seeds derived per purpose, so that adding a random draw in one place never shifts another.

One cell seed drives everything in a cell (the defender's split, the poisoned indices, the
trigger, model initialisation, the defense). Each consumer gets its own stream,
``derive_seed(seed, "poison")`` say, so their draws are independent and reproducible.
"""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def derive_seed(seed: int, *tags: object) -> int:
    raw = "|".join([str(seed), *map(str, tags)]).encode()
    return int.from_bytes(hashlib.sha256(raw).digest()[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def generator(seed: int, *tags: object, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch generator seeded for one purpose (``tags``) within a cell seed."""
    return torch.Generator(device=device).manual_seed(derive_seed(seed, *tags))


def seed_everything(seed: int) -> None:
    """Seed the global RNGs (model initialisation, cuDNN-free CPU kernels)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)

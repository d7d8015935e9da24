"""Shuffled mini-batches of a feature cache that are the same on one process or many.

Under Accelerate each process holds its own shard of the training cache, and which rows a
shard holds depends on the number of processes. Batches shuffled per shard would make an
N-process fit a different fit from the one-process fit. Here a row's batch in an epoch is a
hash of its image's fingerprint (``timm_dgate.core.provenance``) and the epoch: a global batch is
the same set of images whichever process holds them, every process steps on its share, the
gradients are summed, and N processes take the steps one process would, up to float
summation order.
"""

from __future__ import annotations

import torch

_MASK63 = (1 << 63) - 1


def _signed(value: int) -> int:
    """A 64-bit constant as the int64 torch stores it."""
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = 0x9E3779B97F4A7C15  # SplitMix64's stream increment: one per epoch
_MIX1, _MIX2 = _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` keeps the sign)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser: every input bit moves every output bit (wrapping int64 arithmetic)."""
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    return x ^ _shift_right(x, 31)


def batch_ids(keys: torch.Tensor, epoch: int, num_batches: int) -> torch.Tensor:
    """Each row's batch in ``epoch``, in ``[0, num_batches)``, from its int64 key (an image fingerprint)."""
    if num_batches < 1:
        raise ValueError(f"num_batches must be at least 1, got {num_batches}")
    mixed = _mix(keys.long() + _signed((epoch + 1) * _GOLDEN % (1 << 64)))
    return (mixed & _MASK63).remainder(num_batches)


def epoch_batches(keys: torch.Tensor, epoch: int, num_batches: int) -> list[torch.Tensor]:
    """This process's row indices of each of the epoch's ``num_batches`` global batches (some may be empty)."""
    ids = batch_ids(keys, epoch, num_batches)
    order = torch.argsort(ids, stable=True)
    return list(order.split(torch.bincount(ids, minlength=num_batches).tolist()))

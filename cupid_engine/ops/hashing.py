"""The counter-based hash every projection backend draws its randomness from.

Nothing random is ever stored: each ±1 sign, bucket and shift is a pure function of
``(seed, stream, counter)``. This file is the normative definition, mirrored bit for bit
by ``csrc/include/cupid/hash.h`` (C++ and CUDA) and ``ops/triton/_hash.py`` (Triton), so
that the same ``(method, seed, k, P)`` is the same projection on every device, thread
count and batch size.

Definitions (all arithmetic modulo 2**32):

* ``mix32(x)``: the "lowbias32" integer finaliser
  ``x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15; x *= 0x846CA68B; x ^= x >> 16``.
* ``hash32(key, c) = mix32(c * GOLDEN + key)`` with ``GOLDEN = 0x9E3779B9``: a Weyl
  sequence through the finaliser (counter ``c`` < 2**32).
* ``stream_key(seed, stream) = hash32(hash32(seed_lo, seed_hi), stream)``, computed on the
  host once per call; ``seed`` is any integer in [0, 2**63).
* ``fastrange(h31, n) = (h31 * n) >> 31`` maps a 31-bit value to [0, n) without a
  division (Lemire); every bucket uses ``fastrange(h >> 1, n)`` and every sign bit is
  ``h & 1`` (1 means negative) unless a method says otherwise.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9
MIX_M1 = 0x7FEB352D
MIX_M2 = 0x846CA68B


def mix32_int(x: int) -> int:
    """``mix32`` on a Python int (host-side key derivation)."""
    x &= MASK32
    x ^= x >> 16
    x = (x * MIX_M1) & MASK32
    x ^= x >> 15
    x = (x * MIX_M2) & MASK32
    x ^= x >> 16
    return x


def hash32_int(key: int, counter: int) -> int:
    """``hash32`` on Python ints."""
    return mix32_int((counter * GOLDEN + key) & MASK32)


def stream_key(seed: int, stream: int) -> int:
    """The 32-bit key of one random stream of one seed."""
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    lo, hi = seed & MASK32, (seed >> 32) & MASK32
    return hash32_int(hash32_int(lo, hi), stream & MASK32)


def mix32(x: torch.Tensor) -> torch.Tensor:
    """``mix32`` on an int64 tensor holding values in [0, 2**32).

    int64 products of two 32-bit values may wrap in two's complement, but their low 32
    bits are exact, and that is all the mask keeps.
    """
    x = x ^ (x >> 16)
    x = (x * MIX_M1) & MASK32
    x = x ^ (x >> 15)
    x = (x * MIX_M2) & MASK32
    return x ^ (x >> 16)


def hash32(key: int | torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """``hash32(key, counter)`` elementwise; ``counter`` int64 in [0, 2**32)."""
    return mix32((counter * GOLDEN + key) & MASK32)


def fastrange(h: torch.Tensor, n: int) -> torch.Tensor:
    """Bucket in [0, n) from a 32-bit hash: ``((h >> 1) * n) >> 31``."""
    return ((h >> 1) * n) >> 31


def sign_from_bit(bit: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """+1 where ``bit == 0``, -1 where ``bit == 1``."""
    return (1 - 2 * bit).to(dtype)

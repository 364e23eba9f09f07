"""Triton mirror of the counter-based hash in ``ops/hashing.py`` (bit for bit).

All values are ``tl.uint32``: Triton's 32-bit unsigned arithmetic wraps modulo 2**32,
which is exactly the normative definition. Stream keys are derived on the host
(``hashing.stream_key``) and passed to kernels as plain integers; kernels only ever call
:func:`hash32` with such a key and a counter.
"""

from __future__ import annotations

import triton
import triton.language as tl

# tl.constexpr: compiled kernels may only read globals that are constexpr (the
# interpreter does not enforce this).
GOLDEN = tl.constexpr(0x9E3779B9)
MIX_M1 = tl.constexpr(0x7FEB352D)
MIX_M2 = tl.constexpr(0x846CA68B)


@triton.jit
def mix32(x):
    """``lowbias32`` finaliser on a ``uint32`` tensor."""
    x = x ^ (x >> 16)
    x = x * tl.full((), MIX_M1, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full((), MIX_M2, tl.uint32)
    x = x ^ (x >> 16)
    return x


@triton.jit
def hash32(key, counter):
    """``mix32(counter * GOLDEN + key)``; ``key`` and ``counter`` are cast to ``uint32``."""
    # tl.cast also takes plain ints (interpreted loop counters, specialised constants).
    c = tl.cast(counter, tl.uint32)
    return mix32(c * tl.full((), GOLDEN, tl.uint32) + tl.cast(key, tl.uint32))


@triton.jit
def fastrange(h, n):
    """Bucket in ``[0, n)`` from a 32-bit hash: ``((h >> 1) * n) >> 31`` in 64-bit, as int32."""
    n64 = n + tl.zeros((), tl.uint64)  # n may be a specialised constexpr (e.g. 1)
    return (((h >> 1).to(tl.uint64) * n64) >> 31).to(tl.int32)

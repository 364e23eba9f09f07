"""Readable torch reference of the CUPID-Quality reductions: the executable spec.

For all rollout steps R ``[Mr, K]`` cut into rollouts by ``r_off [m + 1]`` and all demo
steps D ``[Nd, K]`` cut into demos by ``d_off [N + 1]``, with A = R_τ D_ξᵀ the block of
step similarities of rollout τ and demo ξ:

* ``maxmin[τ, ξ] = max_{i ∈ τ} min_{j ∈ ξ} A[i, j]``
* ``minmax[τ, ξ] = min_{i ∈ τ} max_{j ∈ ξ} A[i, j]``

:func:`quality_minmax` multiplies R by a block of whole demos at a time (memory
O(Mr × block), never all of A) and reduces with ``scatter_reduce``: the ``torch``
backend and the oracle the fast backends (``csrc/cpu/quality.cpp``,
``ops/triton/quality.py``) are compared with. :func:`quality_minmax_naive` materialises
A per pair with one matmul each: the slow baseline of the benchmark, and a second,
independent statement of the definition for tests.

Both take checked inputs (``ops.quality.check_quality_inputs``): contiguous float
tensors on one device and int64 CPU offset tensors with non-empty segments. They compute
in the input dtype on the input's device.
"""

from __future__ import annotations

import torch


def quality_minmax(
    r: torch.Tensor, r_off: torch.Tensor, d: torch.Tensor, d_off: torch.Tensor, *, block_elems: int = 1 << 24
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (rollout, demo) ``max min A`` and ``min max A``, blockwise over demos.

    Args:
        r: ``[Mr, K]`` rollout step features, rollouts concatenated.
        r_off: ``[m + 1]`` int64 rollout offsets into ``r`` (CPU).
        d: ``[Nd, K]`` demo step features, demos concatenated.
        d_off: ``[N + 1]`` int64 demo offsets into ``d`` (CPU).
        block_elems: Bound on Mr × (demo columns per block), i.e. on the A block held.

    Returns:
        ``(maxmin [m, N], minmax [m, N])`` in the dtype and on the device of ``r``.
    """
    dev = r.device
    m, n, rows = r_off.numel() - 1, d_off.numel() - 1, r.shape[0]
    row_seg = torch.repeat_interleave(torch.arange(m, device=dev), (r_off[1:] - r_off[:-1]).to(dev))  # [Mr]
    col_seg = torch.repeat_interleave(torch.arange(n, device=dev), (d_off[1:] - d_off[:-1]).to(dev))  # [Nd]
    maxmin = torch.empty(m, n, dtype=r.dtype, device=dev)
    minmax = torch.empty(m, n, dtype=r.dtype, device=dev)
    cols_per_block = max(1, block_elems // max(rows, 1))
    e0 = 0
    while e0 < n:
        # Whole demos per block; at least one even if it is longer than the budget.
        e1 = e0 + 1
        while e1 < n and int(d_off[e1 + 1] - d_off[e0]) <= cols_per_block:
            e1 += 1
        c0, c1 = int(d_off[e0]), int(d_off[e1])
        a = r @ d[c0:c1].T  # [Mr, cols] — one block of A, never the whole
        idx = (col_seg[c0:c1] - e0).expand(rows, -1)
        inf = torch.full((rows, e1 - e0), float("inf"), dtype=r.dtype, device=dev)
        row_min = inf.scatter_reduce(1, idx, a, "amin", include_self=True)  # min over z ∈ ξ
        row_max = (-inf).scatter_reduce(1, idx, a, "amax", include_self=True)  # max over z ∈ ξ
        ridx = row_seg[:, None].expand(-1, e1 - e0)
        big = torch.full((m, e1 - e0), float("inf"), dtype=r.dtype, device=dev)
        maxmin[:, e0:e1] = (-big).scatter_reduce(0, ridx, row_min, "amax", include_self=True)
        minmax[:, e0:e1] = big.scatter_reduce(0, ridx, row_max, "amin", include_self=True)
        e0 = e1
    return maxmin, minmax


def quality_minmax_naive(
    r: torch.Tensor, r_off: torch.Tensor, d: torch.Tensor, d_off: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair materialisation of A with one matmul each (the baseline the kernels beat)."""
    m, n = r_off.numel() - 1, d_off.numel() - 1
    maxmin = torch.empty(m, n, dtype=r.dtype, device=r.device)
    minmax = torch.empty(m, n, dtype=r.dtype, device=r.device)
    for t in range(m):
        rt = r[int(r_off[t]) : int(r_off[t + 1])]
        for e in range(n):
            a = rt @ d[int(d_off[e]) : int(d_off[e + 1])].T
            maxmin[t, e] = a.amin(1).amax()
            minmax[t, e] = a.amax(1).amin()
    return maxmin, minmax

"""Projection ops: the fused kernels that turn per-sample gradients into k-dim features.

Public ops (the only supported entry points):

* :func:`project` — random projection of flat gradients ``[B, P] -> [B, k]`` with the
  ``dense`` (Rademacher JL), ``sparse`` (CountSketch, ``s`` non-zeros) or ``signshift``
  (random signs + per-chunk cyclic shifts) method.
* :func:`tensorsketch` — the layer-factored sketch of ``sum_t delta_t x_t^T`` from hook
  captures, without ever forming the per-sample gradient.
* :func:`quality_minmax` — the CUPID-Quality reductions (a segmented GEMM with a
  min/max epilogue; ``ops/quality.py``), on the ``torch``, ``cpu`` and ``triton`` backends.
* :func:`available_backends`.

Backends (``backend=``): ``torch`` (``ops/reference.py``, the readable spec, any device),
``cpu`` (C++/OpenMP in ``csrc/cpu``; the CPU default), ``triton`` (``ops/triton``; GPU, or
CPU under ``TRITON_INTERPRET=1`` for tests only) and ``cuda`` (``csrc/cuda``; when the
extension was built with a CUDA toolkit and a GPU is present). All draw their randomness
from the counter-based hash in ``ops/hashing.py``: the same ``(method, seed, k, P)`` is the
same projection on every backend, device, thread count and batch split.

Non-finite policy: a NaN or Inf anywhere in an input row propagates into that row's
output under every method, so the ops check the (small) output instead of re-reading the
(large) input, and raise ``ValueError`` naming the offending rows. Pass
``check_finite=False`` to skip the check.

Outputs are float32 (float64 when the input is float64, so tests can compare in float64).
"""

from __future__ import annotations

import os

import torch

from cupid_engine import constants as C
from cupid_engine.ops import registry as _registry
from cupid_engine.ops.registry import Backend

__all__ = ["project", "tensorsketch", "quality_minmax", "available_backends", "nonfinite_rows"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def _cuda_available() -> bool:
    from cupid_engine.ops import cpu_backend

    if not (torch.cuda.is_available() and cpu_backend.is_available()):
        return False
    return bool(cpu_backend._C().has_cuda())


def _cpu_available() -> bool:
    from cupid_engine.ops import cpu_backend

    return cpu_backend.is_available()


_ALL_OPS = ("project", "tensorsketch", "quality_minmax")
_registry.register(
    Backend("torch", ("cpu", "cuda"), "cupid_engine.ops.torch_backend", lambda: True, "", 10, ops=_ALL_OPS)
)
_registry.register(
    Backend(
        "cpu",
        ("cpu",),
        "cupid_engine.ops.cpu_backend",
        _cpu_available,
        "the C++ extension cupid_engine._C is not built: run `make` or "
        "`pip install --no-build-isolation -e .` (needs a C++17 compiler, CMake and OpenMP)",
        30,
        ops=_ALL_OPS,
    )
)
_registry.register(
    Backend(
        "triton",
        ("cuda", "cpu") if os.environ.get("TRITON_INTERPRET") == "1" else ("cuda",),
        "cupid_engine.ops.triton",
        _triton_available,
        "install triton (`pip install triton==3.9.0`, extra `gpu`) and run on a CUDA GPU "
        "(or set TRITON_INTERPRET=1 before importing triton, for tests on CPU)",
        20,
        auto_devices=("cuda",),
        ops=_ALL_OPS,
    )
)
_registry.register(
    Backend(
        "cuda",
        ("cuda",),
        "cupid_engine.ops.cuda_backend",
        _cuda_available,
        "rebuild the extension with a CUDA toolkit (CUPID_ENABLE_CUDA=ON) and use a CUDA GPU",
        30,
    )
)


def available_backends() -> list[str]:
    """Names of the backends usable in this process."""
    return _registry.available()


def _resolve(backend: str, device: torch.device, op: str) -> Backend:
    return _registry.resolve(backend, device.type, op)


def _check_k_seed(k: int, seed: int) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k <= 0:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if k >= 2**31:
        raise ValueError(f"k must be < 2**31, got {k}")
    if not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")


def nonfinite_rows(out: torch.Tensor) -> torch.Tensor:
    """``[B]`` bool: rows of ``out [B, k]`` holding a NaN/Inf.

    One pass (a row sum) instead of ``isfinite(out).all(1)``'s several: a NaN or ±Inf
    anywhere in a row makes its sum non-finite. The only false positive is a row of finite
    values whose sum overflows (|sum| > 3e38 in float32), which is as unusable.
    """
    return ~torch.isfinite(out.sum(dim=1))


def _check_finite(out: torch.Tensor, what: str) -> None:
    bad = nonfinite_rows(out)
    if bool(bad.any()):
        rows = bad.nonzero().flatten().tolist()
        shown = rows[:10]
        raise ValueError(
            f"{what}: non-finite input (NaN/Inf, or overflow) in batch rows {shown}"
            f"{' ...' if len(rows) > 10 else ''}; clean the gradients or pass check_finite=False"
        )


def project(
    x: torch.Tensor,
    *,
    k: int,
    method: str = "sparse",
    seed: int = 0,
    s: int = 1,
    backend: str = "auto",
    check_finite: bool = True,
) -> torch.Tensor:
    """Random projection of flat per-sample gradients.

    Args:
        x: ``[B, P]`` gradients, float32/float16/bfloat16 (float64 for tests), CPU or CUDA.
        k: Output dimension.
        method: ``"dense"``, ``"sparse"`` or ``"signshift"`` (see ``ops/reference.py``).
        seed: Projection seed in ``[0, 2**63)``.
        s: Non-zeros per coordinate for ``sparse``; must divide ``k``.
        backend: ``"auto"``, ``"torch"``, ``"cpu"``, ``"triton"`` or ``"cuda"``.
        check_finite: Raise on non-finite outputs (see module docstring).

    Returns:
        ``[B, k]`` float32 (float64 for float64 input), scaled so that
        ``E<project(x), project(y)> = <x, y>``.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"x must be [B, P], got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be float32/float16/bfloat16/float64, got {x.dtype}")
    if method not in C.PROJECTION_METHODS:
        raise ValueError(f"method must be one of {C.PROJECTION_METHODS}, got {method!r}")
    _check_k_seed(k, seed)
    if x.shape[1] == 0:
        raise ValueError("x has P = 0 coordinates")
    if x.shape[1] >= 2**32:
        raise ValueError(f"P must be < 2**32, got {x.shape[1]}")
    if method == "sparse":
        if not isinstance(s, int) or not 1 <= s <= C.MAX_SPARSE_S or k % s:
            raise ValueError(f"sparse needs 1 <= s <= {C.MAX_SPARSE_S} dividing k={k}, got s={s!r}")
    else:
        s = 1
    impl = _resolve(backend, x.device, "project").impl()
    out = impl.project(x, k, method, seed, s)
    if check_finite:
        _check_finite(out, f"project(method={method!r})")
    return out


def tensorsketch(
    delta: torch.Tensor,
    x: torch.Tensor,
    *,
    k: int,
    seed: int = 0,
    backend: str = "auto",
    check_finite: bool = True,
    strategy: str = "auto",
) -> torch.Tensor:
    """Sketch of the per-sample gradient of a Linear layer from its hook captures.

    The per-sample gradient of a Linear layer is ``G = sum_t delta_t x_t^T`` (``[O, I]``;
    append a constant 1 to ``x`` to include the bias). This returns the CountSketch of
    ``vec(G)`` with bucket ``(h1(o) + h2(i)) mod k`` and sign ``s1(o) s2(i)``, computed by FFT
    in ``O(T (O + I + k log k))`` per sample without forming ``G`` (``fft``), or, when ``T``
    is large against ``O I / (k log k)``, by forming ``G`` with one batched GEMM and hashing
    its entries with those same buckets and signs (``dense``): the same vector up to float
    rounding. ``auto`` chooses per call by the cost model of ``ops.tensorsketch_plan`` (a
    pure function of the shapes: the same call always takes the same route).

    Args:
        delta: ``[B, T, O]`` output gradients.
        x: ``[B, T, I]`` layer inputs (same dtype and device as ``delta``).
        k: Sketch dimension.
        seed: Sketch seed (use an independent seed per layer, then sum the layer sketches).
        backend: As in :func:`project`.
        check_finite: Raise on non-finite outputs.
        strategy: ``"auto"``, ``"fft"`` or ``"dense"`` (the ``torch`` and ``cpu`` backends
            implement both; the GPU backends only ``fft``, which ``auto`` then takes).

    Returns:
        ``[B, k]`` float32 (float64 for float64 inputs).
    """
    from cupid_engine.ops import tensorsketch_plan

    if strategy not in tensorsketch_plan.STRATEGIES:
        raise ValueError(f"strategy must be one of {tensorsketch_plan.STRATEGIES}, got {strategy!r}")
    for name, t in (("delta", delta), ("x", x)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name} must be [B, T, D], got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32/float16/bfloat16/float64, got {t.dtype}")
    if delta.device != x.device:
        raise ValueError(f"delta is on {delta.device} but x is on {x.device}")
    if delta.dtype != x.dtype:
        raise TypeError(f"delta is {delta.dtype} but x is {x.dtype}")
    if delta.shape[:2] != x.shape[:2]:
        raise ValueError(f"delta [B, T, O] = {tuple(delta.shape)} and x [B, T, I] = {tuple(x.shape)} disagree on B, T")
    if delta.shape[1] == 0 or delta.shape[2] == 0 or x.shape[2] == 0:
        raise ValueError(f"empty T, O or I: delta {tuple(delta.shape)}, x {tuple(x.shape)}")
    _check_k_seed(k, seed)
    chosen = _resolve(backend, delta.device, "tensorsketch")
    impl = chosen.impl()
    if hasattr(impl, "STRATEGIES"):
        out = impl.tensorsketch(delta, x, k, seed, strategy=strategy)
    elif strategy == "dense":
        raise ValueError(f"backend {chosen.name!r} implements only the fft route of tensorsketch (strategy='dense' "
                         "is on the 'torch' and 'cpu' backends)")
    else:
        out = impl.tensorsketch(delta, x, k, seed)
    if check_finite:
        _check_finite(out, "tensorsketch")
    return out


# The quality op lives in its own module (it imports the registry filled in above).
from cupid_engine.ops.quality import quality_minmax  # noqa: E402

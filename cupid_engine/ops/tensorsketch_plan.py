"""Which exact evaluation of the tensorsketch to run: a cost model in seconds.

``ops.tensorsketch(delta [B, T, O], x [B, T, I])`` is the CountSketch of
``vec(G)``, ``G = sum_t delta_t x_t^T``, with bucket ``(h1(o) + h2(i)) mod k`` and sign
``s1(o) s2(i)``. Two evaluations give that same vector (to float rounding):

* ``fft``: ``irfft(sum_t rfft(CS1(delta_t)) * rfft(CS2(x_t)))``: ``2T + 1`` real FFTs of
  length ``k`` and ``T (O + I)`` scattered values per sample, never forming ``G``;
* ``dense``: ``G`` from one batched GEMM (``2 T O I`` flops per sample), then each of its
  ``O I`` entries hashed with the combined hashes (the definition itself,
  ``reference.tensorsketch_materialized``).

``fft`` wins for few steps (a Linear layer, T = 1); ``dense`` once ``T`` is large against
``O I / (k log k)`` (Conv layers with hundreds of positions, many draws). A third
evaluation, ``direct``, exists only inside the C++ FFT kernel's multi-layer call (the hook
path, ``featurize.hooks``): the ``T O I`` hashed products ``s1 s2 delta_t[o] x_t[i]``
accumulated in the time domain, ``W`` samples per vector, and added to the inverse FFT's
output; no ``G`` in memory, no FFT. It wins when ``T O I`` is small against ``k log k``
(a narrow factor: the MLP's 41-wide input layer, its 7-wide head). The model:

    t_fft    = ceil(B / W) W [(2T + 1) c_fft k log2 k + T (O + I) c_scatter]
    t_dense  = B [2 T O I c_flop + O I c_hash]
    t_direct = ceil(B / W) [T O I c_direct + W T (O + I) c_scatter]

``W`` is the SIMD lane group of the C++ FFT kernel (samples transformed together; a
partial group costs a full one). The constants are seconds per unit on one core,
measured by ``ops.tensorsketch_calibrate.calibrate`` (``python -m
cupid_engine.ops.tensorsketch_calibrate`` prints a fresh calibration next to these
defaults; it lives apart because it times ``ops.cpu_backend``, which asks this module for
its route); the defaults are the median of three
calibrations on the development machine (Intel Xeon, Ice Lake, AVX-512, 2026-12-06, load
avg ~4: c_fft 4.9-5.2e-11, c_scatter 3.5-6.3e-10, c_flop 7.2-8.2e-12, c_hash 1.7-2.0e-9; c_direct
1.86-2.2e-9 from the direct route's marginal CPU time on (512, 513), (64, 64) at T = 16 and
(512, 41) layers, B = 1024, k = 4096, one thread, load ~2, 2026-12-06; ``calibrate`` now fits
it too, from the direct route alone at two sizes: 1.33-1.44e-9 in five calibrations at load
~1.3, below the in-call marginal cost; with the other defaults every layer of the MLP and
of the UNet at 64 draws, k = 4096, keeps its route for any c_direct in 6.5e-10..3.7e-9 (below
~6e-10 the UNet's T = 64 Linear layers would go direct, above ~3.75e-9 the MLP's 41-wide
input layer fft), and so does the whole median calibration: the default stays). The choice is a pure
function of the shapes and these constants, never of a live timing, so the same call
makes the same choice (and the same float rounding) on every run.
"""

from __future__ import annotations

import dataclasses
import math

__all__ = ["CostModel", "DEFAULT_COST", "STRATEGIES", "choose", "estimate"]

STRATEGIES = ("auto", "fft", "dense")


@dataclasses.dataclass(frozen=True)
class CostModel:
    """Seconds per unit of work of each tensorsketch route (one core).

    Attributes:
        c_fft: Per lane-sample and ``k log2 k`` of one real FFT (forward or inverse).
        c_scatter: Per factor value scattered into an FFT input buffer.
        c_flop: Per flop of the batched GEMM forming ``G``.
        c_hash: Per entry of ``G`` written by the GEMM and hashed.
        c_direct: Per lane group (``lanes`` samples at once) and product ``delta_t[o] x_t[i]``
            accumulated in the time domain by the kernel's direct route.
        lanes: Samples per SIMD lane group of the FFT kernel.
    """

    c_fft: float = dataclasses.field(default=5.0e-11, metadata={"help": "s per lane and k log2 k of one FFT"})
    c_scatter: float = dataclasses.field(default=5.5e-10, metadata={"help": "s per scattered factor value"})
    c_flop: float = dataclasses.field(default=7.7e-12, metadata={"help": "s per GEMM flop"})
    c_hash: float = dataclasses.field(default=1.9e-9, metadata={"help": "s per hashed entry of G"})
    c_direct: float = dataclasses.field(default=1.9e-9, metadata={
        "help": "s per lane group and hashed product of the direct route (time domain, in the FFT kernel)"})
    lanes: int = dataclasses.field(default=16, metadata={"help": "samples per FFT lane group"})

    def __post_init__(self) -> None:
        for f in ("c_fft", "c_scatter", "c_flop", "c_hash", "c_direct"):
            v = getattr(self, f)
            if not (isinstance(v, float) and math.isfinite(v) and v > 0):
                raise ValueError(f"CostModel.{f} must be a positive finite float, got {v!r}")
        if not isinstance(self.lanes, int) or self.lanes < 1:
            raise ValueError(f"CostModel.lanes must be a positive int, got {self.lanes!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CostModel:
        return cls(**d)


DEFAULT_COST = CostModel()


def estimate(B: int, T: int, O: int, I: int, k: int, cost: CostModel = DEFAULT_COST, *,
             inverse: bool = True) -> dict[str, float]:
    """Modelled seconds (one core) of each route for one call: ``fft``, ``dense`` and
    ``direct`` (the last only runs inside the kernel's multi-layer call, see the module
    docstring; :func:`choose` picks between the first two).

    ``inverse=False`` leaves out the fft route's inverse FFT: the marginal cost of one more
    layer in a fused multi-layer call (``featurize.hooks``), where one inverse serves all.
    """
    groups = -(-B // cost.lanes)
    transforms = 2 * T + int(inverse)
    fft = groups * cost.lanes * (transforms * cost.c_fft * k * math.log2(max(k, 2)) + T * (O + I) * cost.c_scatter)
    dense = B * (2.0 * T * O * I * cost.c_flop + O * I * cost.c_hash)
    direct = groups * (T * O * I * cost.c_direct + cost.lanes * T * (O + I) * cost.c_scatter)
    return {"fft": fft, "dense": dense, "direct": direct}


def choose(strategy: str, B: int, T: int, O: int, I: int, k: int, cost: CostModel = DEFAULT_COST) -> str:
    """``fft`` or ``dense`` for one call (``strategy`` other than ``auto`` is returned as is)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy != "auto":
        return strategy
    est = estimate(B, T, O, I, k, cost)
    return "dense" if est["dense"] < est["fft"] else "fft"

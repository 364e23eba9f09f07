"""Functional optimizers and exact reverse-mode metagradients through a training run.

The metagradient estimator (DataMIL §4.1, Engstrom et al. 2025) needs the trained
parameters as a *differentiable function* of the per-cluster loss weights ``w``. Torch's
optimizers update parameters in place, which autograd cannot differentiate through, so
this module has its own optimizers as pure functions ``(params, grads, state, t) ->
(params', state')``: SGD with momentum / weight decay, and Adam / AdamW, each matching
``torch.optim`` update for update.

:func:`reverse_metagradient` computes ``dM(θ_T(w))/dw`` exactly by reverse mode:

* ``mode="unroll"``: build the graph of all differentiated steps at once (second-order:
  each step's gradient is taken with ``create_graph=True``) and call autograd once. The
  simple reference; memory grows with the number of steps.
* ``mode="checkpoint"``: the forward pass stores parameters and optimizer state only at
  ``S`` segment boundaries; the backward pass walks the segments from last to first,
  recomputes each one under ``enable_grad`` from its stored start state, and pulls the
  adjoint of the segment's end state back to its start state (and into ``w``) with one
  ``autograd.grad`` call. Memory: ``S`` states plus one segment's graph, instead of
  every step's graph. Recomputation is deterministic (fixed data order, per-step seeded
  noise), so the result equals the unrolled one up to float rounding of identical ops.

Steps before ``start_step`` run without a graph (``w`` fixed at its value): the
"differentiate only the last K steps" option.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch

Tensors = list[torch.Tensor]


def _safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    # sqrt has an infinite derivative at 0; a parameter whose gradient is exactly 0 (a
    # dead ReLU unit) has v = 0 and would turn the backward pass into 0·inf = NaN. The
    # double `where` keeps the forward value and gives a zero derivative there.
    pos = x > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, x, torch.ones_like(x))), torch.zeros_like(x))


class FunctionalOptimizer:
    """Base: ``init(params) -> state`` and ``step(params, grads, state, t) -> (params, state)``.

    ``t`` is the 0-based index of the update. State is a flat list of tensors so that
    checkpoints and adjoints are plain tensor lists.
    """

    def init(self, params: Tensors) -> Tensors:
        raise NotImplementedError

    def step(self, params: Tensors, grads: Tensors, state: Tensors, t: int) -> tuple[Tensors, Tensors]:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class FunctionalSGD(FunctionalOptimizer):
    """SGD with (heavy-ball) momentum and L2 weight decay, as ``torch.optim.SGD`` with
    ``dampening=0, nesterov=False``. State: one momentum buffer per parameter (empty
    without momentum)."""

    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0

    def init(self, params: Tensors) -> Tensors:
        return [torch.zeros_like(p) for p in params] if self.momentum else []

    def step(self, params: Tensors, grads: Tensors, state: Tensors, t: int) -> tuple[Tensors, Tensors]:
        if self.weight_decay:
            grads = [g + self.weight_decay * p for g, p in zip(grads, params)]
        if not self.momentum:
            return [p - self.lr * g for p, g in zip(params, grads)], []
        # torch initialises the buffer to g on the first step; mu·0 + g is the same.
        bufs = [self.momentum * b + g for b, g in zip(state, grads)]
        return [p - self.lr * b for p, b in zip(params, bufs)], bufs


@dataclasses.dataclass(frozen=True)
class FunctionalAdam(FunctionalOptimizer):
    """Adam (L2 weight decay) or AdamW (decoupled), as ``torch.optim.Adam/AdamW``.
    State: first and second moments of every parameter (``[m_1..m_P, v_1..v_P]``)."""

    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    decoupled: bool = False

    def init(self, params: Tensors) -> Tensors:
        return [torch.zeros_like(p) for p in params] * 2

    def step(self, params: Tensors, grads: Tensors, state: Tensors, t: int) -> tuple[Tensors, Tensors]:
        b1, b2 = self.betas
        n = len(params)
        m, v = state[:n], state[n:]
        if self.weight_decay and self.decoupled:
            params = [p * (1 - self.lr * self.weight_decay) for p in params]
        elif self.weight_decay:
            grads = [g + self.weight_decay * p for g, p in zip(grads, params)]
        m = [b1 * mi + (1 - b1) * g for mi, g in zip(m, grads)]
        v = [b2 * vi + (1 - b2) * g * g for vi, g in zip(v, grads)]
        bc1 = 1 - b1 ** (t + 1)
        bc2 = 1 - b2 ** (t + 1)
        step_size = self.lr / bc1
        new = [p - step_size * mi / (_safe_sqrt(vi) / bc2**0.5 + self.eps) for p, mi, vi in zip(params, m, v)]
        return new, m + v


def make_optimizer(name: str, *, lr: float, weight_decay: float = 0.0, momentum: float = 0.0,
                   betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> FunctionalOptimizer:
    """The functional optimizer for a ``TrainConfig.optimizer`` name (sgd, adam, adamw)."""
    if name == "sgd":
        return FunctionalSGD(lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name in ("adam", "adamw"):
        return FunctionalAdam(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                              decoupled=name == "adamw")
    raise ValueError(f"unknown optimizer {name!r}; choose sgd, adam or adamw")


#: ``step_loss(params, w, t) -> scalar``: the training loss of update ``t`` (its batch
#: and noise fixed by ``t``), linear in the cluster weights ``w [C]``.
StepLoss = Callable[[Tensors, torch.Tensor, int], torch.Tensor]
#: ``metric(params) -> scalar``: the target metric of the trained parameters.
MetricFn = Callable[[Tensors], torch.Tensor]


@dataclasses.dataclass
class MetagradientOutput:
    """Result of :func:`reverse_metagradient`.

    Attributes:
        grad: ``[C]`` dM/dw at the given ``w``.
        metric: M(θ_T(w)) (float).
        params: Trained parameters θ_T (detached).
        info: Accounting: ``num_checkpoints``, ``checkpoint_bytes`` (bytes of the stored
            segment-start states), ``peak_graph_bytes`` (largest total of tensors saved
            for backward by one recomputed segment, or by the whole unroll),
            ``segments``, ``differentiated_steps``.
    """

    grad: torch.Tensor
    metric: float
    params: Tensors
    info: dict


def _nbytes(ts: Sequence[torch.Tensor]) -> int:
    return int(sum(t.numel() * t.element_size() for t in ts))


def _run_steps(step_loss: StepLoss, optimizer: FunctionalOptimizer, params: Tensors, state: Tensors,
               w: torch.Tensor, start: int, stop: int, *, differentiable: bool) -> tuple[Tensors, Tensors]:
    """Updates ``start..stop-1``. Differentiable: keeps the graph (params/state/w -> output)."""
    for t in range(start, stop):
        if differentiable:
            loss = step_loss(params, w, t)
            grads = torch.autograd.grad(loss, params, create_graph=True)
            params, state = optimizer.step(params, list(grads), state, t)
        else:
            with torch.enable_grad():
                leaves = [p.detach().requires_grad_(True) for p in params]
                loss = step_loss(leaves, w.detach(), t)
                grads = torch.autograd.grad(loss, leaves)
            with torch.no_grad():
                params, state = optimizer.step([p.detach() for p in params], list(grads), state, t)
    return params, state


def functional_train(step_loss: StepLoss, params0: Tensors, optimizer: FunctionalOptimizer, w: torch.Tensor,
                     num_steps: int) -> Tensors:
    """Plain (non-differentiated) functional training: θ_T(w), detached."""
    params = [p.detach().clone() for p in params0]
    params, _ = _run_steps(step_loss, optimizer, params, optimizer.init(params), w, 0, num_steps,
                           differentiable=False)
    return [p.detach() for p in params]


class _SavedBytes:
    """Counts bytes of tensors autograd saves for backward (saved_tensors_hooks)."""

    def __init__(self) -> None:
        self.bytes = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        self.bytes += t.numel() * t.element_size()
        return t

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t


def _boundaries(start: int, stop: int, segments: int) -> list[int]:
    n = stop - start
    segments = max(1, min(segments, n)) if n > 0 else 1
    return [start + (n * s) // segments for s in range(segments + 1)]


def reverse_metagradient(
    step_loss: StepLoss,
    metric: MetricFn,
    params0: Tensors,
    optimizer: FunctionalOptimizer,
    *,
    num_steps: int,
    num_weights: int,
    start_step: int = 0,
    segments: int = 8,
    mode: str = "checkpoint",
    w: torch.Tensor | None = None,
    progress: bool = False,
) -> MetagradientOutput:
    """Exact ``dM(θ_T(w))/dw`` by reverse mode through updates ``start_step..num_steps-1``.

    Args:
        step_loss: Loss of update ``t`` as a function of (params, w).
        metric: Target metric of the final parameters (scalar).
        params0: Initial parameters θ_0 (copied; dtype decides the arithmetic).
        optimizer: A :class:`FunctionalOptimizer`.
        num_steps: Total updates T.
        num_weights: C, the length of ``w``.
        start_step: Updates before this run without a graph (differentiate the last
            ``T - start_step`` only).
        segments: Number of checkpoint segments S (mode ``checkpoint``).
        mode: ``checkpoint`` or ``unroll``.
        w: ``[C]`` weights to differentiate at (default all ones).
        progress: tqdm bar over segments.

    Returns:
        The :class:`MetagradientOutput`.
    """
    if mode not in ("checkpoint", "unroll"):
        raise ValueError(f"mode must be checkpoint or unroll, got {mode!r}")
    if not 0 <= start_step <= num_steps:
        raise ValueError(f"start_step must be in [0, {num_steps}], got {start_step}")
    dtype = params0[0].dtype
    w = torch.ones(num_weights, dtype=dtype, device=params0[0].device) if w is None else w.detach().to(dtype)
    params = [p.detach().clone() for p in params0]
    state = optimizer.init(params)
    # Undifferentiated prefix.
    params, state = _run_steps(step_loss, optimizer, params, state, w, 0, start_step, differentiable=False)
    info: dict = {"differentiated_steps": num_steps - start_step, "mode": mode}

    if mode == "unroll":
        counter = _SavedBytes()
        wl = w.clone().requires_grad_(True)
        leaves = [p.detach().requires_grad_(True) for p in params]
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
            out_p, _ = _run_steps(step_loss, optimizer, leaves, [s.detach() for s in state], wl, start_step,
                                  num_steps, differentiable=True)
            m = metric(out_p)
        (g,) = torch.autograd.grad(m, wl, allow_unused=True)
        info.update(segments=1, num_checkpoints=1, checkpoint_bytes=_nbytes(params) + _nbytes(state),
                    peak_graph_bytes=counter.bytes)
        return MetagradientOutput(grad=torch.zeros_like(w) if g is None else g.detach(), metric=float(m.detach()),
                                  params=[p.detach() for p in out_p], info=info)

    bounds = _boundaries(start_step, num_steps, segments)
    checkpoints: list[tuple[Tensors, Tensors]] = []
    for s in range(len(bounds) - 1):
        checkpoints.append(([p.detach().clone() for p in params], [x.detach().clone() for x in state]))
        params, state = _run_steps(step_loss, optimizer, params, state, w, bounds[s], bounds[s + 1],
                                   differentiable=False)
    info.update(segments=len(checkpoints), num_checkpoints=len(checkpoints),
                checkpoint_bytes=sum(_nbytes(p) + _nbytes(x) for p, x in checkpoints))

    final = [p.detach().requires_grad_(True) for p in params]
    with torch.enable_grad():
        m = metric(final)
    adj_p = list(torch.autograd.grad(m, final, allow_unused=True))
    adj_p = [torch.zeros_like(p) if a is None else a for a, p in zip(adj_p, final)]
    adj_s = [torch.zeros_like(x) for x in state]
    grad_w = torch.zeros_like(w)
    peak = 0

    from tqdm.auto import tqdm

    for s in tqdm(range(len(checkpoints) - 1, -1, -1), desc="metagradient", disable=not progress, leave=False):
        p0, s0 = checkpoints[s]
        counter = _SavedBytes()
        wl = w.clone().requires_grad_(True)
        lp = [p.requires_grad_(True) for p in p0]
        ls = [x.requires_grad_(True) for x in s0]
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
            out_p, out_s = _run_steps(step_loss, optimizer, lp, ls, wl, bounds[s], bounds[s + 1],
                                      differentiable=True)
        peak = max(peak, counter.bytes)
        outs = list(out_p) + list(out_s)
        adjs = adj_p + adj_s
        # Only outputs attached to the graph take part (a state tensor untouched by the
        # segment would be the leaf itself: its adjoint passes through unchanged below).
        pairs = [(o, a) for o, a in zip(outs, adjs) if o.requires_grad]
        inputs = lp + ls + [wl]
        grads = torch.autograd.grad([o for o, _ in pairs], inputs, grad_outputs=[a for _, a in pairs],
                                    allow_unused=True)
        grads = [torch.zeros_like(i) if g is None else g.detach() for g, i in zip(grads, inputs)]
        adj_p = grads[: len(lp)]
        adj_s = grads[len(lp): len(lp) + len(ls)]
        grad_w = grad_w + grads[-1]
        checkpoints[s] = ([], [])  # free the segment's start state as soon as it is used
    info["peak_graph_bytes"] = peak
    return MetagradientOutput(grad=grad_w, metric=float(m.detach()), params=[p.detach() for p in params], info=info)

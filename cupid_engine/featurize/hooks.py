"""Hook-based per-sample gradient sketches: tensorsketch without per-sample gradients.

For a Linear layer the per-sample gradient of sample b is ``G_b = sum_t delta_bt x_bt^T``
(``[O, I]``; ``x`` gets an appended 1 when the layer has a bias, so the last column of
``G_b`` is the bias gradient). A Conv1d is a Linear over time on the unfolded input
(``x_unfold [B, L_out, C_in * kernel]``, ``delta [B, L_out, C_out]``), so the same formula
holds with ``T = L_out``; a Conv2d likewise over its ``H_out * W_out`` output positions
(im2col). Every other supported layer is written in the same factored form
(:func:`layer_matrix_shape` gives each layer's ``[O, I]`` layout):

* GroupNorm / LayerNorm affine: ``G_b[c] = (sum_pos xhat * delta, sum_pos delta)`` per
  channel (``xhat`` recomputed from the captured input), a ``[C, 2]`` matrix written as
  ``sum_j G[:, j] e_j^T`` (``T = 2``);
* Embedding: ``G_b = sum_t e_{idx_t} delta_t^T``, hashed directly from the token indices
  (the one-hot factor is never formed).

Both factors come from one batched forward and backward:

* a forward hook on every tracked module keeps its input ``x`` and its output tensor;
* ``torch.autograd.grad(sum_b f_b, outputs)`` returns ``delta`` for every tracked output
  in one backward, without computing or accumulating any parameter ``.grad``.

Why ``sum_b f_b`` gives *per-sample* deltas: ``d(sum_b f_b)/d out_b = d f_b / d out_b``
whenever row b of a module's output influences no other sample's output, i.e. when
samples do not interact inside the network. Every layer of our policies is row-wise
(Linear, Conv1d/Conv2d over a sample's own time/space axes, GroupNorm/LayerNorm per sample). A
BatchNorm that normalises with *batch* statistics breaks this: every output row then
depends on every input row, the captured delta mixes samples, and the sketch would be
silently wrong. Such BatchNorms (training mode, or ``track_running_stats=False``) are
refused by :func:`check_sample_independent`; BatchNorm in eval mode with running
statistics is a fixed affine map and is fine.

Draw expansion (diffusion ``square``/``loss``/``energy``): a sample is ``draws`` rows of
the expanded batch (contiguous, ``policies.outputs.expand_for_output``) and its output
is the sum of its rows, so its gradient is the sum over its rows of ``delta x^T``: the
rows of one sample simply become extra ``T`` steps (``[B * draws, T, D] -> [B, draws * T,
D]``).

Sketch, fused over layers. Layer l's sketch is ``ops.tensorsketch(delta_l, x_l, seed=s_l)``
= ``irfft(sum_t rfft(CS1_l(delta_t)) * rfft(CS2_l(x_t)))`` with an independent seed per
layer (:func:`layer_seed`), and the whole-gradient sketch is the sum over layers. The
inverse FFT is linear, so we accumulate the spectra of all layers and run ONE ``irfft``
per sample instead of one per layer. The count sketches use the same factor hash tables
as every ``ops`` backend (``reference.countsketch_buckets``), scattered with torch ops
into reused workspace buffers on the tensors' device; very narrow factors take a direct
DFT, and layers with many time steps (Conv1d x draws) hash their ``[O, I]`` gradient
directly when that is smaller and cheaper (:func:`fused_tensorsketch`; the featuriser
streams such Linear/Conv layers from the raw captures chunk of samples by chunk,
:func:`stream_dense_layer`, so their unfolded inputs never exist for a whole batch; a
stride-1 Conv1d is not unfolded at all). On the CPU kernel route a layer with few steps
and a narrow factor (the MLP's input layer and action head) takes ``direct``: its hashed
products accumulated in the time domain inside the kernel call, no FFT. All are exact
evaluations of the same sketch: equal to summing ``ops.tensorsketch`` per layer up to
float rounding (tested).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import platform
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from cupid_engine import constants as C
from cupid_engine.ops import hashing
from cupid_engine.ops import reference
from cupid_engine.ops import spectral

log = logging.getLogger(__name__)

__all__ = ["DFT_MAX_DIM", "STRATEGIES", "layer_seed", "check_sample_independent", "HookCapture", "unfold_conv1d",
           "unfold_conv2d", "gradient_matrix", "layer_matrix_shape", "choose_strategy", "fused_tensorsketch",
           "RawLayer", "dense_layer_shape", "stream_dense_layer", "DENSE_CHUNK_BYTES", "retain_freed_memory"]


def layer_seed(seed: int, name: str) -> int:
    """The tensorsketch seed of tracked layer ``name``.

    ``stream_key(stream_key(seed, STREAM_LAYER), crc32(name))``: derived from the module's
    *name*, not its position, so a layer keeps its sketch whatever else is tracked
    (``track='head'`` and ``track='all'`` sketch the head identically).

    Args:
        seed: Projection seed in ``[0, 2**63)``.
        name: Module name as in ``named_modules``.

    Returns:
        A 32-bit seed.
    """
    return hashing.stream_key(hashing.stream_key(seed, C.STREAM_LAYER), zlib.crc32(name.encode("utf-8")))


def check_sample_independent(policy: nn.Module) -> None:
    """Refuse modules that mix samples of a batch (see module docstring).

    Raises:
        ValueError: naming every BatchNorm that normalises with batch statistics.
    """
    bad = []
    for name, m in policy.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or not m.track_running_stats):
            bad.append(f"{name or '<root>'} ({type(m).__name__})")
    if bad:
        raise ValueError(
            "hook-based featurisation needs samples that do not interact inside the network, but these "
            f"BatchNorm modules normalise with batch statistics: {bad}. Put them in eval mode with running "
            "statistics, or use the torch.func (vmap) path."
        )


def _conv_padding(module: nn.Module) -> list[tuple[int, int]]:
    """``(left, right)`` zero padding per spatial dim of a Conv1d/Conv2d."""
    nd = len(module.kernel_size)
    pad = module.padding
    if isinstance(pad, str):
        if pad == "valid":
            return [(0, 0)] * nd
        out = []
        for i in range(nd):  # "same" (stride 1): torch puts the odd extra element on the right
            total = module.dilation[i] * (module.kernel_size[i] - 1)
            out.append((total // 2, total - total // 2))
        return out
    return [(p, p) for p in pad]


def _im2col_kernel(x: torch.Tensor, pads: list[tuple[int, int]], kernel: tuple[int, int], stride: tuple[int, int],
                   dilation: tuple[int, int], append_one: bool, out: torch.Tensor | None = None) -> torch.Tensor | None:
    """im2col by the C++ kernel (``ops.cpu_backend``; CPU float32/float64), or None where it
    does not apply. ``x`` is ``[R, C, H, W]``; a pure copy, equal to the torch path bit for bit.
    ``out``: a contiguous tensor of the result's shape and dtype to write into (reused buffers)."""
    from cupid_engine.ops import cpu_backend

    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or not cpu_backend.is_available():
        return None
    x = x.contiguous()
    R, C, H, W = x.shape
    (top, bottom), (left, right) = pads
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    Ho = (H + top + bottom - dh * (kh - 1) - 1) // sh + 1
    Wo = (W + left + right - dw * (kw - 1) - 1) // sw + 1
    out = _into(out, (R, max(Ho, 0) * max(Wo, 0), C * kh * kw + int(append_one)), x)
    if R and Ho > 0 and Wo > 0:
        cpu_backend._C().im2col_cpu(x.data_ptr(), out.data_ptr(), R, C, H, W, kh, kw, sh, sw, dh, dw, top, left,
                                    Ho, Wo, bool(append_one), 0 if x.dtype == torch.float32 else 3)
    return out


def _into(out: torch.Tensor | None, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """``out`` checked to be a contiguous ``shape`` tensor of ``like``'s dtype/device, or a fresh one."""
    if out is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    if tuple(out.shape) != tuple(shape) or out.dtype != like.dtype or out.device != like.device \
            or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {list(shape)} {like.dtype} tensor on {like.device}, got "
                         f"{list(out.shape)} {out.dtype} on {out.device}")
    return out


def _conv1d_geometry(module: nn.Conv1d) -> tuple[int, int, int, int, int]:
    """``(left pad, right pad, kernel K, dilation, stride)`` of a Conv1d the hook path can
    unfold into a Linear.

    Raises:
        ValueError: grouped convolutions or non-zero padding modes.
    """
    if module.groups != 1 or module.padding_mode != "zeros":
        raise ValueError(
            f"Conv1d with groups={module.groups}, padding_mode={module.padding_mode!r} cannot be unfolded "
            "into a Linear: only groups=1 and zero padding are supported"
        )
    (left, right), = _conv_padding(module)
    return left, right, module.kernel_size[0], module.dilation[0], module.stride[0]


def unfold_conv1d(module: nn.Conv1d, x: torch.Tensor, *, append_one: bool = False,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """Unfold a Conv1d input into Linear rows: ``[R, C_in, L] -> [R, L_out, C_in * kernel (+1)]``.

    Column ``c * kernel + j`` holds input channel ``c`` at tap ``j``, matching
    ``weight.reshape(C_out, C_in * kernel)``; padding, stride and dilation are honoured.
    With ``append_one`` a last column of ones (the bias input) is written in the same
    pass: the unfolded input is the largest tensor of the hook path, so it is built with
    one copy (on CPU float32/float64 the C++ im2col, :func:`_im2col_kernel`; elsewhere a
    strided window view copied into place) rather than unfold + transpose + cat. ``out``
    (a contiguous tensor of the result's shape) is written into instead of a fresh one.

    Raises:
        ValueError: grouped convolutions or non-zero padding modes.
    """
    left, right, K, d, st = _conv1d_geometry(module)
    fast = _im2col_kernel(x.unsqueeze(2), [(0, 0), (left, right)], (1, K), (1, st), (1, d), append_one, out)
    if fast is not None:
        return fast
    if left or right:
        x = F.pad(x, (left, right))
    win = x.unfold(2, d * (K - 1) + 1, st)[..., ::d]  # [R, C_in, L_out, K], a view
    R, C, L = win.shape[:3]
    out = _into(out, (R, L, C * K + int(append_one)), x)
    out[..., : C * K].unflatten(-1, (C, K)).copy_(win.permute(0, 2, 1, 3))
    if append_one:
        out[..., -1] = 1
    return out


def unfold_conv2d(module: nn.Conv2d, x: torch.Tensor, *, append_one: bool = False,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """im2col of a Conv2d input: ``[R, C_in, H, W] -> [R, H_out * W_out, C_in * kh * kw (+1)]``.

    Column ``(c * kh + i) * kw + j`` holds input channel ``c`` at tap ``(i, j)``, matching
    ``weight.reshape(C_out, -1)``; rows are output positions in row-major ``(h, w)``
    order, matching ``delta.flatten(2)``. Padding (numbers, ``"same"``, ``"valid"``),
    stride and dilation are honoured; a last column of ones is the bias input. ``out`` (a
    contiguous tensor of the result's shape) is written into instead of a fresh one.

    Raises:
        ValueError: grouped convolutions or non-zero padding modes.
    """
    if module.groups != 1 or module.padding_mode != "zeros":
        raise ValueError(
            f"Conv2d with groups={module.groups}, padding_mode={module.padding_mode!r} cannot be unfolded "
            "into a Linear: only groups=1 and zero padding are supported"
        )
    (top, bottom), (left, right) = _conv_padding(module)
    (kh, kw), (dh, dw), (sh, sw) = module.kernel_size, module.dilation, module.stride
    fast = _im2col_kernel(x, [(top, bottom), (left, right)], (kh, kw), (sh, sw), (dh, dw), append_one, out)
    if fast is not None:
        return fast
    if top or bottom or left or right:
        x = F.pad(x, (left, right, top, bottom))
    # Else a strided window view copied once into place: F.unfold (aten::im2col) is a slow
    # single-threaded loop on CPU (~6x the conv's forward time at 84x84 here), and its
    # [R, C*kh*kw, L] layout would need a second, transposing copy. That torch copy runs an
    # innermost loop of kw elements (2.3-4.3 ns per element), hence the C++ kernel on CPU.
    win = x.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)[..., ::dh, ::dw]  # [R, C, Ho, Wo, kh, kw]
    R, C, Ho, Wo = win.shape[:4]
    n = C * kh * kw
    out = _into(out, (R, Ho * Wo, n + int(append_one)), x)
    out[..., :n].unflatten(1, (Ho, Wo)).unflatten(-1, (C, kh, kw)).copy_(win.permute(0, 2, 3, 1, 4, 5))
    if append_one:
        out[..., -1] = 1
    return out


def _has(module: nn.Module, pname: str) -> bool:
    p = getattr(module, pname, None)
    return isinstance(p, torch.Tensor) and p.requires_grad


def layer_matrix_shape(module: nn.Module) -> tuple[int, int]:
    """``(O, I)`` of the per-sample gradient matrix the hook path sketches for ``module``.

    The layout (the coordinates the tensorsketch hashes, see :func:`gradient_matrix`):

    * Linear / Conv1d / Conv2d: ``[C_out, fan_in (+1)]``: ``weight.reshape(C_out, -1)``
      with the bias (when trainable) as the last column;
    * GroupNorm / LayerNorm: ``[n, #trainable of (weight, bias)]``: one column per
      affine parameter, flattened (``n`` = channels / ``prod(normalized_shape)``);
    * Embedding: ``[num_embeddings, embedding_dim]``, the weight itself.
    """
    if isinstance(module, (nn.GroupNorm, nn.LayerNorm)):
        n = module.num_channels if isinstance(module, nn.GroupNorm) else math.prod(module.normalized_shape)
        return n, int(_has(module, "weight")) + int(_has(module, "bias"))
    w = module.weight
    if isinstance(module, nn.Embedding):
        return int(w.shape[0]), int(w.shape[1])
    return int(w.shape[0]), int(w[0].numel()) + int(_has(module, "bias"))


def gradient_matrix(module: nn.Module, grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """The per-sample gradient matrix ``[B, O, I]`` (:func:`layer_matrix_shape`) from
    per-parameter gradients ``{"weight": [B, *w.shape], "bias": [B, *b.shape]}`` (the
    torch.func path's output): the definition the hook sketch is tested against."""
    if isinstance(module, (nn.GroupNorm, nn.LayerNorm)):
        cols = [grads[p].reshape(grads[p].shape[0], -1) for p in ("weight", "bias") if _has(module, p)]
        return torch.stack(cols, dim=-1)
    w = grads["weight"]
    if isinstance(module, nn.Embedding):
        return w
    m = w.reshape(w.shape[0], w.shape[1], -1)
    if _has(module, "bias"):
        m = torch.cat((m, grads["bias"].unsqueeze(-1)), dim=-1)
    return m


class HookCapture:
    """Forward hooks that keep the input and output of every tracked module.

    Use as a context manager around one forward pass; then :meth:`factors` runs the
    backward and returns the per-sample factors of every captured call.
    """

    def __init__(self, modules: Sequence[tuple[str, nn.Module]]):
        self.modules = list(modules)
        self._calls: list[tuple[str, nn.Module, torch.Tensor, torch.Tensor]] = []
        self._handles: list = []

    def __enter__(self) -> HookCapture:
        self._calls.clear()
        for name, module in self.modules:
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            # A module called twice in one forward (shared weights) is captured twice:
            # its gradient is the sum over calls, i.e. more T steps.
            self._calls.append((name, module, inputs[0].detach(), output))

        return hook

    def uncalled(self) -> list[tuple[str, nn.Module]]:
        """Tracked modules whose forward did not run in the captured pass."""
        called = {id(c[1]) for c in self._calls}
        return [(n, m) for n, m in self.modules if id(m) not in called]

    def factors(self, total: torch.Tensor, groups: int) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """Backprop ``total`` and return the per-sample factors of every captured call.

        Args:
            total: Scalar ``sum`` of the per-row outputs.
            groups: Number of samples B; the R captured rows are ``R / B`` contiguous rows
                per sample.

        Returns:
            ``[(name, delta, x)]`` in capture order with ``G_b = sum_t delta_bt x_bt^T``
            the layer's per-sample gradient matrix (:func:`layer_matrix_shape`):
            ``delta [B, T, O]`` and ``x [B, T, I]`` floats, except for an Embedding,
            whose row factor is one-hot: ``delta`` is then the ``[B, T]`` int64 token
            index (``-1``: a padding token, no gradient) and ``x [B, T, D]`` the output
            gradient. Calls whose output does not influence ``total`` are left out (zero
            gradient).

        Raises:
            ValueError: a tracked module that was not called although its parameters
                influence ``total`` (used outside its forward: the hooks would miss it).
        """
        out = [(name, *self._layer(name, module, x, y, delta, groups)) for name, module, x, y, delta in self.raw(total)]
        return out

    def raw(self, total: torch.Tensor) -> list[tuple[str, nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Backprop ``total``; ``[(name, module, x, y, delta)]`` of every captured call whose
        output influences it, as the module saw them (``delta = d total / d y``), before
        any layout (:meth:`factors` lays them out; :func:`stream_dense_layer` consumes them
        without materialising the unfolded inputs). Clears the captures.

        Raises:
            ValueError: as :meth:`factors`.
        """
        calls = [c for c in self._calls if c[3].requires_grad]
        # Tracked modules never called: their parameters must not influence the output,
        # else they are used functionally (e.g. MultiheadAttention.out_proj) and the hook
        # path would silently leave them out.
        ghost = [(n, p) for n, m in self.uncalled() for p in m.parameters(recurse=False) if p.requires_grad]
        if not calls and not ghost:
            return []
        grads = torch.autograd.grad(
            total, [c[3] for c in calls] + [p for _, p in ghost], allow_unused=True
        )
        used = sorted({n for (n, _), g in zip(ghost, grads[len(calls):]) if g is not None})
        if used:
            raise ValueError(
                f"tracked modules {used} influence the output but their forward never ran: their parameters are "
                "used outside the module (e.g. F.linear(x, module.weight), nn.MultiheadAttention's out_proj), "
                "which the hook path cannot capture; call the module itself, leave it untracked, or use the "
                "torch.func (vmap) path"
            )
        out = [(name, module, x, y, delta) for (name, module, x, y), delta in zip(calls, grads) if delta is not None]
        self._calls.clear()
        return out

    @staticmethod
    def _layer(
        name: str, module: nn.Module, x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor, groups: int,
        workspace: _Workspace | None = None, bias_column: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One call's factors (see :meth:`factors`). With ``workspace``, a Linear's input
        with its bias column is written into the workspace buffer ``lin_x_<name>`` instead
        of a fresh ``torch.cat`` (same values; the caller must consume the factors before
        the next batch reuses the buffer, and a module called twice shares the name, so
        only a caller that consumes each call's factors before laying out the next may
        pass it). ``bias_column=False``: a Linear's ``x`` comes without its trailing
        column of ones (a view of the capture, no copy), for a caller that passes it to
        :func:`fused_tensorsketch` as an implicit-bias factor ``(seed, delta, x, True)``."""
        rows = x.shape[0]
        if rows % groups:
            raise RuntimeError(f"module {name!r}: {rows} captured rows do not split into {groups} samples")
        per = rows // groups
        if isinstance(module, nn.Embedding):
            idx = x.reshape(groups, -1).long()
            d = delta.reshape(groups, -1, delta.shape[-1])
            if module.padding_idx is not None:  # torch gives the padding row no gradient
                idx = torch.where(idx == module.padding_idx, -1, idx)
            return idx, d
        if isinstance(module, (nn.GroupNorm, nn.LayerNorm)):
            if isinstance(module, nn.GroupNorm):
                xhat = F.group_norm(x, module.num_groups, eps=module.eps)
                red = tuple(range(2, x.dim()))  # spatial dims: one gradient entry per channel
                gw = (xhat * delta).sum(red) if red else xhat * delta  # [R, C]
                gb = delta.sum(red) if red else delta
            else:
                xhat = F.layer_norm(x, module.normalized_shape, eps=module.eps)
                nd = len(module.normalized_shape)
                lead = tuple(range(1, x.dim() - nd))  # tokens etc. of one row
                gw = (xhat * delta).sum(lead) if lead else xhat * delta
                gb = delta.sum(lead) if lead else delta
                gw, gb = gw.reshape(rows, -1), gb.reshape(rows, -1)
            cols = [g for g, p in ((gw, "weight"), (gb, "bias")) if _has(module, p)]
            G = torch.stack(cols, dim=-1).reshape(groups, per, gw.shape[1], len(cols)).sum(1)  # [B, n, c]
            # G = sum_j G[:, j] e_j^T: a T = c factorisation, hashed like any other layer.
            eye = torch.eye(len(cols), dtype=G.dtype, device=G.device).expand(groups, -1, -1)
            return G.transpose(1, 2), eye
        bias = _has(module, "bias")
        if isinstance(module, nn.Conv1d):
            x = unfold_conv1d(module, x, append_one=bias)  # [R, L_out, C_in*K (+1)]
            delta = delta.transpose(1, 2)  # [R, C_out, L_out] -> [R, L_out, C_out]
        elif isinstance(module, nn.Conv2d):
            x = unfold_conv2d(module, x, append_one=bias)  # [R, H_out*W_out, C_in*kh*kw (+1)]
            delta = delta.flatten(2).transpose(1, 2)  # [R, C_out, H', W'] -> [R, H'*W', C_out]
        else:  # Linear: [R, *, I] -> [R, T, I]
            x = x.reshape(x.shape[0], -1, x.shape[-1])
            delta = delta.reshape(delta.shape[0], -1, delta.shape[-1])
            if not bias_column:
                pass
            elif bias and workspace is not None:
                buf = workspace.get(f"lin_x_{name}", x.shape[:-1] + (x.shape[-1] + 1,), x.dtype, x.device)
                buf[..., :-1].copy_(x)
                buf[..., -1] = 1
                x = buf
            elif bias:
                x = torch.cat((x, x.new_ones(x.shape[:-1] + (1,))), dim=-1)
        # Rows of one sample are contiguous: fold them into T.
        x = x.reshape(groups, per * x.shape[1], x.shape[2])
        delta = delta.reshape(groups, per * delta.shape[1], delta.shape[2])
        return delta, x


DFT_MAX_DIM = 16
"""Factors at most this wide get their spectrum by a direct DFT (a ``[n, k/2+1]`` complex
matmul) instead of a scatter + FFT: ``n`` hashed one-hots have a closed-form spectrum,
and for small ``n`` (e.g. the 7-wide action head) the matmul is far cheaper than a
length-k FFT."""

STRATEGIES = ("auto", "fft", "dense", "direct")


@functools.lru_cache(maxsize=512)
def _dft_table(seed: int, stream: int, n: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """Spectra ``[n, k/2+1]`` (complex ``dtype``) of the n hashed one-hots of one factor:
    ``rfft(CS(e_j))[f] = s_j exp(-2 pi i h_j f / k)``."""
    b, sg = reference.countsketch_buckets(seed, stream, n, k)
    f = torch.arange(k // 2 + 1, dtype=torch.float64)
    ang = (-2.0 * math.pi / k) * torch.remainder(b.to(torch.float64)[:, None] * f[None, :], k)
    s = sg.to(torch.float64)[:, None]
    return torch.complex(s * torch.cos(ang), s * torch.sin(ang)).to(dtype)


@functools.lru_cache(maxsize=512)
def _factor_hash(seed: int, stream: int, n: int, k: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Buckets (int64) and signs (``dtype``) ``[n]`` of one tensorsketch factor."""
    b, sg = reference.countsketch_buckets(seed, stream, n, k)
    return b, sg.to(dtype)


# glibc malloc settings for a featurising process (:func:`retain_freed_memory`).
HEAP_MMAP_THRESHOLD = 32 << 20  # glibc's own ceiling for the (otherwise adaptive) threshold
HEAP_TRIM_THRESHOLD = 256 << 20
_heap_state: dict[str, Any] = {}
_heap_lock = threading.Lock()


def retain_freed_memory() -> bool:
    """Keep this process's freed heap memory mapped instead of handing it back to the OS
    (glibc ``mallopt``: ``M_MMAP_THRESHOLD`` fixed at :data:`HEAP_MMAP_THRESHOLD`,
    ``M_TRIM_THRESHOLD`` :data:`HEAP_TRIM_THRESHOLD`); once per process, logged.

    Why: a hook call on CPU allocates tens of MiB of fresh tensors per batch (the ``[B, k]``
    features, the captured activations and output gradients: ~30 MiB for the 0.5M MLP at
    B = 1024), and glibc returns freed blocks to the OS (large blocks ``mmap``-ed, the heap
    top trimmed past an adaptive threshold), so whether the next call's tensors land on
    fresh pages depends on the allocator's state: such calls took 7-9k minor page faults,
    ~3 us each (MLP hook call 58-66 ms instead of 44-47 ms, issue 19). With these settings
    blocks under 32 MiB come from the heap and up to 256 MiB of free memory stays at its
    top, so repeated calls of one shape reuse warm pages. Blocks of 32 MiB and more are
    still ``mmap``-ed and returned. Nothing computed changes (same bytes, tested); the
    process's resident memory no longer shrinks after a peak by more than the trim margin.

    Process-wide (the allocator is), so :class:`Featurizer` calls it on its first CPU
    hook-path batch; ``CUPID_RETAIN_FREED_MEMORY=0`` in the environment leaves the
    allocator as it is, and so does a process that set ``MALLOC_MMAP_THRESHOLD_`` or
    ``MALLOC_TRIM_THRESHOLD_`` itself (both logged). Not glibc (musl, macOS): nothing is
    set, and that is logged.

    Returns:
        Whether the settings are in effect in this process.
    """
    with _heap_lock:
        if "applied" in _heap_state:
            return _heap_state["applied"]
        applied = False
        own = sorted(v for v in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_") if v in os.environ)
        if os.environ.get("CUPID_RETAIN_FREED_MEMORY", "1") == "0":
            log.info("retain_freed_memory: CUPID_RETAIN_FREED_MEMORY=0, malloc settings left as they are")
        elif own:
            log.info("retain_freed_memory: %s set in the environment, malloc settings left as they are", ", ".join(own))
        elif platform.libc_ver()[0] != "glibc":
            log.info("retain_freed_memory: not glibc (%s), malloc settings left as they are",
                     platform.libc_ver()[0] or "unknown libc")
        else:
            import ctypes

            libc = ctypes.CDLL(None)
            m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
            ok_mmap = libc.mallopt(m_mmap_threshold, HEAP_MMAP_THRESHOLD) == 1
            ok_trim = libc.mallopt(m_trim_threshold, HEAP_TRIM_THRESHOLD) == 1
            applied = ok_mmap and ok_trim
            if applied:
                log.info("retain_freed_memory: glibc M_MMAP_THRESHOLD=%d, M_TRIM_THRESHOLD=%d (freed blocks kept "
                         "for the next batch; CUPID_RETAIN_FREED_MEMORY=0 to leave malloc as it is)",
                         HEAP_MMAP_THRESHOLD, HEAP_TRIM_THRESHOLD)
            else:
                log.warning("retain_freed_memory: mallopt refused (M_MMAP_THRESHOLD %s, M_TRIM_THRESHOLD %s)",
                            "ok" if ok_mmap else "refused", "ok" if ok_trim else "refused")
        _heap_state["applied"] = applied
        return applied


class _Workspace:
    """Reusable scratch tensors. Fresh multi-MiB tensors cost page faults on every call
    (the allocator hands large blocks back to the OS); reusing them across layers and
    batches roughly halves the FFT stage on CPU."""

    def __init__(self) -> None:
        self._bufs: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        t = self._bufs.get(name)
        numel = math.prod(shape)
        if t is None or t.dtype != dtype or t.device != device or t.numel() < numel:
            t = torch.empty(numel, dtype=dtype, device=device)
            self._bufs[name] = t
        return t[:numel].view(shape)


@functools.lru_cache(maxsize=256)
def _dense_table(seed: int, O: int, I: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bucket ``[O * I]`` int64 and sign ``[O * I]`` of vec(G) (row-major), as
    ``reference.tensorsketch_materialized`` hashes it."""
    b1, s1 = reference.countsketch_buckets(seed, C.STREAM_TS_OUT, O, k)
    b2, s2 = reference.countsketch_buckets(seed, C.STREAM_TS_IN, I, k)
    return ((b1[:, None] + b2[None, :]) % k).reshape(-1), (s1[:, None] * s2[None, :]).reshape(-1)


def kernel_route(k: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> bool:
    """Whether :func:`fused_tensorsketch` evaluates its ``fft`` layers with the C++ lane-FFT
    kernel (``ops.cpu_backend.tensorsketch_fft_layers``): CPU tensors, float32/float64, the
    extension built and ``k`` a power of two >= 8. Otherwise the torch route (scatter into
    workspace buffers, ``torch.fft``) runs, as on GPUs."""
    from cupid_engine.ops import cpu_backend

    return (torch.device(device).type == "cpu" and dtype in (torch.float32, torch.float64)
            and cpu_backend.fft_kernel_supports(k) and cpu_backend.is_available())


def choose_strategy(strategy: str, T: int, O: int, I: int, k: int, device: torch.device | str = "cpu") -> str:
    """``fft`` (sum_t of factor spectra), ``dense`` (hash the layer's ``[O, I]`` gradient) or,
    on the C++ kernel route, ``direct`` (the ``T O I`` hashed products accumulated in the
    time domain inside the kernel call, ``ops.tensorsketch_plan``).

    ``dense`` forms one layer's per-sample gradient for the batch, so it is taken only
    when that is *smaller* than the ``[T, k]`` count sketches the FFT route would hold
    per sample (``O * I <= T * k``: conv layers with many time steps x draws) and, by the
    cost model, is cheaper; the whole model's per-sample gradient still never exists, and
    memory stays bounded by the largest layer, independent of how many are tracked.
    ``direct`` holds nothing per layer (one ``[k]`` accumulator per lane group), so it is
    a candidate whatever the shapes: it wins for a narrow factor with few steps (the
    MLP's 41-wide input layer and 7-wide head: a few thousand products against two
    4096-point transforms).

    The cost model: where the C++ kernel runs (:func:`kernel_route`), the measured model
    of ``ops.tensorsketch_plan`` (seconds per sample of the kernel's FFTs and scatter vs
    the GEMM and the hash of ``G`` vs the direct products; ties go to ``fft``, then
    ``direct``); elsewhere (GPU, ``k`` not a power of two) the flop estimate
    ``T (5 k log2 k + 4k)`` vs ``2 T O I + 4 O I`` between ``fft`` and ``dense``.
    """
    if strategy != "auto":
        return strategy
    if kernel_route(k, device):
        from cupid_engine.ops import tensorsketch_plan

        # Per sample; the inverse FFT is shared by all fused layers, so a layer adds 2T FFTs.
        est = tensorsketch_plan.estimate(tensorsketch_plan.DEFAULT_COST.lanes, T, O, I, k, inverse=False)
        cands = ("fft", "direct", "dense") if O * I <= T * k else ("fft", "direct")
        return min(cands, key=lambda r: est[r])  # first of equals: fft, direct, dense
    if O * I > T * k:
        return "fft"
    fft_flops = T * (2 * 2.5 * k * math.log2(k) + 4 * k)
    dense_flops = 2 * T * O * I + 4 * O * I
    return "dense" if dense_flops < fft_flops else "fft"


def _spectrum(
    v: torch.Tensor, seed: int, stream: int, k: int, acc: torch.dtype, ws: _Workspace, name: str
) -> torch.Tensor:
    """``rfft(CS(v_t))`` ``[B, T, k/2+1]`` of one factor ``[B, T, n]`` (a workspace view)."""
    B, T, n = v.shape
    cdtype = torch.complex128 if acc == torch.float64 else torch.complex64
    out = ws.get("spec_" + name, (B, T, k // 2 + 1), cdtype, v.device)
    if n <= DFT_MAX_DIM:
        table = _dft_table(seed, stream, n, k, cdtype).to(v.device)
        return spectral.dft_spectrum(v, table, out)  # fixed order: thread/batch-split independent
    b, sg = _factor_hash(seed, stream, n, k, acc)
    b, sg = b.to(v.device), sg.to(v.device)
    cs = ws.get("cs_" + name, (B, T, k), acc, v.device).zero_()
    cs.scatter_add_(-1, b.expand(B, T, n), v.to(acc) * sg)
    torch.fft.rfft(cs, n=k, dim=-1, out=out)
    return out


DENSE_CHUNK_BYTES = 64 << 20
"""Bytes of one chunk's unfolded inputs + laid-out output gradients in
:func:`stream_dense_layer`: its buffers are reused across chunks, layers and batches, so
the unfolded inputs (the largest tensors of the hook path: ~1 GB for the UNet at 64
samples x 64 draws) are never materialised whole, and never page-faulted in afresh.
Measured on the UNet (2026-12-06, 2 shared cores, load 6-9): on one thread 8 MiB chunks
cost 6% less CPU than 64 MiB, but with two threads every op of a chunk is a parallel
region that waits for a second core other processes hold, and 8 MiB chunks (8x the
regions) ran 1.5-2x slower; 64 MiB keeps the region count low."""


class RawLayer(NamedTuple):
    """A captured Linear/Conv1d/Conv2d call, not laid out (``HookCapture.raw``), for
    :func:`fused_tensorsketch` to stream through the ``dense`` route
    (:func:`stream_dense_layer`) in place of its ``(seed, delta, x)`` factors."""

    seed: int
    module: nn.Module
    x: torch.Tensor
    delta: torch.Tensor
    groups: int


def dense_layer_shape(module: nn.Module, x: torch.Tensor, delta: torch.Tensor, groups: int) -> tuple[int, int, int] | None:
    """``(T, O, I)`` of the factors ``HookCapture.factors`` would lay out for a captured
    Linear/Conv1d/Conv2d call (input ``x``, output gradient ``delta``, ``groups`` samples),
    without forming them; None for the other modules (norms, Embedding)."""
    if isinstance(module, (nn.GroupNorm, nn.LayerNorm, nn.Embedding)):
        return None
    per = x.shape[0] // groups
    bias = int(_has(module, "bias"))
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return per * math.prod(delta.shape[2:]), int(delta.shape[1]), int(module.weight[0].numel()) + bias
    return per * math.prod(x.shape[1:-1]), int(delta.shape[-1]), int(x.shape[-1]) + bias


def _unfold_conv1d_tap_major(module: nn.Conv1d, x: torch.Tensor, bias: bool, ws: _Workspace) -> torch.Tensor:
    """Conv1d input unfolded tap-major: ``[R, C_in, L] -> [R, L_out, K * C_in (+1)]``, column
    ``j * C_in + c`` = input channel ``c`` at tap ``j`` (a workspace view).

    The layout's column order is channel-major (``c * K + j``, :func:`unfold_conv1d`), whose
    copy has an innermost run of K elements (2-5 here) and ran at ~1.5 GB/s on the UNet's
    captures; tap-major, the input is transposed once to ``[R, L_pad, C_in]`` (K times
    smaller) and every ``(row, position)`` then copies K runs of ``C_in`` contiguous
    values, about twice as fast. :func:`stream_dense_layer` permutes the small ``[O, I]``
    GEMM result back to the layout's order (a column permutation of the GEMM's right-hand
    side: each entry of ``G`` is the same dot product over the steps)."""
    left, right, K, d, st = _conv1d_geometry(module)
    R, C, L = x.shape
    Lp = L + left + right
    Lo = (Lp - d * (K - 1) - 1) // st + 1
    xt = ws.get("dense_xt", (R, Lp, C), x.dtype, x.device)
    if left:
        xt[:, :left].zero_()
    if right:
        xt[:, Lp - right:].zero_()
    xt[:, left:left + L].copy_(x.transpose(1, 2))
    out = ws.get("dense_x", (R, Lo, K * C + int(bias)), x.dtype, x.device)
    out[..., : K * C].view(R, Lo, K, C).copy_(xt.as_strided((R, Lo, K, C), (Lp * C, st * C, d * C, 1)))
    if bias:
        out[..., -1] = 1
    return out


def _conv1d_taps_layout(module: nn.Conv1d, xs: torch.Tensor, ds: torch.Tensor, b: int, per: int, ws: _Workspace,
                        acc: torch.dtype) -> tuple[Callable[[int], torch.Tensor], torch.Tensor, int, int]:
    """Position-major layout of a stride-1 Conv1d chunk for the per-tap GEMMs
    (:func:`_conv1d_taps_gemm`, :func:`_conv1d_taps_hash`).

    Returns ``(taps, dT, K, C_in)``: ``dT [b, O, T]`` (``T = L_out * per`` steps, ordered
    ``(position, draw)``) and ``taps(j)`` the ``[b, T, C_in]`` input rows tap ``j`` meets (a
    shifted view of ``xt [b, L_pad, per, C_in]``, zero rows at the padding; a copy only
    where ``acc`` differs from the captured dtype), so ``G_j = dT @ taps(j)``."""
    left, right, K, d, _ = _conv1d_geometry(module)
    _, C, L = xs.shape
    O, Lo = ds.shape[1], ds.shape[2]
    Lp = L + left + right
    xt = ws.get("dense_xt", (b, Lp, per, C), xs.dtype, xs.device)
    if left:
        xt[:, :left].zero_()
    if right:
        xt[:, left + L:].zero_()
    xt[:, left:left + L].copy_(xs.view(b, per, C, L).permute(0, 3, 1, 2))
    db = ws.get("dense_d", (b, Lo, per, O), ds.dtype, ds.device)
    db.copy_(ds.view(b, per, O, Lo).permute(0, 3, 1, 2))
    dT = db.view(b, Lo * per, O).to(acc).transpose(1, 2)  # [b, O, T]

    def taps(j: int) -> torch.Tensor:
        return xt[:, j * d:j * d + Lo].reshape(b, Lo * per, C).to(acc)

    return taps, dT, K, C


def _conv1d_taps_gemm(module: nn.Conv1d, xs: torch.Tensor, ds: torch.Tensor, b: int, per: int, bias: bool,
                      ws: _Workspace, acc: torch.dtype, G: torch.Tensor) -> None:
    """``G [b, O, I]`` (the layout's column order, :func:`unfold_conv1d`) of a stride-1 Conv1d
    chunk, without unfolding the input: one GEMM per tap over a shifted view.

    The captured rows of a sample (its ``per`` draws) are laid out position-major,
    ``xt [b, L_pad, per, C_in]`` (zero rows at the padding positions) and
    ``delta [b, L_out, per, O]``; the steps are then ``(position, draw)`` pairs, and the
    input rows tap ``j`` meets are the ``L_out * per`` consecutive rows of ``xt`` from
    position ``j * dilation``: a plain strided view, so ``G_j = delta^T xt_j`` is one batched
    GEMM per tap reading the input in place. The unfolded input (``K`` copies of it, the
    largest tensor of the dense route: ~40% of its time on the UNet) is never written, and
    no position is computed twice (a row-major layout would need padding between rows,
    25-100% extra GEMM flops at the UNet's 16/8/4 positions). The bias column is
    ``sum_t delta_t``. The same products as the unfolded GEMM, summed in another order: a
    float-rounding change (float64 parity, tests/featurize/test_stream_dense.py)."""
    taps, dT, K, C = _conv1d_taps_layout(module, xs, ds, b, per, ws, acc)
    O = dT.shape[1]
    Gt = ws.get("dense_gt", (K, b, O, C), acc, xs.device)
    for j in range(K):
        torch.bmm(dT, taps(j), out=Gt[j])
    G[..., :K * C].view(b, O, C, K).copy_(Gt.permute(1, 2, 3, 0))
    if bias:
        G[..., -1] = dT.sum(-1)


@functools.lru_cache(maxsize=256)
def _tap_tables(seed: int, O: int, I: int, k: int, taps: int) -> tuple[torch.Tensor, ...]:
    """Hash tables of a Conv1d layer's ``G [O, C_in * taps (+1)]`` split by tap:
    ``(b1, s1, [(b2_j, s2_j)] per tap j (columns c * taps + j), (b2, s2) of the bias column)``."""
    from cupid_engine.ops import cpu_backend

    b1, s1, b2, s2 = cpu_backend._tables(seed, O, I, k)
    C = (I // taps) if I % taps == 0 else (I - 1) // taps
    per_tap = tuple((b2[:C * taps].view(C, taps)[:, j].contiguous(), s2[:C * taps].view(C, taps)[:, j].contiguous())
                    for j in range(taps))
    return b1, s1, per_tap, (b2[C * taps:].contiguous(), s2[C * taps:].contiguous())


def _conv1d_taps_hash(module: nn.Conv1d, xs: torch.Tensor, ds: torch.Tensor, b: int, per: int, bias: bool,
                      ws: _Workspace, acc: torch.dtype, seed: int, k: int, out: torch.Tensor) -> None:
    """``out [b, k] +=`` the hashed ``G`` of a stride-1 Conv1d chunk on the kernel route: as
    :func:`_conv1d_taps_gemm`, but each tap's ``G_j [b, O, C_in]`` is hashed as it comes
    (with the bucket/sign tables of its columns ``c * K + j``), so ``G`` is never assembled
    in the layout's column order (one permuting copy less). Tap-major hashing order: a
    float-rounding change only (float64 parity, tests/featurize/test_stream_dense.py)."""
    from cupid_engine.ops import cpu_backend

    taps, dT, K, C = _conv1d_taps_layout(module, xs, ds, b, per, ws, acc)
    O = dT.shape[1]
    I = K * C + int(bias)
    b1, s1, per_tap, (bb, sb) = _tap_tables(seed, O, I, k, K)
    Gj = ws.get("dense_gt", (b, O, C), acc, xs.device)
    code = cpu_backend._DTYPES[acc]
    lib = cpu_backend._C()
    for j in range(K):
        torch.bmm(dT, taps(j), out=Gj)
        b2, s2 = per_tap[j]
        lib.hash_gradient_cpu(Gj.data_ptr(), b1.data_ptr(), s1.data_ptr(), b2.data_ptr(), s2.data_ptr(),
                              out.data_ptr(), b, O, C, k, code, True)
    if bias:
        gb = ws.get("dense_gb", (b, O), acc, xs.device)
        torch.sum(dT, dim=-1, out=gb)
        lib.hash_gradient_cpu(gb.data_ptr(), b1.data_ptr(), s1.data_ptr(), bb.data_ptr(), sb.data_ptr(),
                              out.data_ptr(), b, O, 1, k, code, True)


def stream_dense_layer(layer: RawLayer, k: int, out: torch.Tensor, ws: _Workspace, acc: torch.dtype) -> None:
    """``out [B, k] +=`` the hashed per-sample gradient ``G = sum_t delta_t x_t^T`` of one
    captured Linear/Conv1d/Conv2d call, formed chunk of samples by chunk of samples.

    Per chunk the inputs are laid out (im2col, bias column) and the output gradients
    ``[b, T, O]`` into reused workspace buffers, ``G [b, O, I]`` is one batched GEMM and is
    hashed into the chunk's rows of ``out`` (C++ ``hash_gradient`` on the kernel route,
    ``scatter_add_`` elsewhere). A stride-1 Conv1d is not unfolded at all: one GEMM per tap
    over a shifted view of its position-major input (:func:`_conv1d_taps_gemm`; a
    float-rounding change against the unfolded GEMM, issue 19); a 1x1 Conv1d's unfold is a
    transposing copy. Every sample's GEMMs and hash are independent of the others in its
    batch, so a row is the same bit for bit whatever the chunk; against the dense route on
    ``HookCapture.factors`` output it is the same up to that rounding, with bounded peak
    memory (one chunk of :data:`DENSE_CHUNK_BYTES`, not every layer's whole batch). On a
    GPU the chunk is the whole batch.
    """
    module, x, delta, groups = layer.module, layer.x, layer.delta, layer.groups
    T, O, I = dense_layer_shape(module, x, delta, groups)
    per = x.shape[0] // groups
    steps = T // per  # time steps / positions of one captured row
    bias = _has(module, "bias")
    device = x.device
    if device.type == "cpu":
        chunk = max(1, DENSE_CHUNK_BYTES // max(1, T * (I + O) * x.element_size()))
    else:
        chunk = groups
    use_kernel = kernel_route(k, device, acc)
    if not use_kernel:
        bucket, sign = _dense_table(layer.seed, O, I, k)
        bucket, sign = bucket.to(device), sign.to(device=device, dtype=acc)
    conv = isinstance(module, (nn.Conv1d, nn.Conv2d))
    conv1d = isinstance(module, nn.Conv1d)
    taps = module.kernel_size[0] if conv1d else 1
    stride1 = conv1d and module.stride[0] == 1
    shifted = stride1 and taps > 1  # one GEMM per tap over a shifted view, no unfold
    # A 1x1 Conv1d without padding: its unfold is a transpose, and torch's transposing
    # copy is faster than the im2col kernel's one-element runs (same values).
    pointwise = stride1 and taps == 1 and _conv1d_geometry(module)[:2] == (0, 0)
    for a in range(0, groups, chunk):
        e = min(groups, a + chunk)
        b, r0, r1 = e - a, a * per, e * per
        xs, ds = x[r0:r1], delta[r0:r1]
        if shifted and use_kernel:
            _conv1d_taps_hash(module, xs, ds, b, per, bias, ws, acc, layer.seed, k, out[a:e])
            continue
        G = ws.get("dense_g", (b, O, I), acc, device)
        if shifted:
            _conv1d_taps_gemm(module, xs, ds, b, per, bias, ws, acc, G)
        elif taps > 1:  # strided Conv1d: unfolded tap-major, G's columns put back in the layout's order
            xb = _unfold_conv1d_tap_major(module, xs, bias, ws)
            db = ws.get("dense_d", (r1 - r0, steps, O), delta.dtype, device)
            db.copy_(ds.transpose(1, 2))
            Gt = ws.get("dense_gt", (b, O, I), acc, device)
            torch.bmm(db.reshape(b, T, O).to(acc).transpose(1, 2), xb.reshape(b, T, I).to(acc), out=Gt)
            n = I - int(bias)
            C = n // taps
            G[..., :n].view(b, O, C, taps).copy_(Gt[..., :n].view(b, O, taps, C).transpose(2, 3))
            if bias:
                G[..., -1] = Gt[..., -1]
        else:
            if pointwise:
                xb = ws.get("dense_x", (r1 - r0, steps, I), x.dtype, device)
                xb[..., :xs.shape[1]].copy_(xs.transpose(1, 2))
                if bias:
                    xb[..., -1] = 1
                db = ws.get("dense_d", (r1 - r0, steps, O), delta.dtype, device)
                db.copy_(ds.transpose(1, 2))
            elif conv:
                xb = ws.get("dense_x", (r1 - r0, steps, I), x.dtype, device)
                unfold = unfold_conv1d if conv1d else unfold_conv2d
                unfold(module, xs, append_one=bias, out=xb)
                db = ws.get("dense_d", (r1 - r0, steps, O), delta.dtype, device)
                db.copy_(ds.flatten(2).transpose(1, 2))  # [r, C_out, *pos] -> [r, pos, C_out]
            else:
                xs = xs.reshape(r1 - r0, steps, xs.shape[-1])
                if bias:
                    xb = ws.get("dense_x", (r1 - r0, steps, I), x.dtype, device)
                    xb[..., :-1].copy_(xs)
                    xb[..., -1] = 1
                else:
                    xb = xs
                db = ds.reshape(r1 - r0, steps, O)
            torch.bmm(db.reshape(b, T, O).to(acc).transpose(1, 2), xb.reshape(b, T, I).to(acc), out=G)
        if use_kernel:
            from cupid_engine.ops import cpu_backend

            cpu_backend.hash_gradient(G, layer.seed, k, out[a:e], accumulate=True)
        else:
            flat = G.reshape(b, O * I)
            flat *= sign
            out[a:e].scatter_add_(1, bucket.expand(b, O * I), flat)


_POOL: ThreadPoolExecutor | None = None
_POOL_PID = -1
_MIN_SPLIT_ROWS = 128
_BLOCK_ROWS = 64  # rows x time steps per cache block of the FFT path


def _run_split(fn, rows: int, device: torch.device) -> None:
    """Run ``fn(a, e)`` over row blocks on ``torch.get_num_threads()`` threads (CPU).

    torch's CPU FFT (pocketfft) transforms a batch on one thread, so the FFT stage would
    use one core of two; the row blocks are independent (each row is one sample), so
    splitting them over threads gives the same numbers, faster.
    """
    global _POOL, _POOL_PID
    threads = torch.get_num_threads() if device.type == "cpu" else 1
    if threads <= 1 or rows < _MIN_SPLIT_ROWS:
        fn(0, rows)
        return
    if _POOL is None or _POOL_PID != os.getpid():  # a forked child must not reuse the parent's pool
        _POOL, _POOL_PID = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="cupid-fft"), os.getpid()
    bounds = [rows * i // threads for i in range(threads + 1)]
    futures = [_POOL.submit(fn, bounds[i], bounds[i + 1]) for i in range(threads) if bounds[i + 1] > bounds[i]]
    for fut in futures:
        fut.result()


def fused_tensorsketch(
    factors: Sequence[tuple[int, torch.Tensor, torch.Tensor] | RawLayer],
    *,
    k: int,
    strategy: str = "auto",
    workspace: _Workspace | None = None,
    index_factors: Sequence[tuple[int, torch.Tensor, torch.Tensor, int]] = (),
    row_sums: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum over layers of ``ops.tensorsketch(delta, x, k=k, seed=seed)``, evaluated cheaply.

    Per layer, one of three exact evaluations of the same sketch (see :func:`choose_strategy`):

    * ``fft``: ``sum_t rfft(CS1(delta_t)) * rfft(CS2(x_t))``, spectra of all such layers
      accumulated and inverted by ONE ``irfft`` at the end (irfft is linear). On CPU with
      ``k`` a power of two (:func:`kernel_route`) all such layers go to the C++ kernel
      ``ops.cpu_backend.tensorsketch_fft_layers`` in one call (its own FFT, 16 samples per
      SIMD lane group, the count-sketch scatter written into the FFT input, nothing of size
      ``[B, T, k]`` in memory). Elsewhere the count sketches use the factor hashes every
      ``ops`` backend consumes (``reference.countsketch_buckets``), scattered into reused
      workspace buffers and transformed by ``torch.fft``; a factor at most
      :data:`DFT_MAX_DIM` wide gets its spectrum by a direct DFT matmul.
    * ``dense``: ``G = sum_t delta_t x_t^T`` ``[B, O, I]`` by one batched matmul, hashed
      into ``k`` buckets with the tensorsketch hashes (``(h1(o) + h2(i)) mod k``, sign
      ``s1(o) s2(i)``), i.e. ``reference.tensorsketch_materialized`` (on the kernel route
      by ``ops.cpu_backend.hash_gradient``, else ``scatter_add_``).
    * ``direct`` (kernel route only): the same hashed products ``s1(o) s2(i) delta_t[o]
      x_t[i]``, accumulated in the time domain inside the kernel call (16 samples per
      vector, t, o, i ascending) and added to the inverse FFT's output; no ``G``, no FFT.
      Off the kernel route a forced ``direct`` is evaluated as ``dense``.

    The routes agree to float rounding; which one a layer takes changes the last bits
    of its features only. Since 2026-12-06 (issue 19) the MLP's narrow layers (41-wide
    input, 7-wide head) take ``direct`` on CPU, a float-rounding change of the MLP's
    features against the all-``fft`` evaluation (~1e-7 relative in float32; float64 parity
    with the definition, tests/featurize/test_direct_route.py). The kernel route (2026-12) changed the CPU features' float
    rounding against the earlier torch.fft evaluation (same sketch, same hashes; float32
    features agree to ~1e-6 relative, tests/featurize/test_hook_kernel.py).

    Args:
        factors: ``[(seed, delta [B, T, O], x [B, T, I])]`` per layer (any T per layer);
            an entry ``(seed, delta, x [B, T, I - 1], True)`` is a layer whose last input
            coordinate is an implicit constant 1 (a Linear's bias): on the kernel's ``fft``
            and ``direct`` routes the kernel adds it itself (the same sums as a stored
            column of ones, bit for bit, without writing one), elsewhere the column is
            appended. An entry may instead be a :class:`RawLayer` (a captured Linear/Conv
            call not laid out), which takes the ``dense`` route streamed chunk by chunk
            (:func:`stream_dense_layer`: bounded memory).
        k: Sketch dimension.
        strategy: ``auto`` (per layer, by cost), or force ``fft`` / ``dense`` / ``direct`` (tests).
        workspace: Scratch buffers reused across calls (a :class:`Featurizer` keeps one);
            None allocates fresh ones.
        index_factors: ``[(seed, idx [B, T] int64, x [B, T, I], O)]``: layers whose row
            factor is one-hot (Embedding: ``G = sum_t e_{idx_t} x_t^T``, ``[O, I]``, index
            ``-1`` contributes nothing). Hashed directly: entry ``(idx_t, i)`` goes to
            bucket ``(h1(idx_t) + h2(i)) mod k`` with sign ``s1(idx_t) s2(i)``, i.e.
            exactly ``reference.tensorsketch_materialized`` of the one-hot factorisation,
            at ``O(T * I)`` per sample and no ``[O, I]`` matrix.
        row_sums: ``[B]`` tensor of the result's dtype and device, filled with the sum of
            each result row (for a NaN/Inf check, ``ops.nonfinite_rows``' test): by the C++
            kernel while it writes the rows when its output is the result (no pass over the
            ``[B, k]`` output afterwards), else by ``result.sum(1)``.

    Returns:
        ``[B, k]`` float32 (float64 for float64 inputs).
    """
    if not factors and not index_factors:
        raise ValueError("no layer factors to sketch")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    x0 = factors[0][2] if factors else index_factors[0][2]
    acc = torch.float64 if x0.dtype == torch.float64 else torch.float32
    cdtype = torch.complex128 if acc == torch.float64 else torch.complex64
    B = factors[0].groups if factors and isinstance(factors[0], RawLayer) else x0.shape[0]
    device = x0.device
    ws = workspace if workspace is not None else _Workspace()
    direct = None
    for seed, idx, x, O in index_factors:
        I = x.shape[2]
        b1, s1 = _factor_hash(seed, C.STREAM_TS_OUT, O, k, acc)
        b2, s2 = _factor_hash(seed, C.STREAM_TS_IN, I, k, acc)
        b1, s1, b2, s2 = b1.to(device), s1.to(device), b2.to(device), s2.to(device)
        valid = idx >= 0
        safe = torch.where(valid, idx, 0)
        row_sign = torch.where(valid, s1[safe], torch.zeros((), dtype=acc, device=device))  # [B, T]
        bucket = (b1[safe].unsqueeze(-1) + b2) % k  # [B, T, I]
        vals = x.to(acc) * row_sign.unsqueeze(-1) * s2
        if direct is None:
            direct = torch.zeros(B, k, dtype=acc, device=device)
        direct.scatter_add_(1, bucket.reshape(B, -1), vals.reshape(B, -1))
    use_kernel = kernel_route(k, device, acc)
    fft_layers = []
    for entry in factors:
        if isinstance(entry, RawLayer):
            if direct is None:
                direct = torch.zeros(B, k, dtype=acc, device=device)
            stream_dense_layer(entry, k, direct, ws, acc)
            continue
        seed, delta, x, *implicit = entry
        ones = bool(implicit[0]) if implicit else False
        T, O, I = delta.shape[1], delta.shape[2], x.shape[2] + int(ones)
        route = choose_strategy(strategy, T, O, I, k, device)
        if use_kernel and route in ("fft", "direct"):
            fft_layers.append((seed, delta, x, route == "direct", ones))
            continue
        if ones:
            x = torch.cat((x, x.new_ones(x.shape[:-1] + (1,))), dim=-1)
        if route != "fft":  # dense, or direct off the kernel route: the same hashed products of G
            if use_kernel:  # GEMM, then the C++ hash (fixed order per row)
                from cupid_engine.ops import cpu_backend

                G = torch.bmm(delta.to(acc).transpose(1, 2), x.to(acc))  # [B, O, I]
                if direct is None:
                    direct = torch.zeros(B, k, dtype=acc, device=device)
                cpu_backend.hash_gradient(G, seed, k, direct, accumulate=True)
                continue
            G = torch.bmm(delta.to(acc).transpose(1, 2), x.to(acc)).reshape(B, O * I)  # [B, O, I] flattened
            bucket, sign = _dense_table(seed, O, I, k)
            G *= sign.to(device=device, dtype=acc)
            if direct is None:
                direct = torch.zeros(B, k, dtype=acc, device=device)
            # scatter_add_ is one vectorised kernel; index_add_ along dim 1 loops over the
            # O * I indices on CPU (measured ~40x slower here).
            direct.scatter_add_(1, bucket.to(device).expand(B, O * I), G)
            continue
        fft_layers.append((seed, delta, x, False, False))
    if not fft_layers:
        if row_sums is not None:
            row_sums.copy_(direct.sum(dim=1))
        return direct
    if use_kernel:
        from cupid_engine.ops import cpu_backend

        def unit(t: torch.Tensor) -> torch.Tensor:
            t = t.to(acc)
            return t if t.stride(-1) == 1 else t.contiguous()

        # One call for all layers: per group of W samples, every layer's and step's spectra
        # are accumulated in cache and inverted once (the kernel threads over groups); the
        # direct layers' products are added to the inverse's output in the same pass.
        flags = [e[3] for e in fft_layers]
        ones = [e[4] for e in fft_layers]
        in_kernel = row_sums is not None and direct is None and row_sums.dtype == acc and row_sums.is_contiguous()
        out = cpu_backend.tensorsketch_fft_layers([(e[0], unit(e[1]), unit(e[2])) for e in fft_layers], k,
                                                  direct=flags if any(flags) else None,
                                                  x_ones=ones if any(ones) else None,
                                                  row_sums=row_sums if in_kernel else None)
        if direct is not None:
            out.add_(direct)
        if row_sums is not None and not in_kernel:
            row_sums.copy_(out.sum(dim=1))
        return out
    # The result is returned to the caller, so it is a fresh tensor (not a workspace view).
    out = torch.empty(B, k, dtype=acc, device=device)
    t_max = max(e[1].shape[1] for e in fft_layers)
    # Rows per block: every buffer of a block (count sketches, spectra, accumulator) stays
    # cache-sized, and each block goes scatter -> rfft -> multiply-accumulate -> irfft for
    # all layers before the next, instead of whole-batch passes over multi-MiB buffers.
    # On a GPU the whole batch is one block: there the cost is kernel launches, not cache.
    rows_per_block = max(1, _BLOCK_ROWS // t_max) if device.type == "cpu" else B

    def part(a: int, e: int) -> None:
        tag = threading.get_ident()
        for r0 in range(a, e, rows_per_block):
            r1 = min(e, r0 + rows_per_block)
            spec = None
            for seed, delta, x, *_ in fft_layers:
                f = _spectrum(delta[r0:r1], seed, C.STREAM_TS_OUT, k, acc, ws, f"out{tag}")
                g = _spectrum(x[r0:r1], seed, C.STREAM_TS_IN, k, acc, ws, f"in{tag}")
                # Multiply-accumulate in a fixed order (ops.spectral): a row's features must
                # not depend on the block it is in or on the thread count.
                if spec is None:  # the first layer initialises the accumulator: no zero fill
                    spec = ws.get(f"acc{tag}", (r1 - r0, k // 2 + 1), cdtype, device)
                    spectral.spectral_mac(f, g, spec, accumulate=False)
                else:
                    spectral.spectral_mac(f, g, spec, accumulate=True)
            torch.fft.irfft(spec, n=k, dim=-1, out=out[r0:r1])

    _run_split(part, B, device)
    if direct is not None:
        out.add_(direct)
    if row_sums is not None:
        row_sums.copy_(out.sum(dim=1))
    return out

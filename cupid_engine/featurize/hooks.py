"""Hook-based per-sample gradient sketches: tensorsketch without per-sample gradients.

For a Linear layer the per-sample gradient of sample b is ``G_b = sum_t delta_bt x_bt^T``
(``[O, I]``; ``x`` gets an appended 1 when the layer has a bias, so the last column of
``G_b`` is the bias gradient). A Conv1d is a Linear over time on the unfolded input
(``x_unfold [B, L_out, C_in * kernel]``, ``delta [B, L_out, C_out]``), so the same formula
holds with ``T = L_out``. Both factors come from one batched forward and backward:

* a forward hook on every tracked module keeps its input ``x`` and its output tensor;
* ``torch.autograd.grad(sum_b f_b, outputs)`` returns ``delta`` for every tracked output
  in one backward, without computing or accumulating any parameter ``.grad``.

Why ``sum_b f_b`` gives *per-sample* deltas: ``d(sum_b f_b)/d out_b = d f_b / d out_b``
whenever row b of a module's output influences no other sample's output, i.e. when
samples do not interact inside the network. Every layer of our policies is row-wise
(Linear, Conv1d over a sample's own time axis, GroupNorm/LayerNorm per sample). A
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
per sample instead of one per layer: same numbers up to float rounding (tested against
per-layer ``ops.tensorsketch``), fewer FFTs. The count sketches themselves come from the
selected backend's ``countsketch_pair`` (the C++ kernel on CPU), the same stage
``ops.tensorsketch`` uses.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cupid_engine import constants as C
from cupid_engine.ops import hashing
from cupid_engine.ops import reference

__all__ = ["layer_seed", "check_sample_independent", "HookCapture", "unfold_conv1d", "fused_tensorsketch"]


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


def _conv_padding(module: nn.Conv1d) -> tuple[int, int]:
    pad = module.padding
    if isinstance(pad, str):
        if pad == "valid":
            return 0, 0
        total = module.dilation[0] * (module.kernel_size[0] - 1)  # "same" (stride 1)
        return total // 2, total - total // 2
    return pad[0], pad[0]


def unfold_conv1d(module: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """Unfold a Conv1d input into Linear rows: ``[R, C_in, L] -> [R, L_out, C_in * kernel]``.

    Column ``c * kernel + j`` holds input channel ``c`` at tap ``j``, matching
    ``weight.reshape(C_out, C_in * kernel)``; padding, stride and dilation are honoured.

    Raises:
        ValueError: grouped convolutions or non-zero padding modes.
    """
    if module.groups != 1 or module.padding_mode != "zeros":
        raise ValueError(
            f"Conv1d with groups={module.groups}, padding_mode={module.padding_mode!r} cannot be unfolded "
            "into a Linear: only groups=1 and zero padding are supported"
        )
    left, right = _conv_padding(module)
    if left or right:
        x = F.pad(x, (left, right))
    cols = F.unfold(
        x.unsqueeze(2),
        kernel_size=(1, module.kernel_size[0]),
        dilation=(1, module.dilation[0]),
        stride=(1, module.stride[0]),
    )  # [R, C_in * kernel, L_out]
    return cols.transpose(1, 2)


class HookCapture:
    """Forward hooks that keep the input and output of every tracked module.

    Use as a context manager around one forward pass; then :meth:`factors` runs the
    backward and returns ``(name, delta [B, T, O], x [B, T, I(+1)])`` per captured call.
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

    def factors(self, total: torch.Tensor, groups: int) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """Backprop ``total`` and return the per-sample factors of every captured call.

        Args:
            total: Scalar ``sum`` of the per-row outputs.
            groups: Number of samples B; the R captured rows are ``R / B`` contiguous rows
                per sample.

        Returns:
            ``[(name, delta [B, T, O], x [B, T, I(+1)])]`` in capture order; calls whose
            output does not influence ``total`` are left out (zero gradient).
        """
        calls = [c for c in self._calls if c[3].requires_grad]
        if not calls:
            return []
        grads = torch.autograd.grad(total, [c[3] for c in calls], allow_unused=True)
        out = []
        for (name, module, x, _), delta in zip(calls, grads):
            if delta is None:
                continue
            if isinstance(module, nn.Conv1d):
                x = unfold_conv1d(module, x)  # [R, L_out, C_in * kernel]
                delta = delta.transpose(1, 2)  # [R, C_out, L_out] -> [R, L_out, C_out]
            else:  # Linear: [R, *, I] -> [R, T, I]
                x = x.reshape(x.shape[0], -1, x.shape[-1])
                delta = delta.reshape(delta.shape[0], -1, delta.shape[-1])
            if module.bias is not None:
                x = torch.cat((x, x.new_ones(x.shape[:-1] + (1,))), dim=-1)
            rows = x.shape[0]
            if rows % groups:
                raise RuntimeError(f"module {name!r}: {rows} captured rows do not split into {groups} samples")
            per = rows // groups
            # Rows of one sample are contiguous: fold them into T.
            x = x.reshape(groups, per * x.shape[1], x.shape[2])
            delta = delta.reshape(groups, per * delta.shape[1], delta.shape[2])
            out.append((name, delta, x))
        self._calls.clear()
        return out


def _countsketch_impl(backend: str, device: torch.device):
    """``countsketch_pair(delta, x, k, seed)`` of the backend ``ops.tensorsketch`` would use."""
    from cupid_engine import ops

    chosen = ops._resolve(backend, device, "tensorsketch")
    impl = chosen.impl()
    if hasattr(impl, "countsketch_pair"):
        return impl.countsketch_pair
    return lambda delta, x, k, seed: reference.countsketch_pair(delta, x, k=k, seed=seed)


def fused_tensorsketch(
    factors: Sequence[tuple[int, torch.Tensor, torch.Tensor]], *, k: int, backend: str = "auto"
) -> torch.Tensor:
    """Sum over layers of ``ops.tensorsketch(delta, x, k=k, seed=seed)``, with one irfft.

    Args:
        factors: ``[(seed, delta [B, T, O], x [B, T, I])]`` per layer (any T per layer).
        k: Sketch dimension.
        backend: ``ops`` backend for the count-sketch stage.

    Returns:
        ``[B, k]`` float32 (float64 for float64 inputs).
    """
    if not factors:
        raise ValueError("no layer factors to sketch")
    spec = None
    cs_pair = None
    for seed, delta, x in factors:
        if cs_pair is None:
            cs_pair = _countsketch_impl(backend, delta.device)
        cs1, cs2 = cs_pair(delta, x, k, seed)  # [B, T, k] each
        f = torch.fft.rfft(cs1, n=k, dim=-1)
        f *= torch.fft.rfft(cs2, n=k, dim=-1)
        f = f.sum(dim=1) if f.shape[1] > 1 else f[:, 0]
        spec = f if spec is None else spec.add_(f)
    return torch.fft.irfft(spec, n=k, dim=-1)

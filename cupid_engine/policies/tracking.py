"""Which parameters the featuriser differentiates ("tracked parameters", DESIGN §1).

``track`` is ``"all"``, ``"head"`` (``policy.head_modules()``) or a list of module names
(as in ``named_modules``; a name selects the module and everything below it). The
torch.func path can track any parameter. The hook path captures module calls, so with
``hook_compatible=True`` every tracked module that owns parameters must be one of the
layer types it has an exact per-sample formula for (:func:`hook_refusal`):

* ``nn.Linear`` (any leading dims: attention built from Linear layers included),
* ``nn.Conv1d`` / ``nn.Conv2d`` with ``groups=1`` and zero padding (im2col),
* ``nn.GroupNorm`` / ``nn.LayerNorm`` affine parameters,
* ``nn.Embedding`` (without ``max_norm`` or ``scale_grad_by_freq``).

Anything else holding tracked parameters (``nn.MultiheadAttention``'s packed
``in_proj_weight``, BatchNorm affine, ConvTranspose, grouped convs, a bare
``nn.Parameter`` such as a positional embedding) is an error that names it, rather than
a silent omission that would change the scores. Parameter-free modules (activations,
Upsample, non-affine norms) are always fine.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

Track = str | Sequence[str]


def hook_refusal(module: nn.Module) -> str | None:
    """Why the hook path cannot featurise ``module``'s own parameters (None: it can).

    Exact types only: a subclass may override ``forward`` (e.g. the ``out_proj`` of
    ``nn.MultiheadAttention``, whose weight is used functionally, never through its
    forward), and the hook path captures forwards.
    """
    t = type(module)
    trainable = {n for n, p in module.named_parameters(recurse=False) if p.requires_grad}
    if t is nn.MultiheadAttention:
        return ("nn.MultiheadAttention uses its packed in_proj_weight and out_proj.weight inside "
                "F.multi_head_attention_forward, out of the hooks' reach; build the attention from nn.Linear "
                "q/k/v/out projections (hook-featurisable) or use the torch.func (vmap) path")
    if t in (nn.Linear, nn.Conv1d, nn.Conv2d):
        if "weight" not in trainable:
            return f"{t.__name__} with a frozen weight but a trainable bias is not supported; freeze both or neither"
        if t is not nn.Linear and (module.groups != 1 or module.padding_mode != "zeros"):
            return (f"{t.__name__} with groups={module.groups}, padding_mode={module.padding_mode!r}: only groups=1 "
                    "and zero padding unfold into a Linear")
        return None
    if t in (nn.GroupNorm, nn.LayerNorm):
        return None
    if t is nn.Embedding:
        if module.max_norm is not None:
            return "nn.Embedding with max_norm renormalises its weight in place during the forward"
        if module.scale_grad_by_freq:
            return "nn.Embedding with scale_grad_by_freq scales gradients by batch-wide token counts (mixes samples)"
        return None
    return f"{t.__name__} is not a layer type the hook path has a per-sample formula for"


def _hook_ok(module: nn.Module) -> bool:
    return hook_refusal(module) is None


def _selected_roots(policy: nn.Module, track: Track) -> list[str]:
    if isinstance(track, str):
        if track == "all":
            return [""]
        if track == "head":
            if not hasattr(policy, "head_modules"):
                raise ValueError(f"track='head' needs a policy with head_modules(); got {type(policy).__name__}")
            return list(policy.head_modules())
        # A single module name given as a string.
        return [track]
    names = list(track)
    if not names:
        raise ValueError("track is an empty list of module names")
    return names


def tracked_modules(
    policy: nn.Module, track: Track = "all", *, hook_compatible: bool = False
) -> list[tuple[str, nn.Module]]:
    """Tracked modules that directly own trainable parameters.

    Args:
        policy: The policy (any ``nn.Module``).
        track: ``"all"``, ``"head"``, a list of module names, or one module name as a string.
        hook_compatible: Require every returned module to be hook-featurisable
            (:func:`hook_refusal`).

    Returns:
        ``(name, module)`` pairs in ``named_modules`` order, no duplicates.

    Raises:
        ValueError: An unknown module name, nothing tracked, or (with
            ``hook_compatible``) a tracked module whose parameters the hook path cannot
            handle; the message lists every such module and its type.
    """
    all_modules = dict(policy.named_modules())
    roots = _selected_roots(policy, track)
    unknown = [r for r in roots if r not in all_modules]
    if unknown:
        raise ValueError(f"unknown module names to track: {unknown} (see policy.named_modules())")
    out: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()
    for name, module in policy.named_modules():
        if not any(r == "" or name == r or name.startswith(r + ".") for r in roots):
            continue
        if id(module) in seen:
            continue
        if not any(p.requires_grad for p in module.parameters(recurse=False)):
            continue
        seen.add(id(module))
        out.append((name, module))
    if not out:
        raise ValueError(f"track={track!r} selects no trainable parameters")
    if hook_compatible:
        bad = [f"{n or '<root>'} ({type(m).__name__}: {hook_refusal(m)})" for n, m in out if not _hook_ok(m)]
        if bad:
            raise ValueError(
                "hook-based featurisation handles nn.Linear, nn.Conv1d/nn.Conv2d (groups=1, zero padding), "
                "GroupNorm/LayerNorm affine parameters and nn.Embedding, but these tracked modules hold other "
                f"parameters: {bad}. Track a subset (e.g. track='head' or module names), use the torch.func "
                "featuriser (a dense/sparse/signshift projection), or build the policy without them."
            )
    return out


def untracked_parameters(policy: nn.Module, track: Track = "all") -> dict[str, int]:
    """Fully qualified name -> element count of every parameter NOT tracked (frozen ones included)."""
    tracked = {id(p) for p in tracked_parameters(policy, track).values()}
    return {name: int(p.numel()) for name, p in policy.named_parameters() if id(p) not in tracked}


def tracked_parameters(policy: nn.Module, track: Track = "all") -> dict[str, torch.Tensor]:
    """Fully qualified name -> parameter of every tracked trainable parameter (torch.func path)."""
    params: dict[str, torch.Tensor] = {}
    for name, module in tracked_modules(policy, track):
        for pname, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                params[f"{name}.{pname}" if name else pname] = p
    return params

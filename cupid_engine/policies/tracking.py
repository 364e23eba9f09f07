"""Which parameters the featuriser differentiates ("tracked parameters", DESIGN §1).

``track`` is ``"all"``, ``"head"`` (``policy.head_modules()``) or a list of module names
(as in ``named_modules``; a name selects the module and everything below it). The
torch.func path can track any parameter; the hook path captures only ``nn.Linear`` and
plain ``nn.Conv1d`` inputs and output gradients, so with ``hook_compatible=True`` any
tracked module holding parameters of another kind (GroupNorm/LayerNorm affine,
BatchNorm, Embedding, ConvTranspose, grouped convs, bare ``nn.Parameter``) is an error
that names it, rather than a silent omission that would change the scores.
Parameter-free modules (activations, Upsample, non-affine norms) are always fine.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

Track = str | Sequence[str]


def _hook_ok(module: nn.Module) -> bool:
    if type(module) is nn.Linear:
        return True
    if type(module) is nn.Conv1d:
        # The featuriser unfolds a Conv1d as a Linear over time: that is exact only for
        # ungrouped convolutions with zero padding.
        return module.groups == 1 and module.padding_mode == "zeros"
    return False


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
        hook_compatible: Require every returned module to be a Linear or plain Conv1d.

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
        bad = [f"{n} ({type(m).__name__})" for n, m in out if not _hook_ok(m)]
        if bad:
            raise ValueError(
                "hook-based featurisation handles only nn.Linear and plain nn.Conv1d, but these tracked "
                f"modules hold other parameters: {bad}. Track a subset (e.g. track='head'), use the "
                "torch.func featuriser, or build the policy without them (e.g. group_norm_affine=False)."
            )
    return out


def tracked_parameters(policy: nn.Module, track: Track = "all") -> dict[str, torch.Tensor]:
    """Fully qualified name -> parameter of every tracked trainable parameter (torch.func path)."""
    params: dict[str, torch.Tensor] = {}
    for name, module in tracked_modules(policy, track):
        for pname, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                params[f"{name}.{pname}" if name else pname] = p
    return params

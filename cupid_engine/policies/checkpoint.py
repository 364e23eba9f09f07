"""Policy checkpoints: ``model.safetensors`` + ``config.json``, never a pickle.

A checkpoint directory holds:

* ``model.safetensors``: the full ``state_dict`` (parameters, the normaliser's
  statistics, the noise schedule) as named tensors;
* ``config.json``: ``format_version``, ``policy`` (registry kind), ``policy_class``,
  ``policy_config`` (``to_dict``), ``train_config`` and ``train_info`` summary when the
  policy came from :func:`train_policy`, and ``content_hash``: sha256 over the policy
  config JSON and every tensor (name, dtype, shape, bytes) in sorted order, so the hash
  identifies the *model*, not the file layout. Stores and caches key on it.

:func:`load_policy` reads JSON with ``json`` and tensors with ``safetensors`` only.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from cupid_engine.errors import CheckpointError, one_line
from cupid_engine.policies.base import Policy
from cupid_engine.policies.registry import POLICIES, policy_kind

FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def _content_hash(config_json: str, tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    h.update(config_json.encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:32]


def state_tensors(policy: Policy) -> dict[str, torch.Tensor]:
    """The policy's state dict as contiguous CPU tensors (safetensors rejects views)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in policy.state_dict().items()}


def compute_policy_hash(policy: Policy) -> str:
    """Content hash of an in-memory policy (equals :func:`policy_hash` of its checkpoint)."""
    return _content_hash(policy.config.to_json(), state_tensors(policy))


def save_policy(policy: Policy, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write a checkpoint directory.

    Args:
        policy: The policy.
        path: Directory to create (parents included).
        overwrite: Replace an existing checkpoint; otherwise an existing one raises.

    Returns:
        The directory path.
    """
    out = Path(path)
    if (out / CONFIG_FILE).exists() and not overwrite:
        raise FileExistsError(f"{out} already holds a checkpoint (pass overwrite=True)")
    out.mkdir(parents=True, exist_ok=True)
    tensors = state_tensors(policy)
    config_json = policy.config.to_json()
    info = getattr(policy, "train_info", None) or {}
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "policy": policy_kind(policy),
        "policy_class": type(policy).__name__,
        "policy_config": policy.config.to_dict(),
        "train_config": info.get("train_config"),
        "train_info": {k: info[k] for k in ("steps", "num_samples", "num_kept") if k in info}
        | ({"final_loss": info["step_losses"][-1]} if info.get("step_losses") else {}),
        "content_hash": _content_hash(config_json, tensors),
    }
    # Write to temporaries then rename: a crash never leaves a half checkpoint behind.
    tmp_model, tmp_cfg = out / (MODEL_FILE + ".tmp"), out / (CONFIG_FILE + ".tmp")
    save_file(tensors, str(tmp_model), metadata={"content_hash": meta["content_hash"]})
    tmp_cfg.write_text(json.dumps(meta, indent=2, sort_keys=True))
    os.replace(tmp_model, out / MODEL_FILE)
    os.replace(tmp_cfg, out / CONFIG_FILE)
    return out


_HINT = "give the folder written by cupid-engine train --out"


def _read_meta(path: Path) -> dict[str, Any]:
    cfg_path = path / CONFIG_FILE
    if not cfg_path.is_file() or not (path / MODEL_FILE).is_file():
        raise _NoCheckpoint(f"{path} is not a policy checkpoint (needs {CONFIG_FILE} and {MODEL_FILE})", hint=_HINT)
    try:
        meta = json.loads(cfg_path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot read the checkpoint's config ({exc})", where=str(cfg_path), hint=_HINT) from None
    if not isinstance(meta, dict):
        raise CheckpointError("the checkpoint's config is not a JSON object", where=str(cfg_path), hint=_HINT)
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint format {meta.get('format_version')}, expected {FORMAT_VERSION}",
                              where=str(cfg_path), hint="re-save it with this cupid_engine version")
    for key in ("policy", "policy_config", "content_hash"):
        if key not in meta:
            raise CheckpointError(f"the checkpoint's config lacks {key!r}", where=f"field {key!r} of {cfg_path}",
                                  hint=_HINT)
    return meta


class _NoCheckpoint(CheckpointError, FileNotFoundError):
    """No checkpoint at the path (a ``FileNotFoundError`` for callers that catch one)."""


def load_policy(path: str | os.PathLike[str], *, device: str | torch.device = "cpu", verify: bool = True) -> Policy:
    """Load a checkpoint written by :func:`save_policy` (no unpickling anywhere).

    Args:
        path: Checkpoint directory.
        device: Device to place the policy on.
        verify: Recompute the content hash and raise if it differs from the recorded one.

    Returns:
        The policy in eval mode, with ``train_config`` restored into ``policy.train_info``.
    """
    p = Path(path)
    meta = _read_meta(p)
    kind = meta["policy"]
    if kind not in POLICIES:
        raise CheckpointError(f"unknown policy kind {kind!r} (known: {sorted(POLICIES)})",
                              where=f"field 'policy' of {p / CONFIG_FILE}", hint=_HINT)
    config_cls, policy_cls = POLICIES[kind]
    try:
        config = config_cls.from_dict(meta["policy_config"])
    except (ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(f"invalid policy config ({one_line(exc)})", where=f"field 'policy_config' of "
                              f"{p / CONFIG_FILE}", hint=_HINT) from None
    model = p / MODEL_FILE
    try:
        tensors = load_file(str(model))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own SafetensorError: name the file
        if not type(exc).__name__.startswith("Safetensor"):
            raise
        raise CheckpointError(f"cannot read the tensors ({exc}); the file is damaged or not safetensors",
                              where=str(model), hint=_HINT) from None
    if verify:
        got = _content_hash(config.to_json(), tensors)
        if got != meta["content_hash"]:
            raise CheckpointError(f"content hash mismatch (recorded {meta['content_hash']}, computed {got})",
                                  where=str(model), hint="the checkpoint was modified: re-save or re-train it")
    policy = policy_cls(config)
    try:
        policy.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"the tensors do not fit the {kind} policy its config describes ({one_line(exc)[:300]})",
                              where=str(model), hint=_HINT) from None
    policy.to(device).eval()
    policy.train_info = {"train_config": meta.get("train_config"), **(meta.get("train_info") or {})}
    return policy


def policy_hash(path: str | os.PathLike[str]) -> str:
    """The recorded content hash of a checkpoint (cheap: reads only ``config.json``)."""
    return str(_read_meta(Path(path))["content_hash"])

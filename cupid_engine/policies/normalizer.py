"""Per-dimension normaliser for observations and actions.

Two modes, as in robomimic and diffusion_policy:

* ``gaussian``: ``(x - mean) / max(std, min_std)``; the MLP default.
* ``minmax``: maps ``[min, max]`` to ``[-1, 1]``; the diffusion default, because DDIM
  clips predicted actions to ``[-1, 1]``. The half range is clamped to ``min_range / 2``.

The clamp is the point (DESIGN §6): a near-constant dimension (a quaternion that barely
moves, a gripper that never opens) would otherwise be divided by ~0 and turned into
noise. The statistics are buffers of an ``nn.Module``, so they live in the policy's
``state_dict`` and therefore in its safetensors checkpoint, never in a pickle. Buffers
are not parameters, so they are never tracked by the featuriser.
"""

from __future__ import annotations

import torch
from torch import nn

NORMALIZER_MODES = ("gaussian", "minmax")


class Normalizer(nn.Module):
    """Affine per-dimension normaliser ``x_norm = (x - center) / scale``.

    Args:
        obs_dim: Observation dimension ``D``.
        action_dim: Action dimension ``A``.
        mode: ``"gaussian"`` or ``"minmax"``.
        min_spread: Minimum std (gaussian) or minimum range ``max - min`` (minmax); a
            dimension with a smaller spread is scaled by this instead.
    """

    def __init__(self, obs_dim: int, action_dim: int, *, mode: str = "gaussian", min_spread: float = 1e-2):
        super().__init__()
        if mode not in NORMALIZER_MODES:
            raise ValueError(f"normalizer mode must be one of {NORMALIZER_MODES}, got {mode!r}")
        if not min_spread > 0:
            raise ValueError(f"min_spread must be > 0, got {min_spread}")
        self.mode = mode
        self.min_spread = float(min_spread)
        self.register_buffer("obs_center", torch.zeros(obs_dim))
        self.register_buffer("obs_scale", torch.ones(obs_dim))
        self.register_buffer("action_center", torch.zeros(action_dim))
        self.register_buffer("action_scale", torch.ones(action_dim))
        # 1.0 once fit() ran; a buffer so that a loaded checkpoint remembers it.
        self.register_buffer("fitted", torch.zeros(()))

    def _stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Statistics in float64: float32 sums over 1e6 samples lose digits.
        x = x.reshape(-1, x.shape[-1]).to(torch.float64)
        if self.mode == "gaussian":
            center = x.mean(0)
            scale = x.std(0, unbiased=False).clamp_min(self.min_spread)
        else:
            lo, hi = x.min(0).values, x.max(0).values
            center = (hi + lo) / 2
            # Half range maps to 1; clamped so that a constant dim maps to 0, not inf.
            scale = ((hi - lo) / 2).clamp_min(self.min_spread / 2)
        return center.float(), scale.float()

    @torch.no_grad()
    def fit(self, obs: torch.Tensor, action: torch.Tensor) -> Normalizer:
        """Fit the statistics on training samples.

        Args:
            obs: ``[N, ..., D]`` raw observations (windows are fine: all leading dims pool).
            action: ``[N, ..., A]`` raw actions.

        Returns:
            self.
        """
        if obs.shape[-1] != self.obs_center.shape[0] or action.shape[-1] != self.action_center.shape[0]:
            raise ValueError(
                f"normalizer expects obs dim {self.obs_center.shape[0]} and action dim "
                f"{self.action_center.shape[0]}, got {obs.shape[-1]} and {action.shape[-1]}"
            )
        if obs.numel() == 0:
            raise ValueError("cannot fit a normalizer on zero samples")
        for name, value in zip(("obs_center", "obs_scale"), self._stats(obs)):
            getattr(self, name).copy_(value)
        for name, value in zip(("action_center", "action_scale"), self._stats(action)):
            getattr(self, name).copy_(value)
        self.fitted.fill_(1.0)
        return self

    def normalize_obs(self, obs: torch.Tensor) -> torch.Tensor:
        """``[..., D]`` raw -> normalised."""
        return (obs - self.obs_center) / self.obs_scale

    def normalize_action(self, action: torch.Tensor) -> torch.Tensor:
        """``[..., A]`` raw -> normalised."""
        return (action - self.action_center) / self.action_scale

    def unnormalize_action(self, action: torch.Tensor) -> torch.Tensor:
        """``[..., A]`` normalised -> raw."""
        return action * self.action_scale + self.action_center

    def normalize_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Normalise ``obs`` and ``action`` of a raw batch dict; other keys pass through."""
        out = dict(batch)
        device = self.obs_center.device
        out["obs"] = self.normalize_obs(batch["obs"].to(device))
        if "action" in batch:
            out["action"] = self.normalize_action(batch["action"].to(device))
        for key in ("episode_key", "step"):
            if key in batch:
                out[key] = batch[key].to(device)
        return out

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, min_spread={self.min_spread}"

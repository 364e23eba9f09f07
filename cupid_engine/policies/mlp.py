"""MLP behaviour-cloning policy (deterministic or Gaussian head).

The MLP maps the flattened observation window ``[n_obs * D]`` to an action chunk
``[H * A]``. It is built from ``nn.Linear`` layers and parameter-free activations only,
because the featuriser's hook path captures Linear inputs and output gradients; a
LayerNorm or BatchNorm with parameters would make ``track="all"`` hook-incompatible.

Heads:

* ``deterministic``: the chunk itself; loss = MSE.
* ``gaussian``: a diagonal Gaussian with mean from ``mean_head`` and a log-std that is
  either state-independent (``std_mode="state_independent"``) or predicted
  (``"predicted"``), clamped to ``[log_std_min, log_std_max]``; loss = NLL. The
  state-independent log-std is a bias-free ``Linear(1, H*A)`` applied to a constant 1,
  not a bare ``nn.Parameter``, so the hook path sees it as an ordinary Linear layer.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from cupid_engine.config import check, field
from cupid_engine.policies.base import Policy, PolicyConfig

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "mish": nn.Mish,
    "silu": nn.SiLU,
    "elu": nn.ELU,
    "tanh": nn.Tanh,
}
HEADS = ("deterministic", "gaussian")
STD_MODES = ("state_independent", "predicted")


@dataclasses.dataclass(frozen=True)
class MLPPolicyConfig(PolicyConfig):
    """MLP policy. Default ~0.55M parameters at ``obs_dim`` 40, ``action_dim`` 7."""

    hidden_sizes: tuple[int, ...] = field((512, 512, 512), help="widths of the hidden Linear layers")
    activation: str = field("relu", help=f"parameter-free activation: one of {tuple(ACTIVATIONS)}")
    head: str = field("deterministic", help="action head: deterministic (MSE) or gaussian (NLL)")
    std_mode: str = field("state_independent", help="gaussian log-std: state_independent or predicted")
    init_log_std: float = field(0.0, help="initial log-std of the gaussian head")
    log_std_min: float = field(-5.0, help="lower clamp of the gaussian log-std")
    log_std_max: float = field(2.0, help="upper clamp of the gaussian log-std")

    def __post_init__(self) -> None:
        super().__post_init__()
        check(len(self.hidden_sizes) >= 1 and all(h >= 1 for h in self.hidden_sizes), "hidden_sizes must be positive")
        check(self.activation in ACTIVATIONS, f"activation must be one of {tuple(ACTIVATIONS)}, got {self.activation!r}")
        check(self.head in HEADS, f"head must be one of {HEADS}, got {self.head!r}")
        check(self.std_mode in STD_MODES, f"std_mode must be one of {STD_MODES}, got {self.std_mode!r}")
        check(self.log_std_min < self.log_std_max, "log_std_min must be < log_std_max")

    @classmethod
    def large(cls, **overrides: Any) -> MLPPolicyConfig:
        """~8.5M parameters at ``obs_dim`` 40, ``action_dim`` 7 (three 2048-wide layers)."""
        return cls(**{"hidden_sizes": (2048, 2048, 2048), **overrides})

    @classmethod
    def tiny(cls, **overrides: Any) -> MLPPolicyConfig:
        """A few thousand parameters: for tests and smoke runs."""
        return cls(**{"hidden_sizes": (32, 32), **overrides})


class MLPPolicy(Policy):
    """MLP over the flattened obs window -> action chunk.

    Modules: ``trunk`` (Sequential of Linear + activation), ``mean_head`` (Linear),
    ``log_std_head`` (Linear; gaussian head only).
    """

    config_class = MLPPolicyConfig
    supported_outputs = ("loss", "logprob", "energy")

    def __init__(self, config: MLPPolicyConfig):
        super().__init__(config)
        c = config
        act = ACTIVATIONS[c.activation]
        layers: list[nn.Module] = []
        width = c.n_obs_steps * c.obs_dim
        for h in c.hidden_sizes:
            layers += [nn.Linear(width, h), act()]
            width = h
        self.trunk = nn.Sequential(*layers)
        out = c.horizon * c.action_dim
        self.mean_head = nn.Linear(width, out)
        self.log_std_head: nn.Linear | None = None
        if c.head == "gaussian":
            if c.std_mode == "predicted":
                self.log_std_head = nn.Linear(width, out)
                nn.init.zeros_(self.log_std_head.weight)
                nn.init.constant_(self.log_std_head.bias, c.init_log_std)
            else:
                self.log_std_head = nn.Linear(1, out, bias=False)
                nn.init.constant_(self.log_std_head.weight, c.init_log_std)
        if c.head != "gaussian":
            self.supported_outputs = ("loss", "energy")

    def head_modules(self) -> list[str]:
        return ["mean_head"] + (["log_std_head"] if self.log_std_head is not None else [])

    def _output(self, batch: dict[str, torch.Tensor], name: str, *, seed: int, draws: int) -> torch.Tensor:
        # Deterministic outputs: one row per sample, seed and draws unused.
        if name == "loss":
            return self.per_sample_loss(batch)
        if name == "logprob":
            return self.log_prob(batch)
        return self.energy(batch)

    def output_hint(self, name: str) -> str:
        hint = ""
        if name == "logprob":
            hint = " (logprob needs an MLP with head='gaussian'; for diffusion policies use 'square', CUPID Eq. 9)"
        elif name == "square":
            hint = " (square is the diffusion surrogate; for MLP policies use 'loss', 'logprob' or 'energy')"
        return f" with head={self.config.head!r}; supported: {self.supported_outputs}{hint}"

    def distribution_params(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Normalised ``obs [B, n_obs, D]`` -> mean ``[B, H, A]`` and log-std ``[B, H, A]``
        (None for the deterministic head)."""
        c = self.config
        feat = self.trunk(obs.reshape(obs.shape[0], -1))
        shape = (obs.shape[0], c.horizon, c.action_dim)
        mean = self.mean_head(feat).reshape(shape)
        if self.log_std_head is None:
            return mean, None
        if c.std_mode == "predicted":
            raw = self.log_std_head(feat)
        else:
            # Constant input 1 per row: the per-sample gradient of the weight is then the
            # ordinary Linear outer product δ·1ᵀ, which the hook path handles.
            raw = self.log_std_head(feat.new_ones(feat.shape[0], 1))
        log_std = raw.reshape(shape).clamp(c.log_std_min, c.log_std_max)
        return mean, log_std

    def log_prob(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Gaussian log-density of the normalised action chunk, summed over ``H*A``: ``[B]``."""
        if self.log_std_head is None:
            raise ValueError("log_prob needs a gaussian head; this MLPPolicy is deterministic (use output 'loss')")
        self.check_batch(batch)
        mean, log_std = self.distribution_params(batch["obs"])
        z = (batch["action"] - mean) * torch.exp(-log_std)
        elem = -0.5 * z.square() - log_std - 0.5 * math.log(2 * math.pi)
        return elem.flatten(1).sum(1)

    def per_sample_loss(self, batch: dict[str, torch.Tensor], **kwargs: Any) -> torch.Tensor:
        """MSE (deterministic) or NLL (gaussian), each averaged over the ``H*A`` action
        elements so the scale does not grow with the action dimension: ``[B]``."""
        self.check_batch(batch)
        if self.log_std_head is None:
            mean, _ = self.distribution_params(batch["obs"])
            return (mean - batch["action"]).square().flatten(1).mean(1)
        return -self.log_prob(batch) / (self.config.horizon * self.config.action_dim)

    def predict_normalized(self, obs: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        # Rollouts execute the mean: the Gaussian head's std models demonstrator noise.
        mean, _ = self.distribution_params(obs)
        return mean

    def energy(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Label-agnostic ``||mean(o)||^2`` over the normalised chunk: ``[B]``."""
        self.check_batch(batch, need_action=False)
        mean, _ = self.distribution_params(batch["obs"])
        return mean.flatten(1).square().sum(1)

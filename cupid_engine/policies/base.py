"""The ``Policy`` base class shared by every policy the engine trains and attributes.

A policy owns everything model-specific (kronfluence's Task idea): its loss, its
output functions' building blocks, its action head and its normaliser, so that the
featuriser, the trainer and the rollout code never see model code.

Batches are dicts of tensors, always *normalised*:

* ``obs``: ``[B, n_obs, D]`` observation windows,
* ``action``: ``[B, H, A]`` action chunks,
* ``episode_key``: ``[B]`` int64, ``step``: ``[B]`` int64 (identify the sample; seeded
  noise is derived from them, never from the batch position).

Every policy implements the engine's policy protocol (``policies/task.py``) as its own
task: ``build_batch(episodes)`` and ``output(model, batch, name, *, seed, draws)`` with
``model is self``. The output functions are methods of the policy classes
(``_output``), not a dispatch on the policy's type. ``forward(batch, output=...,
seed=..., draws=...)`` evaluates an output, so ``torch.func.functional_call(policy,
params, (batch,), kwargs)`` works for every output without the caller knowing the
policy class.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from torch import nn

from cupid_engine.config import Config, check, field
from cupid_engine.constants import OUTPUT_FUNCTIONS
from cupid_engine.policies.normalizer import NORMALIZER_MODES, Normalizer


@dataclasses.dataclass(frozen=True)
class PolicyConfig(Config):
    """Fields every policy config has. ``obs_dim``/``action_dim`` 0 = infer from data."""

    obs_dim: int = field(0, help="observation dimension D (0: inferred from the training samples)")
    action_dim: int = field(0, help="action dimension A (0: inferred from the training samples)")
    n_obs_steps: int = field(1, help="observation window length (steps ending at the current step)")
    horizon: int = field(1, help="action chunk length H predicted per query (starts at the current step)")
    n_action_steps: int = field(1, help="actions of the chunk executed per query (<= horizon)")
    obs_keys: tuple[str, ...] | None = field(
        None, help="observation keys concatenated into D, in order (None: sorted keys of the data)"
    )
    normalizer_mode: str = field("gaussian", help="normaliser for obs and actions: gaussian or minmax")
    normalizer_min_spread: float = field(
        1e-2, help="minimum std (gaussian) or range (minmax) so near-constant dims are not blown up"
    )

    def __post_init__(self) -> None:
        check(self.obs_dim >= 0 and self.action_dim >= 0, "obs_dim and action_dim must be >= 0")
        check(self.n_obs_steps >= 1, f"n_obs_steps must be >= 1, got {self.n_obs_steps}")
        check(self.horizon >= 1, f"horizon must be >= 1, got {self.horizon}")
        check(
            1 <= self.n_action_steps <= self.horizon,
            f"n_action_steps must be in [1, horizon={self.horizon}], got {self.n_action_steps}",
        )
        check(self.normalizer_mode in NORMALIZER_MODES, f"normalizer_mode must be one of {NORMALIZER_MODES}")
        check(self.normalizer_min_spread > 0, "normalizer_min_spread must be > 0")
        if self.obs_keys is not None:
            check(isinstance(self.obs_keys, tuple), "obs_keys must be a tuple of strings")

    @property
    def resolved(self) -> bool:
        """Whether the data-dependent dims are set (a policy can be built)."""
        return self.obs_dim > 0 and self.action_dim > 0


class Policy(nn.Module):
    """Base class: subclasses implement ``per_sample_loss``, ``predict_normalized`` and
    the pieces their output functions need.

    Attributes:
        config: The frozen policy config (dims resolved).
        normalizer: The fitted :class:`Normalizer` (buffers in the state dict).
    """

    config_class: type[PolicyConfig] = PolicyConfig
    #: Output functions (``constants.OUTPUT_FUNCTIONS``) this policy supports.
    supported_outputs: tuple[str, ...] = ()
    #: Whether the outputs depend on the noise seed and draw count (policy protocol).
    uses_noise_draws: bool = False

    def __init__(self, config: PolicyConfig):
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        if not config.resolved:
            raise ValueError(
                f"{type(self).__name__}: obs_dim and action_dim must be set (got {config.obs_dim}, "
                f"{config.action_dim}); train_policy infers them from the data"
            )
        self.config = config
        self.normalizer = Normalizer(
            config.obs_dim, config.action_dim, mode=config.normalizer_mode, min_spread=config.normalizer_min_spread
        )

    # -- to implement ---------------------------------------------------------------
    def per_sample_loss(self, batch: dict[str, torch.Tensor], **kwargs: Any) -> torch.Tensor:
        """Behaviour-cloning loss per sample, ``[B]``."""
        raise NotImplementedError

    def predict_normalized(self, obs: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """``[B, n_obs, D]`` normalised obs -> ``[B, H, A]`` normalised action chunk."""
        raise NotImplementedError

    def head_modules(self) -> list[str]:
        """Names (as in ``named_modules``) of the modules forming the action head."""
        raise NotImplementedError

    def _output(self, batch: dict[str, torch.Tensor], name: str, *, seed: int, draws: int) -> torch.Tensor:
        """Output function ``name`` (already checked as supported) on a normalised batch: ``[B]``."""
        raise NotImplementedError

    def output_hint(self, name: str) -> str:
        """The tail of the error for an unsupported output ``name``: what is supported and why."""
        return f"; supported: {self.supported_outputs}"

    # -- the policy protocol (policies/task.py) ---------------------------------------
    def check_output(self, name: str) -> None:
        """Raise a ValueError unless ``name`` is an output function this policy supports."""
        if name not in OUTPUT_FUNCTIONS:
            raise ValueError(f"unknown output function {name!r}; choose one of {OUTPUT_FUNCTIONS}")
        if name not in self.supported_outputs:
            raise ValueError(
                f"output {name!r} is not defined for {type(self).__name__}{self.output_hint(name)}"
            )

    def output(
        self, model: nn.Module, batch: dict[str, torch.Tensor], name: str, *, seed: int = 0, draws: int = 64
    ) -> torch.Tensor:
        """Output function ``name`` on a normalised batch: ``[B]`` (``model`` must be this
        policy: an engine policy is its own task)."""
        if model is not self:
            raise ValueError(f"{type(self).__name__} is its own task: output() needs model=the policy itself")
        self.check_output(name)
        return self._output(batch, name, seed=seed, draws=draws)

    def build_batch(self, episodes: Any) -> dict[str, torch.Tensor]:
        """Normalised batch (on the policy's device) of one sample per step of ``episodes``,
        in episode then step order: the policy protocol's batch builder."""
        from cupid_engine.policies.samples import build_samples

        c = self.config
        samples = build_samples(episodes, n_obs_steps=c.n_obs_steps, horizon=c.horizon, obs_keys=c.obs_keys)
        self.check_sample_dims(samples)
        return self.make_batch(samples)

    def check_sample_dims(self, samples: Any) -> None:
        """Raise a ``DataError`` naming the first episode when the samples' observation or
        action width is not the policy's (rather than a raw tensor error later)."""
        from cupid_engine.errors import DataError

        c = self.config
        for name, want in (("obs_dim", c.obs_dim), ("action_dim", c.action_dim)):
            got = getattr(samples, name)
            if len(samples) and got != want:
                what = "observation" if name == "obs_dim" else "action"
                raise DataError(
                    f"episode {samples.episode_ids[0]!r}: {what} width {got} differs from the policy's {name} {want}",
                    where=f"field {what!r}" + (f" (keys {list(c.obs_keys)})" if what == "observation" and c.obs_keys
                                                else ""),
                    hint="featurise with a policy trained on this kind of data",
                )

    def expand_for_output(
        self, batch: dict[str, torch.Tensor], name: str, *, draws: int = 64, seed: int = 0
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """``(expanded, group_index [R])``: rows per sample of a Monte-Carlo output (see
        ``outputs.expand_for_output``); the identity (one row per sample) here."""
        self.check_output(name)
        return batch, torch.arange(batch["obs"].shape[0], device=batch["obs"].device)

    def output_rows(self, expanded: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        """Per-row contributions ``[R]`` of an expanded batch; the output itself here."""
        self.check_output(name)
        return self._output(expanded, name, seed=0, draws=1)

    # -- shared ---------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor], output: str = "loss", seed: int = 0, draws: int = 64) -> torch.Tensor:
        """Evaluate output function ``output`` on a normalised batch: ``[B]``."""
        return self.output(self, batch, output, seed=seed, draws=draws)

    def make_batch(self, samples: Any, indices: Any = None) -> dict[str, torch.Tensor]:
        """Normalised batch of ``samples`` (a :class:`~cupid_engine.policies.samples.SampleSet`)
        at ``indices`` (all when None), on the policy's device."""
        return self.normalizer.normalize_batch(samples.batch(indices))

    def check_batch(self, batch: dict[str, torch.Tensor], *, need_action: bool = True) -> None:
        """Raise a ValueError naming the field whose shape does not fit the config."""
        c = self.config
        obs = batch.get("obs")
        if obs is None or tuple(obs.shape[-2:]) != (c.n_obs_steps, c.obs_dim) or obs.dim() != 3:
            raise ValueError(
                f"batch field 'obs' must be [B, {c.n_obs_steps}, {c.obs_dim}], got "
                f"{None if obs is None else tuple(obs.shape)}"
            )
        if need_action:
            act = batch.get("action")
            if act is None or act.dim() != 3 or tuple(act.shape[1:]) != (c.horizon, c.action_dim) or act.shape[0] != obs.shape[0]:
                raise ValueError(
                    f"batch field 'action' must be [B={obs.shape[0]}, {c.horizon}, {c.action_dim}], got "
                    f"{None if act is None else tuple(act.shape)}"
                )

    def compute_loss(
        self,
        batch: dict[str, torch.Tensor],
        sample_weights: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Weighted mean BC loss over the batch: ``mean_b(w_b * l_b)``.

        The loss is linear in the weights (not ``sum(w l) / sum(w)``) so that a weight of
        1 everywhere is the plain mean and ``d loss / d w_b = l_b / B``: the form the
        datamodel metagradient differentiates.

        Args:
            batch: Normalised batch.
            sample_weights: ``[B]`` non-negative weights, or None for the plain mean.
            **kwargs: Passed to ``per_sample_loss`` (e.g. ``generator`` for diffusion noise).

        Returns:
            Scalar loss.
        """
        losses = self.per_sample_loss(batch, **kwargs)
        if sample_weights is None:
            return losses.mean()
        w = torch.as_tensor(sample_weights, dtype=losses.dtype, device=losses.device)
        if w.shape != losses.shape:
            raise ValueError(f"sample_weights must be [B={losses.shape[0]}], got {tuple(w.shape)}")
        return (w * losses).mean()

    @torch.no_grad()
    def predict_action(self, obs_window: np.ndarray, *, generator: torch.Generator | None = None) -> np.ndarray:
        """Raw observation window(s) -> raw actions to execute.

        Args:
            obs_window: ``[n_obs, D]`` or ``[B, n_obs, D]`` unnormalised observations.
            generator: Seeds the sampling noise of stochastic policies (diffusion DDIM
                start noise); deterministic policies ignore it.

        Returns:
            ``[n_action_steps, A]`` (or ``[B, n_action_steps, A]``) unnormalised actions:
            the first ``n_action_steps`` of the predicted chunk.
        """
        c = self.config
        arr = np.asarray(obs_window, dtype=np.float32)
        single = arr.ndim == 2
        if single:
            arr = arr[None]
        if arr.ndim != 3 or arr.shape[1:] != (c.n_obs_steps, c.obs_dim):
            raise ValueError(
                f"obs_window must be [{c.n_obs_steps}, {c.obs_dim}] or [B, {c.n_obs_steps}, {c.obs_dim}], "
                f"got {np.asarray(obs_window).shape}"
            )
        device = self.normalizer.obs_center.device
        was_training = self.training
        self.eval()
        try:
            obs = self.normalizer.normalize_obs(torch.from_numpy(arr).to(device))
            chunk = self.predict_normalized(obs, generator=generator)
            actions = self.normalizer.unnormalize_action(chunk[:, : c.n_action_steps])
        finally:
            self.train(was_training)
        out = actions.cpu().numpy()
        return out[0] if single else out

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

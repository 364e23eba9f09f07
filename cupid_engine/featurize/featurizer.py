"""The :class:`Featurizer`: a batch of policy samples -> ``[B, k]`` projected gradients.

It binds a policy, an output function, the tracked parameters and a projection, and
picks one of two implementations of ``phi(z) = P grad_theta f(z; theta)`` (DESIGN §1, §3):

* ``hooks`` (``featurize/hooks.py``): one batched forward + backward, layer inputs and
  output gradients captured by hooks, per-layer tensorsketches summed. Per-sample
  gradients never exist, so memory does not grow with the number of tracked parameters
  beyond the model and its activations. Linear and plain Conv1d only.
* ``vmap`` (``featurize/vmap.py``): torch.func per-sample gradients, flattened, then
  ``ops.project`` (dense / sparse / signshift). Any parameter; memory ``B * P``.

Both produce ``[B, k]`` rows for the same store format; :meth:`Featurizer.describe` is
the JSON recorded in ``RunConfig.featurizer`` so a run states exactly what produced it.
Features depend only on each sample's own inputs (its window, action, ``episode_key``
and ``step``), never on batch composition or order.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from cupid_engine import constants as C
from cupid_engine import ops
from cupid_engine.featurize import hooks as _hooks
from cupid_engine.featurize import vmap as _vmap
from cupid_engine.featurize.config import FeaturizeConfig, ProjectionConfig, path_for_method
from cupid_engine.policies.base import Policy
from cupid_engine.policies.checkpoint import compute_policy_hash
from cupid_engine.policies.outputs import expand_for_output, output_from_expanded
from cupid_engine.policies.samples import SampleSet
from cupid_engine.policies.tracking import Track, tracked_modules, tracked_parameters

__all__ = ["Featurizer", "FEATURIZER_VERSION", "exact_float32"]

FEATURIZER_VERSION = 1
"""Bumped whenever the same inputs would produce different features (e.g. layer seeding)."""


@contextlib.contextmanager
def exact_float32(device: torch.device) -> Iterator[None]:
    """IEEE float32 matmuls and convolutions on a CUDA device for the duration.

    cuDNN convolutions default to TF32 on Ampere and later (``cudnn.conv.fp32_precision
    == "tf32"``): a UNet featurised on a GPU then differs from the same UNet on a CPU by
    ~5e-4 relative (measured on an H100), and features from both could not share a store.
    The previous settings are restored on exit; CPU work is unaffected.
    """
    if device.type != "cuda":
        yield
        return
    mm, conv = torch.backends.cuda.matmul, getattr(torch.backends.cudnn, "conv", None)
    if hasattr(mm, "fp32_precision") and hasattr(conv, "fp32_precision"):  # torch >= 2.9
        saved = (mm.fp32_precision, conv.fp32_precision)
        mm.fp32_precision, conv.fp32_precision = "ieee", "ieee"
        try:
            yield
        finally:
            mm.fp32_precision, conv.fp32_precision = saved
        return
    saved = (mm.allow_tf32, torch.backends.cudnn.allow_tf32)  # the flags older torch reads
    mm.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        mm.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class Featurizer:
    """Map normalised batches of samples to projected per-sample gradients.

    Args:
        policy: The policy; put in eval mode (features are taken at inference behaviour).
        output: Output function name (``constants.OUTPUT_FUNCTIONS``, supported by the policy).
        projection: The projection (method, k, seed, s, backend).
        track: ``"all"``, ``"head"`` or module names.
        path: ``"hooks"`` (tensorsketch) or ``"vmap"`` (dense/sparse/signshift).
        draws: Diffusion noise draws per sample.
        seed: Global seed of the diffusion noise draws.
        policy_hash: Content hash recorded by :meth:`describe` (computed when None).

    Raises:
        ValueError: method/path mismatch, unsupported output, unknown tracked names, or
            (hooks) a tracked module the hooks cannot handle (named) or a BatchNorm
            using batch statistics.
    """

    def __init__(
        self,
        policy: Policy,
        output: str,
        projection: ProjectionConfig,
        *,
        track: Track = "all",
        path: str = "hooks",
        draws: int = 64,
        seed: int = 0,
        policy_hash: str | None = None,
    ) -> None:
        if not isinstance(projection, ProjectionConfig):
            raise TypeError(f"projection must be a ProjectionConfig, got {type(projection).__name__}")
        if path != path_for_method(projection.method):
            raise ValueError(
                f"projection method {projection.method!r} needs path {path_for_method(projection.method)!r}, got {path!r}"
            )
        if output not in C.OUTPUT_FUNCTIONS or output not in policy.supported_outputs:
            raise ValueError(
                f"output {output!r} is not supported by {type(policy).__name__}; supported: {policy.supported_outputs}"
            )
        if draws < 1:
            raise ValueError(f"draws must be >= 1, got {draws}")
        self.policy = policy.eval()
        self.output = output
        self.projection = projection
        self.track = track if isinstance(track, str) else tuple(track)
        self.path = path
        self.draws = int(draws)
        self.seed = int(seed)
        self._policy_hash = policy_hash
        if path == "hooks":
            self.modules = tracked_modules(policy, self.track, hook_compatible=True)
            _hooks.check_sample_independent(policy)
            self._seeds = {name: _hooks.layer_seed(projection.seed, name) for name, _ in self.modules}
            self._workspace = _hooks._Workspace()
            if len(set(self._seeds.values())) != len(self._seeds):
                raise ValueError("two tracked layer names hash to the same seed; rename a module")
            # Parameters are left as they are (requires_grad untouched): autograd.grad asks
            # for the tracked outputs' deltas only, so no parameter gradient is computed,
            # and the caller's policy is not mutated.
            self.num_tracked = sum(p.numel() for _, m in self.modules for p in m.parameters(recurse=False))
        else:
            self.params = tracked_parameters(policy, self.track)
            self.order = list(self.params)
            self.num_tracked = sum(p.numel() for p in self.params.values())

    @classmethod
    def from_config(cls, policy: Policy, config: FeaturizeConfig, *, policy_hash: str | None = None) -> Featurizer:
        """A featuriser for ``config`` (projection, output, track, path, draws, seed)."""
        return cls(
            policy, config.output, config.projection, track=config.track, path=config.path,
            draws=config.draws, seed=config.seed, policy_hash=policy_hash,
        )

    @property
    def k(self) -> int:
        return self.projection.k

    @property
    def policy_hash(self) -> str:
        if self._policy_hash is None:
            self._policy_hash = compute_policy_hash(self.policy)
        return self._policy_hash

    def describe(self) -> dict[str, Any]:
        """JSON-safe description for ``RunConfig.featurizer``: everything that determines
        the numbers (policy hash and class, output, draws, noise seed, tracked modules,
        path, projection) and nothing that does not (batch size, backend, workers)."""
        return {
            "version": FEATURIZER_VERSION,
            "policy_hash": self.policy_hash,
            "policy_class": type(self.policy).__name__,
            "output": self.output,
            "draws": self.draws if self._uses_draws() else None,
            "noise_seed": self.seed if self._uses_draws() else None,
            "track": self.track if isinstance(self.track, str) else list(self.track),
            "tracked_modules": [n for n, _ in self.modules] if self.path == "hooks" else self.order,
            "num_tracked_parameters": int(self.num_tracked),
            "path": self.path,
            "projection": self.projection.describe(),
            "layer_seeds": "stream_key(stream_key(seed, STREAM_LAYER), crc32(name))" if self.path == "hooks" else None,
        }

    def _uses_draws(self) -> bool:
        from cupid_engine.policies.diffusion import DiffusionPolicy

        return isinstance(self.policy, DiffusionPolicy)

    # ------------------------------------------------------------------ featurise
    def featurize_samples(self, samples: SampleSet, indices: Any = None) -> torch.Tensor:
        """``[B, k]`` features of raw samples (normalised here with the policy's normaliser)."""
        return self(self.policy.make_batch(samples, indices))

    def __call__(self, batch: dict[str, torch.Tensor], *, check_finite: bool = True) -> torch.Tensor:
        """Features of a normalised batch.

        Args:
            batch: ``obs [B, n_obs, D]``, ``action [B, H, A]``, ``episode_key [B]``, ``step [B]``.
            check_finite: Raise on NaN/Inf features naming the batch rows.

        Returns:
            ``[B, k]`` float32 (float64 for a float64 policy and batch).
        """
        with exact_float32(batch["obs"].device):
            out = self._hooks(batch) if self.path == "hooks" else self._vmap(batch)
        out = out.detach()
        if check_finite:
            bad = ops.nonfinite_rows(out)
            if bool(bad.any()):
                rows = bad.nonzero().flatten().tolist()
                raise ValueError(f"non-finite features (NaN/Inf gradients) in batch rows {rows[:10]}")
        return out

    def layer_factors(self, batch: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """Hook captures ``[(name, delta [B, T, O], x [B, T, I(+1)])]`` of one batch (hooks path)."""
        if self.path != "hooks":
            raise ValueError("layer_factors needs path='hooks'")
        n = batch["obs"].shape[0]
        with torch.enable_grad():
            expanded, _ = expand_for_output(self.policy, batch, self.output, draws=self.draws, seed=self.seed)
            with _hooks.HookCapture(self.modules) as cap:
                total = output_from_expanded(self.policy, expanded, self.output).sum()
            return cap.factors(total, n)

    def _hooks(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        n = batch["obs"].shape[0]
        factors = self.layer_factors(batch)
        if not factors:  # no tracked layer influences the output: the gradient is 0
            dtype = torch.float64 if batch["obs"].dtype == torch.float64 else torch.float32
            return torch.zeros(n, self.k, dtype=dtype, device=batch["obs"].device)
        return _hooks.fused_tensorsketch(
            [(self._seeds[name], d, x) for name, d, x in factors], k=self.k, workspace=self._workspace
        )

    def _vmap(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        n = batch["obs"].shape[0]
        itemsize = batch["obs"].element_size()
        chunk = max(1, min(n, _vmap.MAX_CHUNK_BYTES // max(1, self.num_tracked * itemsize)))
        outs = []
        p = self.projection
        for a in range(0, n, chunk):
            part = {key: v[a : a + chunk] for key, v in batch.items()}
            grads = _vmap.per_sample_grads(self.policy, self.params, part, self.output, seed=self.seed, draws=self.draws)
            flat = _vmap.flatten_grads(grads, self.order)
            outs.append(ops.project(flat, k=p.k, method=p.method, seed=p.seed, s=p.s, backend=p.backend, check_finite=False))
        return torch.cat(outs) if len(outs) > 1 else outs[0]

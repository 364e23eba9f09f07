"""The :class:`Featurizer`: a batch of policy samples -> ``[B, k]`` projected gradients.

It binds a policy, an output function, the tracked parameters and a projection, and
picks one of two implementations of ``phi(z) = P grad_theta f(z; theta)`` (DESIGN §1, §3):

* ``hooks`` (``featurize/hooks.py``): one batched forward + backward, layer inputs and
  output gradients captured by hooks, per-layer tensorsketches summed. Per-sample
  gradients never exist, so memory does not grow with the number of tracked parameters
  beyond the model and its activations. Linear, Conv1d/Conv2d (groups=1), GroupNorm /
  LayerNorm affine and Embedding layers; any other tracked parameter is refused by name.
* ``vmap`` (``featurize/vmap.py``): torch.func per-sample gradients, flattened, then
  ``ops.project`` (dense / sparse / signshift). Any parameter; memory ``B * P``.

The featuriser works on any ``nn.Module`` through the policy protocol
(``policies/task.py``): a task gives the batch and ``output(model, batch, name, seed=,
draws=) -> [B]``; the engine's own policies are their own task. Both paths produce
``[B, k]`` rows for the same store format; :meth:`Featurizer.describe` is the JSON
recorded in ``RunConfig.featurizer`` so a run states exactly what produced it, including
which parameters were *not* tracked.
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
import logging

from torch import nn

from cupid_engine.policies.base import Policy
from cupid_engine.policies.samples import SampleSet
from cupid_engine.policies.task import batch_rows, resolve_task, task_hash, task_uses_draws
from cupid_engine.policies.tracking import Track, tracked_modules, tracked_parameters, untracked_parameters

log = logging.getLogger(__name__)

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
    """Map batches of samples to projected per-sample gradients.

    Args:
        policy: The policy: a module that is its own task (the engine's policies, or any
            module implementing the policy protocol); None when ``task`` is given. Put in
            eval mode (features are taken at inference behaviour).
        output: Output function name, one of the task's ``supported_outputs``.
        projection: The projection (method, k, seed, s, backend).
        track: ``"all"``, ``"head"`` or module names.
        path: ``"hooks"`` (tensorsketch) or ``"vmap"`` (dense/sparse/signshift).
        draws: Noise draws per sample of Monte-Carlo outputs (diffusion).
        seed: Global seed of the noise draws.
        policy_hash: Content hash recorded by :meth:`describe` (computed when None).
        task: A policy-protocol task (``build_batch``, ``output``, ``supported_outputs``)
            for a model the engine did not write.
        model: The module whose parameters are attributed (default: ``policy``, or
            ``task`` itself / ``task.model``).
        verify: Hook path: on the first batch, check the captured per-sample gradients
            of its first and last sample against plain autograd on that sample alone
            (:meth:`verify_hooks`), so a model that breaks the protocol's contract
            (rows mixed or reordered inside the model, a tracked weight also used outside
            its module) is refused instead of sketched wrongly. Costs two single-sample
            backward passes once; never changes the features.

    Raises:
        ValueError: method/path mismatch, unsupported output, unknown tracked names, or
            (hooks) a tracked module the hooks cannot handle (named) or a BatchNorm
            using batch statistics.
        TypeError: a task that does not implement the protocol (naming what is missing).
    """

    def __init__(
        self,
        policy: nn.Module | None,
        output: str,
        projection: ProjectionConfig,
        *,
        track: Track = "all",
        path: str = "hooks",
        draws: int = 64,
        seed: int = 0,
        policy_hash: str | None = None,
        task: Any = None,
        model: nn.Module | None = None,
        verify: bool = True,
    ) -> None:
        if not isinstance(projection, ProjectionConfig):
            raise TypeError(f"projection must be a ProjectionConfig, got {type(projection).__name__}")
        if path != path_for_method(projection.method):
            raise ValueError(
                f"projection method {projection.method!r} needs path {path_for_method(projection.method)!r}, got {path!r}"
            )
        model, task = resolve_task(policy, task=task, model=model)
        engine_policy = isinstance(task, Policy)
        if output not in task.supported_outputs or (engine_policy and output not in C.OUTPUT_FUNCTIONS):
            raise ValueError(
                f"output {output!r} is not supported by {type(task).__name__}; supported: {tuple(task.supported_outputs)}"
            )
        if draws < 1:
            raise ValueError(f"draws must be >= 1, got {draws}")
        self.policy = model.eval()
        self.task = task
        self.output = output
        self.projection = projection
        self.track = track if isinstance(track, str) else tuple(track)
        self.path = path
        self.draws = int(draws)
        self.seed = int(seed)
        self._policy_hash = policy_hash
        self._verify = bool(verify)
        self.layer_strategies: dict[str, dict[str, Any]] = {}
        """Per hooked layer: ``{"strategy": "fft"|"direct"|"dense"|"index", "T", "O", "I"}`` of the
        last batch (how :func:`hooks.fused_tensorsketch` evaluated its sketch)."""
        if path == "hooks":
            self.modules = tracked_modules(model, self.track, hook_compatible=True)
            _hooks.check_sample_independent(model)
            self._seeds = {name: _hooks.layer_seed(projection.seed, name) for name, _ in self.modules}
            self._by_name = dict(self.modules)
            self._workspace = _hooks._Workspace()
            if len(set(self._seeds.values())) != len(self._seeds):
                raise ValueError("two tracked layer names hash to the same seed; rename a module")
            # Parameters are left as they are (requires_grad untouched): autograd.grad asks
            # for the tracked outputs' deltas only, so no parameter gradient is computed,
            # and the caller's policy is not mutated.
            self.num_tracked = sum(
                p.numel() for _, m in self.modules for p in m.parameters(recurse=False) if p.requires_grad
            )
        else:
            self.params = tracked_parameters(model, self.track)
            self.order = list(self.params)
            self.num_tracked = sum(p.numel() for p in self.params.values())
        self.untracked = untracked_parameters(model, self.track)
        if self.untracked:
            log.info("featurizer: %d parameter tensor(s) (%d values) not tracked: %s", len(self.untracked),
                     sum(self.untracked.values()), list(self.untracked)[:20])

    @classmethod
    def from_config(
        cls, policy: nn.Module | None, config: FeaturizeConfig, *, policy_hash: str | None = None,
        task: Any = None, model: nn.Module | None = None,
    ) -> Featurizer:
        """A featuriser for ``config`` (projection, output, track, path, draws, seed)."""
        return cls(
            policy, config.output, config.projection, track=config.track, path=config.path,
            draws=config.draws, seed=config.seed, policy_hash=policy_hash, task=task, model=model,
        )

    @property
    def k(self) -> int:
        return self.projection.k

    @property
    def policy_hash(self) -> str:
        if self._policy_hash is None:
            self._policy_hash = task_hash(self.policy, self.task)
        return self._policy_hash

    def describe(self) -> dict[str, Any]:
        """JSON-safe description for ``RunConfig.featurizer``: everything that determines
        the numbers (policy hash and class, output, draws, noise seed, tracked modules and
        their parameter count, path, projection) and nothing that does not (batch size,
        backend, workers, per-layer evaluation strategy).

        Parameters that are not tracked (outside ``track``, or frozen) are listed by name
        with their element counts under ``untracked_parameters``; the key is present only
        when there are some, so runs that track everything keep their description. A task
        that is not the model itself adds ``task_class``.
        """
        uses_draws = task_uses_draws(self.task)
        out = {
            "version": FEATURIZER_VERSION,
            "policy_hash": self.policy_hash,
            "policy_class": type(self.policy).__name__,
            "output": self.output,
            "draws": self.draws if uses_draws else None,
            "noise_seed": self.seed if uses_draws else None,
            "track": self.track if isinstance(self.track, str) else list(self.track),
            "tracked_modules": [n for n, _ in self.modules] if self.path == "hooks" else self.order,
            "num_tracked_parameters": int(self.num_tracked),
            "path": self.path,
            "projection": self.projection.describe(),
            "layer_seeds": "stream_key(stream_key(seed, STREAM_LAYER), crc32(name))" if self.path == "hooks" else None,
        }
        if self.untracked:
            out["untracked_parameters"] = {"count": int(sum(self.untracked.values())), "tensors": dict(self.untracked)}
        if self.task is not self.policy:
            out["task_class"] = type(self.task).__name__
        return out

    def parameter_report(self) -> list[dict[str, Any]]:
        """One row per parameter tensor of the model: ``name``, ``shape``, ``count``,
        ``module`` (its type), ``tracked`` and, when not tracked, ``why`` (``frozen`` or
        ``outside track``); on the hook path tracked rows carry the ``strategy`` of the
        last batch when known. Nothing is left out: the counts add up to the model's."""
        tracked = set(self.params) if self.path == "vmap" else {
            f"{n}.{pn}" if n else pn for n, m in self.modules for pn, p in m.named_parameters(recurse=False)
            if p.requires_grad
        }
        owner = {}
        for mname, module in self.policy.named_modules():
            for pn, _ in module.named_parameters(recurse=False):
                owner.setdefault(f"{mname}.{pn}" if mname else pn, (mname, type(module).__name__))
        rows = []
        for name, p in self.policy.named_parameters():
            mname, mtype = owner.get(name, ("", "?"))
            row: dict[str, Any] = {"name": name, "shape": tuple(p.shape), "count": int(p.numel()), "module": mtype,
                                   "tracked": name in tracked}
            if not row["tracked"]:
                row["why"] = "frozen" if not p.requires_grad else "outside track"
            elif mname in self.layer_strategies:
                row["strategy"] = self.layer_strategies[mname]["strategy"]
            rows.append(row)
        return rows

    def matches(self, stored: dict[str, Any]) -> bool:
        """Whether a run's recorded description ``stored`` was produced by this featuriser.

        Runs recorded before ``untracked_parameters`` was listed lack that purely
        informational key; they match when everything else is equal (so such stores can
        still be resumed and extended)."""
        now = self.describe()
        if stored == now:
            return True
        return "untracked_parameters" not in stored and stored == {
            k: v for k, v in now.items() if k != "untracked_parameters"
        }

    # ------------------------------------------------------------------ featurise
    def featurize_samples(self, samples: SampleSet, indices: Any = None) -> torch.Tensor:
        """``[B, k]`` features of raw samples (normalised here with the policy's normaliser)."""
        return self(self.policy.make_batch(samples, indices))

    def featurize_episodes(self, episodes: Any) -> torch.Tensor:
        """``[sum of lengths, k]`` features of every step of ``episodes`` (one batch, built by
        the task's ``build_batch``)."""
        return self(self.task.build_batch(list(episodes)))

    def _float_ref(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        for v in batch.values():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                return v
        return next(self.policy.parameters())

    def __call__(self, batch: dict[str, torch.Tensor], *, check_finite: bool = True) -> torch.Tensor:
        """Features of a model-ready batch.

        Args:
            batch: The task's batch (engine policies: ``obs [B, n_obs, D]``, ``action [B,
                H, A]``, ``episode_key [B]``, ``step [B]``, normalised).
            check_finite: Raise on NaN/Inf features naming the batch rows.

        Returns:
            ``[B, k]`` float32 (float64 for a float64 policy and batch).
        """
        sums = None
        with exact_float32(self._float_ref(batch).device):
            if self.path == "hooks":
                out, sums = self._hooks(batch)
            else:
                out = self._vmap(batch)
        out = out.detach()
        if check_finite:
            # ops.nonfinite_rows' test (a row whose sum is not finite), on the row sums the
            # hook path's kernel formed while writing the rows: no second pass over [B, k].
            bad = ~torch.isfinite(sums) if sums is not None else ops.nonfinite_rows(out)
            if bool(bad.any()):
                rows = bad.nonzero().flatten().tolist()
                raise ValueError(f"non-finite features (NaN/Inf gradients) in batch rows {rows[:10]}")
        return out

    def layer_factors(self, batch: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """Hook captures ``[(name, delta [B, T, O], x [B, T, I])]`` of one batch (hooks path;
        an Embedding's ``delta`` is its ``[B, T]`` token index, see ``HookCapture.factors``)."""
        n = batch_rows(batch)
        return [(name, *_hooks.HookCapture._layer(name, module, x, y, delta, n))
                for name, module, x, y, delta in self._raw_captures(batch)]

    def _raw_captures(self, batch: dict[str, torch.Tensor]) -> list[tuple[str, nn.Module, torch.Tensor, torch.Tensor,
                                                                         torch.Tensor]]:
        """``HookCapture.raw`` of one batch: ``[(name, module, x, y, delta)]`` before any layout."""
        if self.path != "hooks":
            raise ValueError("layer_factors needs path='hooks'")
        n = batch_rows(batch)
        with torch.enable_grad():
            with _hooks.HookCapture(self.modules) as cap:
                values = self.task.output(self.policy, batch, self.output, seed=self.seed, draws=self.draws)
                if tuple(values.shape) != (n,):
                    raise ValueError(
                        f"{type(self.task).__name__}.output({self.output!r}) returned shape {tuple(values.shape)}; "
                        f"the policy protocol needs one value per batch row: [{n}]"
                    )
                total = values.sum()
            return cap.raw(total)

    def _hooks(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``([n, k] features, [n] row sums or None)`` of one batch on the hook path."""
        n = batch_rows(batch)
        raw = self._raw_captures(batch)
        if self._verify:
            self._verify_raw(batch, raw, n)
            self._verify = False
        if not raw:  # no tracked layer influences the output: the gradient is 0
            ref = self._float_ref(batch)
            dtype = torch.float64 if ref.dtype == torch.float64 else torch.float32
            return torch.zeros(n, self.k, dtype=dtype, device=ref.device), None
        delta = raw[0][4]  # an output gradient: floating, of the model's dtype
        if delta.device.type == "cpu":
            # Each batch's fresh tensors (features, captures) on warm pages, not fresh ones
            # from the OS (page faults: up to ~1/3 of an MLP hook call); once per process.
            _hooks.retain_freed_memory()
        sums = torch.empty(n, dtype=torch.float64 if delta.dtype == torch.float64 else torch.float32,
                           device=delta.device)
        return self._sketch_raw(raw, n, row_sums=sums), sums

    def _sketch_raw(self, raw: list, n: int, *, row_sums: torch.Tensor | None = None) -> torch.Tensor:
        """``[n, k]`` sketch of a batch's raw captures (``HookCapture.raw``, not empty): the
        per-layer route chosen and recorded in :attr:`layer_strategies`, dense-route
        Linear/Conv layers streamed (``hooks.stream_dense_layer``), the rest laid out.
        ``row_sums`` (``[n]``, the features' dtype): filled with each row's sum
        (``hooks.fused_tensorsketch``)."""
        factors: list = []
        index_factors = []
        strategies: dict[str, dict[str, Any]] = {}
        calls: dict[str, int] = {}
        for name, *_ in raw:
            calls[name] = calls.get(name, 0) + 1
        for name, module, x, y, delta in raw:
            shape = _hooks.dense_layer_shape(module, x, delta, n) if x.shape[0] % n == 0 else None
            if shape is not None and _hooks.choose_strategy("auto", *shape, self.k, x.device) == "dense":
                # Linear/Conv on the dense route: G formed chunk by chunk from the raw capture,
                # the unfolded inputs never materialised whole (same numbers per sample).
                factors.append(_hooks.RawLayer(self._seeds[name], module, x, delta, n))
                strategies[name] = {"strategy": "dense", "T": shape[0], "O": shape[1], "I": shape[2]}
                continue
            if isinstance(module, nn.Linear) and shape is not None and module.bias is not None \
                    and module.bias.requires_grad and _hooks.kernel_route(self.k, x.device, x.dtype):
                # fft/direct on the C++ kernel: the bias input (a constant 1) is added by the
                # kernel itself, so x is handed over as captured (no [R, I + 1] copy).
                d, x = _hooks.HookCapture._layer(name, module, x, y, delta, n, bias_column=False)
                factors.append((self._seeds[name], d, x, True))
                strategies[name] = {"strategy": _hooks.choose_strategy("auto", *shape, self.k, x.device),
                                    "T": shape[0], "O": shape[1], "I": shape[2]}
                continue
            # A Linear's bias column goes into a reused buffer (no fresh [R, I + 1] per batch);
            # a module called twice in one pass keeps fresh tensors (one buffer per name).
            ws = self._workspace if calls[name] == 1 else None
            d, x = _hooks.HookCapture._layer(name, module, x, y, delta, n, ws)
            if isinstance(module, nn.Embedding):
                O = module.num_embeddings
                index_factors.append((self._seeds[name], d, x, O))
                strategies[name] = {"strategy": "index", "T": int(d.shape[1]), "O": O, "I": int(x.shape[2])}
            else:
                factors.append((self._seeds[name], d, x))
                T, O, I = int(d.shape[1]), int(d.shape[2]), int(x.shape[2])
                # The device decides the cost model (the C++ kernel's on CPU, flops elsewhere),
                # so the reported route is the one fused_tensorsketch takes there.
                route = _hooks.choose_strategy("auto", T, O, I, self.k, d.device)
                strategies[name] = {"strategy": route, "T": T, "O": O, "I": I}
        if strategies.keys() != self.layer_strategies.keys():
            log.info("featurizer per-layer strategies: %s",
                     {k: f"{v['strategy']} (T={v['T']}, O={v['O']}, I={v['I']})" for k, v in strategies.items()})
        self.layer_strategies = strategies
        return _hooks.fused_tensorsketch(factors, k=self.k, workspace=self._workspace, index_factors=index_factors,
                                         row_sums=row_sums)

    def verify_hooks(self, batch: dict[str, torch.Tensor], captured: list | None = None, *,
                     rows: tuple[int, ...] | None = None) -> None:
        """Check the hook captures against autograd on single samples (hook path).

        For each row ``b`` checked (default: the first and the last), the per-sample
        gradient matrix of every tracked module formed from the batch's captures must
        equal ``autograd.grad`` of ``output(batch[b:b+1])`` laid out the same way
        (``hooks.gradient_matrix``), to ``1e-3`` relative (``1e-8`` in float64).

        Raises:
            ValueError: naming the modules that differ and the likely cause.
        """
        n = batch_rows(batch)
        captured = self.layer_factors(batch) if captured is None else captured
        rows = tuple(sorted({0, n - 1})) if rows is None else rows
        self._verify_rows(batch, {b: [(name, d[b], x[b]) for name, d, x in captured] for b in rows})

    def _verify_raw(self, batch: dict[str, torch.Tensor], raw: list, n: int) -> None:
        """:meth:`verify_hooks` on raw captures, laying out only the checked samples' rows
        (the first and the last): the check never materialises the whole batch's factors."""
        rows = tuple(sorted({0, n - 1}))
        per_row: dict[int, list] = {b: [] for b in rows}
        for name, module, x, y, delta in raw:
            if x.shape[0] % n:  # lay out the whole call: raises naming the module
                _hooks.HookCapture._layer(name, module, x, y, delta, n)
            per = x.shape[0] // n
            for b in rows:
                d1, x1 = _hooks.HookCapture._layer(name, module, x[b * per:(b + 1) * per], y,
                                                   delta[b * per:(b + 1) * per], 1)
                per_row[b].append((name, d1[0], x1[0]))
        self._verify_rows(batch, per_row)

    def _verify_rows(self, batch: dict[str, torch.Tensor], per_row: dict[int, list]) -> None:
        """The check of :meth:`verify_hooks`: ``per_row[b]`` is ``[(name, delta_b [T, O], x_b [T, I])]``."""
        tol = 1e-8 if self._float_ref(batch).dtype == torch.float64 else 1e-3
        bad: dict[str, float] = {}
        for b, factors in per_row.items():
            hook_g: dict[str, torch.Tensor] = {}
            for name, db, xb in factors:
                module = self._by_name[name]
                if isinstance(module, nn.Embedding):
                    keep = db >= 0
                    g = xb.new_zeros(module.num_embeddings, xb.shape[1]).index_add_(0, db[keep], xb[keep])
                else:
                    g = db.transpose(0, 1) @ xb
                hook_g[name] = hook_g[name] + g if name in hook_g else g
            one = {k: v[b : b + 1] for k, v in batch.items()}
            params = [(n_, pn, p) for n_, m in self.modules for pn, p in m.named_parameters(recurse=False)
                      if p.requires_grad]
            with torch.enable_grad():
                total = self.task.output(self.policy, one, self.output, seed=self.seed, draws=self.draws).sum()
                grads = torch.autograd.grad(total, [p for _, _, p in params], allow_unused=True)
            per: dict[str, dict[str, torch.Tensor]] = {}
            for (name, pn, p), g in zip(params, grads):
                per.setdefault(name, {})[pn] = (torch.zeros_like(p) if g is None else g).unsqueeze(0)
            for name, module in self.modules:
                want = _hooks.gradient_matrix(module, per[name])[0]
                got = hook_g.get(name, torch.zeros_like(want)).to(want.dtype)
                err = float((got - want).norm()) / max(float(want.norm()), 1e-30)
                if float((got - want).norm()) > tol * float(want.norm()) + 1e-12 and err > bad.get(name, 0.0):
                    bad[name] = err
        if bad:
            worst = sorted(bad.items(), key=lambda kv: -kv[1])[:8]
            raise ValueError(
                f"hook-path check failed: the per-sample gradients captured for tracked modules "
                f"{[f'{k} (rel. error {v:.2g})' for k, v in worst]} differ from autograd on a single sample. The "
                f"model breaks the policy protocol's contract (policies/task.py): a tracked weight also used outside "
                f"its module (tied weights), rows of different samples mixed or reordered inside the model "
                f"(sequence-first layouts, batch statistics), or an output that is not deterministic given the "
                f"seed. Fix the model/task, track other modules, or use the torch.func (vmap) path."
            )

    def _vmap(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        n = batch_rows(batch)
        itemsize = self._float_ref(batch).element_size()
        chunk = max(1, min(n, _vmap.MAX_CHUNK_BYTES // max(1, self.num_tracked * itemsize)))
        outs = []
        p = self.projection
        for a in range(0, n, chunk):
            part = {key: v[a : a + chunk] for key, v in batch.items()}
            grads = _vmap.per_sample_grads(self.policy, self.params, part, self.output, seed=self.seed,
                                           draws=self.draws, task=self.task)
            flat = _vmap.flatten_grads(grads, self.order)
            outs.append(ops.project(flat, k=p.k, method=p.method, seed=p.seed, s=p.s, backend=p.backend, check_finite=False))
        return torch.cat(outs) if len(outs) > 1 else outs[0]

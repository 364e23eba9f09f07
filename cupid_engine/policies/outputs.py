"""Output functions f(z; θ) whose per-sample gradients the featuriser projects (DESIGN §1).

The outputs themselves are methods of the policy classes (the policy protocol,
``policies/task.py``: ``policy.output(policy, batch, name, seed=..., draws=...)``);
this module keeps the by-name functional view of them and documents their semantics.
Nothing here dispatches on a policy's class.

Every output function has the signature ``fn(policy, batch, *, seed=0, draws=64) ->
Tensor[B]`` on a *normalised* batch, and each sample's value depends only on that
sample's own inputs (no batch statistics, no batch-position-dependent noise). That makes
it usable in both featuriser paths:

* torch.func: ``vmap(grad(f))`` over batches of one sample each, through
  ``policy(batch, output=name, seed=seed, draws=draws)`` and ``functional_call``;
* hooks: one batched forward, ``sum_b f_b`` differentiated, Linear/Conv1d inputs and
  output gradients captured per row.

Outputs:

* ``loss``: the BC loss: MSE (deterministic MLP), NLL (Gaussian MLP), or the diffusion
  denoising loss ``mean_d mean_elem (ε_d - ε_θ(x_{t_d}, s, t_d))²`` with seeded draws.
* ``logprob``: ``log π_θ(a|s)`` for Gaussian MLPs only.
* ``square`` (CUPID Eq. 9): ``mean_d ||ε_θ(√ᾱ_t a + √(1-ᾱ_t) ε_d, s, t_d)||²`` over
  ``draws`` draws of ``(ε, t)`` seeded by ``hash(seed, episode_key, step, draw)``, so the
  value never depends on batch order or batch size. Diffusion only.
* ``energy`` (TRAK-Traj): label-agnostic ``||f_θ(o)||²``: the squared norm of the
  predicted normalised action mean for MLPs; the ``square`` form for diffusion.

Draw expansion (for the hook path). The diffusion outputs are means over draws. Rather
than looping, :func:`expand_for_output` repeats each sample ``draws`` times (rows ``b *
draws .. (b+1) * draws - 1``) with its noise and timestep attached, and
:func:`output_from_expanded` returns one value per row, already divided by ``draws``, so
that **the output of sample b is the sum of its rows** (``group_index`` says which rows).
A hook-based featuriser therefore sees ``B * draws`` rows and must sum the per-row
gradient sketches of each group: by linearity of the projection that equals the
projection of the per-sample gradient (project-then-average = average-then-project).
For MLP outputs the expansion is the identity (one row per sample; ``draws`` ignored).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from cupid_engine.constants import OUTPUT_FUNCTIONS
from cupid_engine.policies.base import Policy

OutputFn = Callable[..., torch.Tensor]


def expand_for_output(
    policy: Policy, batch: dict[str, torch.Tensor], name: str, *, draws: int = 64, seed: int = 0
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Repeat each sample once per noise draw (diffusion outputs) with its seeded noise.

    Args:
        policy: The policy.
        batch: Normalised batch of B samples (needs ``episode_key`` and ``step`` for
            diffusion outputs).
        name: Output function name.
        draws: Number of (ε, t) draws per sample (diffusion only).
        seed: Global seed of the draws, in ``[0, 2**63)``.

    Returns:
        ``(expanded, group_index)``: the expanded batch (``B * draws`` rows for
        diffusion, with extra ``noise [R, H, A]``, ``timestep [R]`` int64 and
        ``row_weight [R]`` (= 1/draws) fields; the batch
        itself for MLPs) and ``group_index [R]`` int64, the sample each row belongs to.
        Rows of one sample are contiguous.
    """
    return policy.expand_for_output(batch, name, draws=draws, seed=seed)


def output_from_expanded(policy: Policy, expanded: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """Per-row contributions ``[R]`` whose sum over a group is that sample's output.

    Args:
        policy: The policy.
        expanded: A batch from :func:`expand_for_output`.
        name: Output function name.

    Returns:
        ``[R]`` values (diffusion rows already divided by ``draws``).
    """
    return policy.output_rows(expanded, name)


def reduce_groups(values: torch.Tensor, group_index: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Sum per-row values ``[R]`` into per-sample outputs ``[num_groups]``."""
    out = values.new_zeros(num_groups)
    return out.index_add(0, group_index, values)


def _make(name: str) -> OutputFn:
    def fn(policy: Policy, batch: dict[str, torch.Tensor], *, seed: int = 0, draws: int = 64) -> torch.Tensor:
        return policy.output(policy, batch, name, seed=seed, draws=draws)

    fn.__name__ = f"output_{name}"
    fn.__doc__ = f"The {name!r} output function: ``fn(policy, batch, *, seed=0, draws=64) -> [B]``."
    return fn


_REGISTRY: dict[str, OutputFn] = {name: _make(name) for name in OUTPUT_FUNCTIONS}


def get_output(name: str) -> OutputFn:
    """The output function registered under ``name`` (one of ``constants.OUTPUT_FUNCTIONS``)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown output function {name!r}; choose one of {OUTPUT_FUNCTIONS}") from None


def functional_output(
    policy: Policy,
    params: dict[str, torch.Tensor],
    batch: dict[str, torch.Tensor],
    name: str,
    *,
    seed: int = 0,
    draws: int = 64,
) -> torch.Tensor:
    """``f(z; params)`` via ``torch.func.functional_call``: ``[B]``. Buffers (the
    normaliser, the noise schedule) are taken from ``policy`` unless in ``params``."""
    return torch.func.functional_call(policy, params, (batch,), {"output": name, "seed": seed, "draws": draws})

"""The ``Learner`` protocol: everything model-specific the audit needs.

The :class:`~cupid_engine.audit.protocol.AuditRunner` never sees model code; a learner
(the synthetic one in :mod:`cupid_engine.audit.synthetic` for tests, the robosuite one in
``cupid_engine.audit.sim_learner`` for real audits) trains, scores and evaluates.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Learner(Protocol):
    """Everything model-specific the audit needs; the runner holds no model code.

    Contract (the runner relies on each point):

    * ``fingerprint()`` -- a short string that changes whenever the learner would produce
      different numbers for the same call (dataset content, code version, planted
      effects ...). It is part of every cache key.
    * ``episode_info()`` -- the training episodes: a mapping (or ``pyarrow.Table``) with
      columns ``episode_id`` (str), ``length`` (steps) and ``tier`` (``better``/``okay``/
      ``worse`` or empty when unknown). Its order is irrelevant.
    * ``train(episode_ids, seed, workdir)`` -- train a policy *from scratch* on exactly
      ``episode_ids`` with training seed ``seed`` and the same optimisation budget
      (number of gradient steps, not epochs) whatever the subset size, and write the
      checkpoint into the existing empty directory ``workdir``. Files must reference
      each other by relative paths: the runner renames ``workdir`` into the cache when
      ``train`` returns, which is what makes the checkpoint count as finished.
    * ``score(model_dir, method, seed)`` -- score every training episode with
      ``method`` (any name except the built-ins ``random`` and ``length``) using the
      policy saved in ``model_dir``; return ``{episode_id: score}`` with **higher =
      keep**. Must be deterministic given its arguments (the resume check relies on it).
    * ``evaluate(model_dir, seed, rollouts)`` -- closed-loop success rate in ``[0, 1]``
      of the saved policy over ``rollouts`` rollouts whose initial states derive from
      ``seed`` only (so two policies of the same seed see the same initial states).

    With ``workers > 1`` the runner calls one learner from several threads (one seed per
    thread); a learner that is not thread-safe must be run with ``workers = 1``.
    """

    def fingerprint(self) -> str: ...

    def episode_info(self) -> Any: ...

    def train(self, episode_ids: Sequence[str], seed: int, workdir: Path) -> None: ...

    def score(self, model_dir: Path, method: str, seed: int) -> Mapping[str, float]: ...

    def evaluate(self, model_dir: Path, seed: int, rollouts: int) -> float: ...

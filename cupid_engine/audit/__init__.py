"""The four-gate pruning audit: does a curation method earn a deployment recommendation?

Modules, one role each:

* :mod:`~cupid_engine.audit.stats` -- paired seed-level statistics (t, Wilcoxon, sign,
  sign-flip permutation, bootstrap CI, Cohen's d_z, P(mu > 0)): ``paired_summary``.
* :mod:`~cupid_engine.audit.config` -- ``AuditConfig`` (TOML).
* :mod:`~cupid_engine.audit.learner` -- the ``Learner`` protocol (all model code).
* :mod:`~cupid_engine.audit.cache` -- the atomic on-disk cache of checkpoints, scores
  and evaluations.
* :mod:`~cupid_engine.audit.protocol` -- the resumable, cached ``AuditRunner`` and its
  pruning rules.
* :mod:`~cupid_engine.audit.gates` -- the four gates and the decision table
  (deploy / candidate signal / do not claim): ``evaluate_audit``.
* :mod:`~cupid_engine.audit.report` -- ``write_report`` (index.html, PNGs, audit.json).
* :mod:`~cupid_engine.audit.synthetic` -- a planted-effect learner for tests and smoke
  runs; the robosuite learner lives in ``cupid_engine.audit.sim_learner``.

Names are resolved lazily so that ``import cupid_engine.audit`` does not import scipy or
matplotlib until they are used.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "PairedStats": "stats",
    "paired_summary": "stats",
    "AuditConfig": "config",
    "AuditRunner": "protocol",
    "Learner": "learner",
    "AuditData": "results",
    "Condition": "results",
    "AuditResult": "gates",
    "Decision": "gates",
    "GateResult": "gates",
    "GateParams": "gates",
    "evaluate_audit": "gates",
    "write_report": "report",
    "load_result": "report",
    "SyntheticLearner": "synthetic",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

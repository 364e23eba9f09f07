"""Fixtures of the audit tests: small synthetic audits with planted ground truth."""

from __future__ import annotations

import pytest

from cupid_engine.audit.protocol import AuditConfig

# A planted world where the quality scores are informative and length is only weakly so.
SIGNAL = {"cupid": 3.0, "qoq": 2.0, "loss": 0.5, "tracin": 0.5, "null": 0.0}


def make_config(tmp_path, **overrides) -> AuditConfig:
    """A fast audit config (few draws, cache in ``tmp_path``)."""
    kwargs = dict(
        task="lift",
        dataset="synthetic",
        methods=("cupid", "null"),
        baselines=("length", "loss"),
        seeds=tuple(range(8)),
        heldout_seeds=(100, 101, 102, 103, 104, 105),
        prune_ratios=(0.2,),
        rollouts=200,
        cache_dir=str(tmp_path / "cache"),
        permutations=2000,
        bootstrap=2000,
        policy={"type": "synthetic"},
        learner_options={"signal": SIGNAL},
    )
    kwargs.update(overrides)
    return AuditConfig(**kwargs)


@pytest.fixture
def config_factory(tmp_path):
    return lambda **kw: make_config(tmp_path, **kw)

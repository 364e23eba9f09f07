"""Regression estimator: planted effects, penalties, resumable cache, Ray == in-process."""

from __future__ import annotations

import os

import numpy as np
import pytest

from dm_helpers import make_episodes

from cupid_engine.policies import MLPPolicyConfig, TrainConfig, build_samples
from cupid_engine.datamodels.clusters import make_clusters
from cupid_engine.datamodels.metrics import ProxyMetric
from cupid_engine.datamodels.regression import (
    RegressionConfig,
    SubsetCache,
    SubsetTrainer,
    evaluate_subsets,
    fit_linear_datamodel,
    regression_scores,
    sample_masks,
)


class PlantedLearner:
    """A synthetic 'training run': metric = Σ planted effects of kept clusters + noise."""

    def __init__(self, effects: np.ndarray, noise: float = 0.05, fail_after: int | None = None) -> None:
        self.effects = effects
        self.noise = noise
        self.fail_after = fail_after
        self.calls = 0

    def fingerprint(self) -> str:
        return f"planted-{len(self.effects)}-{self.noise}"

    def __call__(self, mask: np.ndarray) -> float:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("killed")  # what a Ctrl-C / SIGINT mid-run looks like
        self.calls += 1
        # Noise seeded by the mask: a re-run of the same training gives the same value.
        rng = np.random.default_rng(int.from_bytes(np.packbits(mask).tobytes(), "little") % 2**63)
        return float(mask @ self.effects + 1.0 + self.noise * rng.normal())


def test_recovers_planted_additive_effects(rng):
    effects = rng.normal(size=20)
    res = regression_scores(PlantedLearner(effects), 20, RegressionConfig(num_subsets=200, seed=1))
    assert np.corrcoef(res.scores, effects)[0, 1] >= 0.95
    assert res.model.intercept == pytest.approx(1.0, abs=0.2)


def test_ridge_and_lasso(rng):
    c = 15
    effects = np.zeros(c)
    effects[:3] = [2.0, -1.5, 1.0]
    masks = sample_masks(c, 120, seed=3)
    y = masks @ effects + 0.01 * rng.normal(size=120)
    ols = fit_linear_datamodel(masks, y)
    ridge = fit_linear_datamodel(masks, y, ridge=50.0)
    lasso = fit_linear_datamodel(masks, y, lasso=0.02)
    np.testing.assert_allclose(ols.beta, effects, atol=0.02)
    assert np.linalg.norm(ridge.beta) < np.linalg.norm(ols.beta)
    assert (np.abs(lasso.beta[3:]) < 1e-12).sum() >= 10  # sparse
    np.testing.assert_allclose(lasso.beta[:3], effects[:3], atol=0.1)
    # Several targets at once equal target-by-target fits.
    y2 = np.stack([y, -y], 1)
    both = fit_linear_datamodel(masks, y2, ridge=1.0)
    np.testing.assert_allclose(both.beta[:, 1], -fit_linear_datamodel(masks, y, ridge=1.0).beta)


def test_masks_seeded_and_nonempty():
    a = sample_masks(3, 50, p=0.2, seed=4)
    np.testing.assert_array_equal(a, sample_masks(3, 50, p=0.2, seed=4))
    assert a.any(1).all()
    assert not np.array_equal(a, sample_masks(3, 50, p=0.2, seed=5))


def test_killed_run_resumes_from_cache(tmp_path, rng):
    effects = rng.normal(size=10)
    masks = sample_masks(10, 12, seed=0)
    first = PlantedLearner(effects, fail_after=5)
    with pytest.raises(KeyboardInterrupt):
        evaluate_subsets(first, masks, cache_dir=tmp_path)
    assert first.calls == 5
    cache = SubsetCache(tmp_path, first.fingerprint())
    assert len(cache) == 5
    assert not [n for n in os.listdir(cache.dir) if n.startswith(".tmp-")]  # only complete entries
    second = PlantedLearner(effects)
    values, info = evaluate_subsets(second, masks, cache_dir=tmp_path)
    assert second.calls == 7 and info == {"trained": 7, "cached": 5}
    uninterrupted, _ = evaluate_subsets(PlantedLearner(effects), masks)
    np.testing.assert_array_equal(values, uninterrupted)
    third = PlantedLearner(effects)
    evaluate_subsets(third, masks, cache_dir=tmp_path)
    assert third.calls == 0


def _tiny_trainer(steps=6):
    samples = build_samples(make_episodes(n=4, length=6))
    target = make_episodes(n=2, length=6, seed=9, prefix="tg")
    return SubsetTrainer(MLPPolicyConfig(hidden_sizes=(8,)), samples, make_clusters(samples),
                         TrainConfig(steps=steps, batch_size=8, lr=0.01, seed=0), ProxyMetric(target, per_episode=True))


def test_equal_masks_train_once():
    learner = PlantedLearner(np.arange(3.0))
    masks = np.array([[1, 0, 1], [1, 0, 1], [0, 1, 0]], dtype=bool)
    values, info = evaluate_subsets(learner, masks)
    assert learner.calls == 2 and info["trained"] == 2
    assert values[0, 0] == values[1, 0]


def test_subset_trainer_cache_keys_on_setup(tmp_path):
    masks = np.array([[1, 0, 1, 1], [0, 1, 1, 0], [1, 1, 0, 1]], dtype=bool)
    trainer = _tiny_trainer()
    values, info = evaluate_subsets(trainer, masks, cache_dir=tmp_path)
    assert values.shape == (3, 2) and info["trained"] == 3
    again, info = evaluate_subsets(_tiny_trainer(), masks, cache_dir=tmp_path)
    assert info == {"trained": 0, "cached": 3}
    np.testing.assert_array_equal(again, values)
    # Another budget is another setup: nothing reused.
    _, info = evaluate_subsets(_tiny_trainer(steps=7), masks, cache_dir=tmp_path)
    assert info["trained"] == 3


@pytest.mark.ray
def test_ray_equals_in_process(tmp_path):
    masks = sample_masks(4, 4, seed=2)
    local, _ = evaluate_subsets(_tiny_trainer(), masks)
    from cupid_engine.distributed import RayExecutor

    remote, info = evaluate_subsets(_tiny_trainer(), masks, executor=RayExecutor(2), cache_dir=tmp_path)
    assert info["trained"] == len(np.unique(masks, axis=0))
    np.testing.assert_array_equal(remote, local)
    # Equal masks share one entry (C = 4 clusters repeat masks).
    assert len(SubsetCache(tmp_path, _tiny_trainer().fingerprint())) == len(np.unique(masks, axis=0))


def test_sigkilled_process_resumes(tmp_path):
    """A run killed with SIGKILL mid-way (no cleanup at all) resumes from its cache."""
    import signal
    import subprocess
    import sys
    import time

    from dm_helpers import SlowPlanted

    effects = np.linspace(-1, 1, 8)
    np.save(tmp_path / "effects.npy", effects)
    script = (
        "import sys, numpy as np\n"
        f"sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
        "from dm_helpers import SlowPlanted\n"
        "from cupid_engine.datamodels.regression import evaluate_subsets, sample_masks\n"
        f"fn = SlowPlanted(np.load({str(tmp_path / 'effects.npy')!r}), {str(tmp_path / 'calls1')!r}, delay=0.3)\n"
        f"evaluate_subsets(fn, sample_masks(8, 40, seed=0), cache_dir={str(tmp_path / 'cache')!r})\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    cache_dir = tmp_path / "cache" / SlowPlanted(effects, "").fingerprint()
    deadline = time.time() + 60
    while time.time() < deadline and (not cache_dir.exists() or len(list(cache_dir.glob("[!.]*.json"))) < 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    masks = sample_masks(8, 40, seed=0)
    finished = len(list(cache_dir.glob("[!.]*.json")))
    assert 3 <= finished < len(np.unique(masks, axis=0))
    fn = SlowPlanted(effects, tmp_path / "calls2")
    values, info = evaluate_subsets(fn, masks, cache_dir=tmp_path / "cache")
    calls = len((tmp_path / "calls2").read_text().splitlines())
    distinct = len(np.unique(masks, axis=0))  # equal masks are one training
    assert info["trained"] == calls and calls == distinct - info["cached"] and info["cached"] >= finished
    np.testing.assert_allclose(values[:, 0], masks @ effects, atol=1e-12)

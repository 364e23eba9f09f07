"""DemoConfig: the state demo's defaults are what `make demo` ran; the image preset validates."""

from __future__ import annotations

import pytest

from cupid_engine.demo import DemoConfig


def test_state_defaults_are_make_demos():
    cfg = DemoConfig()
    assert (cfg.obs, cfg.policy, cfg.demos_per_tier, cfg.train_steps, cfg.rollouts, cfg.k, cfg.output, cfg.draws,
            cfg.rollout_horizon) == ("state", "mlp", 20, 3000, 30, 1024, "energy", 64, 0)
    assert DemoConfig.from_dict(cfg.to_dict()) == cfg


def test_image_preset_and_overrides():
    cfg = DemoConfig.image(rollouts=3)
    assert (cfg.obs, cfg.policy, cfg.policy_size, cfg.cameras, cfg.output, cfg.rollouts) == (
        "image", "diffusion-image", "tiny", ("agentview",), "square", 3)
    assert DemoConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("kw, msg", [
    ({"obs": "depth"}, "obs must be state or image"),
    ({"policy": "diffusion-image"}, "policy must be mlp or diffusion"),
    ({"obs": "image", "policy": "mlp"}, "obs=image needs policy diffusion-image"),
    ({"obs": "image", "policy": "diffusion-image", "image_size": 8}, "image_size must be >= 17"),
    ({"draws": 0}, "draws must be >= 1"),
])
def test_bad_combinations_are_named(kw, msg):
    with pytest.raises(ValueError, match=msg):
        DemoConfig(**kw)

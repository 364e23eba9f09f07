"""Policy kinds by name: ``"mlp"``, ``"diffusion"``, ``"diffusion-image"``, ``"transformer"``
-> (config class, policy class)."""

from __future__ import annotations

from typing import Any

from cupid_engine.policies.base import Policy, PolicyConfig
from cupid_engine.policies.diffusion import DiffusionPolicy, DiffusionPolicyConfig
from cupid_engine.policies.diffusion_image import DiffusionImagePolicy, DiffusionImagePolicyConfig
from cupid_engine.policies.mlp import MLPPolicy, MLPPolicyConfig
from cupid_engine.policies.transformer import TransformerPolicy, TransformerPolicyConfig

POLICIES: dict[str, tuple[type[PolicyConfig], type[Policy]]] = {
    "mlp": (MLPPolicyConfig, MLPPolicy),
    "diffusion": (DiffusionPolicyConfig, DiffusionPolicy),
    "diffusion-image": (DiffusionImagePolicyConfig, DiffusionImagePolicy),
    "transformer": (TransformerPolicyConfig, TransformerPolicy),
}


def policy_kind(config_or_policy: PolicyConfig | Policy) -> str:
    """The registry name of a config or policy."""
    cls = type(config_or_policy.config if isinstance(config_or_policy, Policy) else config_or_policy)
    for name, (config_cls, _) in POLICIES.items():
        if cls is config_cls:
            return name
    raise ValueError(f"no registered policy for config class {cls.__name__}")


def make_policy_config(kind: str, **fields: Any) -> PolicyConfig:
    """Default config of a policy kind with ``fields`` overridden."""
    if kind not in POLICIES:
        raise ValueError(f"unknown policy kind {kind!r}; choose one of {tuple(POLICIES)}")
    return POLICIES[kind][0](**fields)


def build_policy(config: PolicyConfig) -> Policy:
    """Instantiate the policy class matching ``config`` (dims must be resolved)."""
    return POLICIES[policy_kind(config)][1](config)

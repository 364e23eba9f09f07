"""Robot policies the engine trains, rolls out and attributes.

This subpackage owns everything model-specific, so the featuriser, scorers and
datamodel trainers never see model code:

* ``samples``: cut episodes into samples (observation window + action chunk, padded as
  in diffusion_policy) identified by ``(episode_key, step)``.
* ``normalizer``: per-dimension gaussian / min-max normaliser with a minimum spread, so
  near-constant dimensions are not amplified into noise.
* ``mlp``: :class:`MLPPolicy`, deterministic or Gaussian head. The cheap, exactly
  differentiable policy: ``loss``/``logprob`` are exact log-likelihood quantities, which
  is where influence functions are best understood; Linear layers only, so every
  parameter is hook-featurisable.
* ``diffusion``: :class:`DiffusionPolicy`, a small Conv1d UNet trained with DDPM and
  sampled with DDIM: the policy class CUPID targets, attributed through the ``square``
  surrogate (CUPID Eq. 9).
* ``vision``: ResNet-18 with GroupNorm and spatial-softmax pooling, written here (no
  torchvision), random or local-safetensors weights.
* ``diffusion_image``: :class:`DiffusionImagePolicy`, CUPID's image diffusion policy: one
  ResNet-18 (GN) encoder per camera + low-dim state conditioning the Conv1d UNet.
* ``transformer``: :class:`TransformerPolicy`, Octo/ACT-like: patch + state + word-hash
  language tokens, self-attention from ``nn.Linear``, a diffusion head.
* ``image_samples``: samples with camera frames and task-text tokens.
* ``task``: the policy protocol (:class:`PolicyTask`): ``build_batch(episodes)`` +
  ``output(model, batch, name, *, seed, draws) -> [B]``; the engine featurises, stores,
  scores and queries any ``nn.Module`` through it. The policies here are their own task.
* ``outputs``: the by-name view of the output functions ``loss``, ``logprob``,
  ``square``, ``energy`` (methods of the policy classes) and the draw expansion.
* ``tracking``: which modules/parameters are differentiated (``all``, ``head``, names).
* ``training``: :func:`train_policy` with per-sample / per-cluster loss weights
  (weight 0 == removal), EMA, deterministic data order.
* ``checkpoint``: safetensors + JSON checkpoints with a content hash.
"""

from cupid_engine.policies.base import Policy, PolicyConfig
from cupid_engine.policies.checkpoint import compute_policy_hash, load_policy, policy_hash, save_policy
from cupid_engine.policies.diffusion import DiffusionPolicy, DiffusionPolicyConfig, seeded_diffusion_noise
from cupid_engine.policies.diffusion_image import DiffusionImagePolicy, DiffusionImagePolicyConfig
from cupid_engine.policies.image_samples import ImageSampleSet, build_image_samples
from cupid_engine.policies.mlp import MLPPolicy, MLPPolicyConfig
from cupid_engine.policies.normalizer import Normalizer
from cupid_engine.policies.outputs import (
    expand_for_output,
    functional_output,
    get_output,
    output_from_expanded,
    reduce_groups,
)
from cupid_engine.policies.registry import POLICIES, build_policy, make_policy_config, policy_kind
from cupid_engine.policies.samples import SampleSet, build_samples, episode_key
from cupid_engine.policies.transformer import TransformerPolicy, TransformerPolicyConfig
from cupid_engine.policies.task import PolicyTask, resolve_task, task_hash
from cupid_engine.policies.tracking import hook_refusal, tracked_modules, tracked_parameters, untracked_parameters
from cupid_engine.policies.training import TrainConfig, sample_weight_vector, train_policy

__all__ = [
    "POLICIES",
    "DiffusionImagePolicy",
    "DiffusionImagePolicyConfig",
    "DiffusionPolicy",
    "DiffusionPolicyConfig",
    "MLPPolicy",
    "MLPPolicyConfig",
    "ImageSampleSet",
    "Normalizer",
    "Policy",
    "PolicyConfig",
    "PolicyTask",
    "SampleSet",
    "TrainConfig",
    "TransformerPolicy",
    "TransformerPolicyConfig",
    "build_image_samples",
    "build_policy",
    "build_samples",
    "compute_policy_hash",
    "episode_key",
    "expand_for_output",
    "functional_output",
    "get_output",
    "hook_refusal",
    "load_policy",
    "make_policy_config",
    "output_from_expanded",
    "policy_hash",
    "policy_kind",
    "reduce_groups",
    "resolve_task",
    "sample_weight_vector",
    "save_policy",
    "seeded_diffusion_noise",
    "task_hash",
    "tracked_modules",
    "tracked_parameters",
    "train_policy",
    "untracked_parameters",
]

"""The featuriser: policy samples -> projected per-sample gradients in a gradient store.

* ``config``: :class:`ProjectionConfig` and :class:`FeaturizeConfig` (frozen, validated,
  recorded in every run).
* ``hooks``: the hook path, tensorsketch of per-layer captures (Linear, Conv1d/Conv2d
  unfolded, GroupNorm/LayerNorm affine, Embedding), fused over layers in the frequency
  domain or hashed per layer, whichever is cheaper; per-sample gradients of the whole
  model are never formed, so memory is independent of the number of tracked parameters.
  Any other tracked parameter is refused by name.
* ``vmap``: the torch.func path, explicit per-sample gradients + ``ops.project``
  (dense/sparse/signshift); also the reference the hook path is tested against.
* ``featurizer``: :class:`Featurizer`, one object for both paths, with ``describe()``;
  it works on any ``nn.Module`` through the policy protocol (``policies.PolicyTask``).
* ``pipeline``: :func:`featurize` (register -> run -> stream shards -> finalize, resumable),
  over ``register`` (a source's episodes into the store catalog, unit by unit) and
  ``shards`` (:func:`featurize_shard`, the unit of work, and :func:`featurize_shards` on an
  executor).
* ``synthetic``: :class:`SyntheticSource`, deterministic episodes generated on the fly
  (benchmarks, tests).

Where shards run is the caller's executor (``cupid_engine.executor``); Ray is imported only
by ``cupid_engine.distributed`` (its ``RayExecutor``).
"""

from cupid_engine.featurize.config import FeaturizeConfig, ProjectionConfig, path_for_method
from cupid_engine.featurize.featurizer import Featurizer
from cupid_engine.featurize.hooks import fused_tensorsketch, layer_seed
from cupid_engine.featurize.pipeline import featurize
from cupid_engine.featurize.shards import featurize_shard
from cupid_engine.featurize.synthetic import SyntheticSource

__all__ = [
    "FeaturizeConfig",
    "Featurizer",
    "ProjectionConfig",
    "SyntheticSource",
    "featurize",
    "featurize_shard",
    "fused_tensorsketch",
    "layer_seed",
    "path_for_method",
]

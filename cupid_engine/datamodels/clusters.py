"""Clusters of training samples: the units a datamodel scores (DataMIL §4.2).

A datamodel that scores single samples is noisy (each sample is seen a handful of times
in training), so DataMIL scores *clusters*: whole trajectories (the default, best for
large prior datasets) or sub-trajectories of ``h`` consecutive steps (``h = 15`` in the
paper's LIBERO runs). A cluster id is a function of the sample's ``(episode_index,
step)`` only, never of its position in the SampleSet, so it is stable under reordering.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from cupid_engine.config import Config, check, field
from cupid_engine.policies.samples import SampleSet

from cupid_engine.constants import CLUSTER_MODES  # noqa: E402


@dataclasses.dataclass(frozen=True)
class ClusterConfig(Config):
    """How training samples are grouped into the clusters a datamodel scores."""

    mode: str = field("trajectory", help=f"one of {CLUSTER_MODES}: whole episodes or windows of `window` steps")
    window: int = field(15, help="sub-trajectory length h in steps (mode=subtrajectory)")

    def __post_init__(self) -> None:
        check(self.mode in CLUSTER_MODES, f"mode must be one of {CLUSTER_MODES}, got {self.mode!r}")
        check(self.window >= 1, f"window must be >= 1, got {self.window}")


@dataclasses.dataclass(frozen=True)
class Clusters:
    """Cluster assignment of a SampleSet.

    Attributes:
        ids: ``[N]`` int64 cluster id of each sample, in ``0..C-1``.
        names: ``C`` cluster names: the episode id (trajectory clusters) or
            ``"<episode_id>@<first step>"`` (sub-trajectories).
        episode: ``[C]`` int64 episode index (into ``SampleSet.episode_ids``) of each cluster.
        episode_ids: The SampleSet's episode ids.
    """

    ids: np.ndarray
    names: list[str]
    episode: np.ndarray
    episode_ids: list[str]

    @property
    def num_clusters(self) -> int:
        return len(self.names)

    def sizes(self) -> np.ndarray:
        """``[C]`` int64 samples per cluster."""
        return np.bincount(self.ids, minlength=self.num_clusters).astype(np.int64)

    def members(self, cluster: int) -> np.ndarray:
        """Sample indices of one cluster, ``[n_c]`` int64."""
        return np.flatnonzero(self.ids == cluster)

    def sample_mask(self, cluster_mask: np.ndarray) -> np.ndarray:
        """``[C]`` bool cluster mask -> ``[N]`` bool sample mask."""
        cm = np.asarray(cluster_mask, dtype=bool)
        if cm.shape != (self.num_clusters,):
            raise ValueError(f"cluster mask must be [C={self.num_clusters}], got {cm.shape}")
        return cm[self.ids]

    def episode_scores(self, cluster_scores: np.ndarray) -> np.ndarray:
        """Per-episode scores ``[E]`` as the sum of their clusters' scores ``[C]``.

        Sums because the datamodel is additive: removing an episode removes all of its
        sub-trajectories, whose predicted effects add.
        """
        s = np.asarray(cluster_scores, dtype=np.float64)
        out = np.zeros(len(self.episode_ids), dtype=np.float64)
        np.add.at(out, self.episode, s)
        return out


def with_fixed_cluster(clusters: Clusters, num_extra_samples: int, name: str = "<fixed>") -> Clusters:
    """``clusters`` plus one trailing cluster holding ``num_extra_samples`` samples appended
    after the original ones (e.g. target demonstrations mixed into every training run).

    The extra cluster's ``episode`` entry is -1: it belongs to no scored episode (use
    :meth:`Clusters.episode_scores` on the original clusters).
    """
    if num_extra_samples < 1:
        raise ValueError("the fixed cluster needs at least one sample")
    c = clusters.num_clusters
    return Clusters(
        ids=np.concatenate([clusters.ids, np.full(num_extra_samples, c, np.int64)]),
        names=list(clusters.names) + [name], episode=np.concatenate([clusters.episode, [-1]]).astype(np.int64),
        episode_ids=list(clusters.episode_ids),
    )


def make_clusters(samples: SampleSet, config: ClusterConfig | None = None) -> Clusters:
    """Assign every sample to a cluster.

    Args:
        samples: The training samples (uses ``episode_index`` and ``step`` only).
        config: Clustering mode and window (default: trajectories).

    Returns:
        The :class:`Clusters`; clusters are numbered by (episode, first step), so
        episode order in the SampleSet fixes the numbering.
    """
    cfg = config or ClusterConfig()
    ep = torch.as_tensor(samples.episode_index).numpy().astype(np.int64)
    step = torch.as_tensor(samples.step).numpy().astype(np.int64)
    if cfg.mode == "trajectory":
        used = np.unique(ep)
        remap = np.full(len(samples.episode_ids), -1, np.int64)
        remap[used] = np.arange(len(used))
        return Clusters(
            ids=remap[ep], names=[samples.episode_ids[i] for i in used], episode=used.astype(np.int64),
            episode_ids=list(samples.episode_ids),
        )
    window = step // cfg.window
    # Unique (episode, window) pairs in lexicographic order give stable dense ids.
    keys = np.stack([ep, window], axis=1)
    uniq, ids = np.unique(keys, axis=0, return_inverse=True)
    names = [f"{samples.episode_ids[e]}@{w * cfg.window}" for e, w in uniq]
    return Clusters(ids=ids.reshape(-1).astype(np.int64), names=names, episode=uniq[:, 0].astype(np.int64),
                    episode_ids=list(samples.episode_ids))

"""Episodes and dataset sources: everything that turns files into :class:`Episode` streams.

The package owns the in-memory :class:`Episode`, the Arrow episode schema and its
validation (``schema``), and one streaming reader per format the engine must score:

* ``lerobot``: our own on-disk format (LeRobot v3.0 Parquet, readable by pyarrow alone),
  written by :func:`write_dataset`; the reader also opens LeRobot v2.1 hub datasets.
* ``robomimic``: robomimic HDF5, home of the MH mixed-quality datasets whose filter keys
  give splits and better/okay/worse tiers (the CUPID/QoQ benchmarks).
* ``rlds``: Open X-Embodiment RLDS TFRecord shards, read without TensorFlow, with both
  record CRCs checked, for million-episode mixtures.
* ``replay``: diffusion_policy zarr replay buffers, the format its policies train on.

Episodes carry images (``Episode.images``: camera key -> ``uint8 [T, H, W, C]``, lazily
decoded) and language (``Episode.task``); see :mod:`cupid_engine.data.episode`.

Every reader implements :class:`EpisodeSource` (``catalog``, ``episodes``, ``shards``,
``iter_shard``); :func:`open_source` picks one from what is on disk.
"""

from cupid_engine.data._util import UnknownKeyError, escape_id
from cupid_engine.data.episode import Episode, ImageSequence
from cupid_engine.data.lerobot import LeRobotDataset, open_dataset, write_dataset
from cupid_engine.data.replay import ReplayBufferDataset, write_replay_buffer
from cupid_engine.data.rlds import RLDSDataset, TFRecordError, write_rlds
from cupid_engine.data.robomimic import RobomimicDataset, write_robomimic
from cupid_engine.data.schema import (
    EPISODE_SCHEMA,
    EpisodeError,
    EpisodeValidator,
    FormatError,
    episodes_table,
    validate_episodes,
)
from cupid_engine.data.sources import EpisodeSource, detect_format, open_source

__all__ = [
    "EPISODE_SCHEMA",
    "Episode",
    "EpisodeError",
    "EpisodeSource",
    "EpisodeValidator",
    "FormatError",
    "ImageSequence",
    "LeRobotDataset",
    "RLDSDataset",
    "ReplayBufferDataset",
    "RobomimicDataset",
    "TFRecordError",
    "UnknownKeyError",
    "detect_format",
    "episodes_table",
    "escape_id",
    "open_dataset",
    "open_source",
    "validate_episodes",
    "write_dataset",
    "write_replay_buffer",
    "write_rlds",
    "write_robomimic",
]

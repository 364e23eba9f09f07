"""Episodes and dataset sources."""

from cupid_engine.data.episode import Episode
from cupid_engine.data.lerobot import LeRobotDataset, open_dataset, write_dataset
from cupid_engine.data.schema import EPISODE_SCHEMA, EpisodeError, FormatError, episodes_table

__all__ = ["Episode", "EPISODE_SCHEMA", "EpisodeError", "FormatError", "LeRobotDataset", "episodes_table", "open_dataset", "write_dataset"]

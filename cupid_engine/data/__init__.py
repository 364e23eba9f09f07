"""Episodes and dataset sources (placeholder; the data helper fills this in)."""

from cupid_engine.data.episode import Episode

__all__ = ["Episode"]

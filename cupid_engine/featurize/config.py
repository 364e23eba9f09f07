"""Configuration of the featuriser: which projection, which output, which parameters.

Two frozen configs (STYLE §2):

* :class:`ProjectionConfig`: the random map ``g -> phi = P g`` (DESIGN §3): method,
  ``k``, seed, sparsity and backend. Recorded verbatim in every store run.
* :class:`FeaturizeConfig`: everything else that changes the features (output function,
  draws, tracked parameters, noise seed, gradient path) plus how they are produced and
  stored (batch size, store dtype, shard size), which do not change the numbers.

The gradient *path* follows from the method: ``tensorsketch`` factors each layer's
per-sample gradient through hook captures (``hooks``) and never materialises it;
``dense``/``sparse``/``signshift`` project a flat per-sample gradient, which only the
torch.func path (``vmap``) produces. A mismatched pair is refused at construction.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from cupid_engine import constants as C
from cupid_engine.config import Config, check, field
from cupid_engine.store.config import STORAGE_DTYPES

PATHS = ("hooks", "vmap")
"""Gradient paths: forward/backward hooks + tensorsketch, or torch.func per-sample grads."""

PROJECTION_BACKENDS = ("auto", "torch", "cpu", "triton", "cuda")


def path_for_method(method: str) -> str:
    """The gradient path a projection method needs: ``hooks`` for tensorsketch, else ``vmap``."""
    return "hooks" if method == "tensorsketch" else "vmap"


@dataclasses.dataclass(frozen=True)
class ProjectionConfig(Config):
    """The random projection applied to per-sample gradients (DESIGN §3)."""

    method: str = field("tensorsketch", help=f"projection method: one of {C.SKETCH_METHODS}")
    k: int = field(4096, help="feature dimension (projection output size)")
    seed: int = field(0, help="projection seed in [0, 2**63); layer seeds of tensorsketch derive from it")
    s: int = field(1, help="non-zeros per coordinate for method 'sparse' (must divide k)")
    backend: str = field(
        "auto",
        help=f"ops.project backend of the vmap path: one of {PROJECTION_BACKENDS} (never changes the numbers; "
        "the hook path runs torch ops on the policy's device)",
    )

    def __post_init__(self) -> None:
        check(self.method in C.SKETCH_METHODS, f"method must be one of {C.SKETCH_METHODS}, got {self.method!r}")
        check(
            isinstance(self.k, int) and not isinstance(self.k, bool) and 0 < self.k < 2**31,
            f"k must be an int in [1, 2**31), got {self.k!r}",
        )
        check(
            isinstance(self.seed, int) and not isinstance(self.seed, bool) and 0 <= self.seed < 2**63,
            f"seed must be an int in [0, 2**63), got {self.seed!r}",
        )
        check(
            isinstance(self.s, int) and 1 <= self.s <= C.MAX_SPARSE_S,
            f"s must be an int in [1, {C.MAX_SPARSE_S}], got {self.s!r}",
        )
        if self.method == "sparse":
            check(self.k % self.s == 0, f"sparse projection needs s={self.s} to divide k={self.k}")
        else:
            check(self.s == 1, f"s is only used by method 'sparse'; got s={self.s} with {self.method!r}")
        check(self.backend in PROJECTION_BACKENDS, f"backend must be one of {PROJECTION_BACKENDS}, got {self.backend!r}")

    def describe(self) -> dict[str, Any]:
        """The fields that determine the numbers (``backend`` never does, so it is left out)."""
        return {"method": self.method, "k": self.k, "seed": self.seed, "s": self.s}


@dataclasses.dataclass(frozen=True)
class FeaturizeConfig(Config):
    """How episodes are turned into per-step features in a gradient store."""

    projection: ProjectionConfig = field(
        default_factory=ProjectionConfig, help="the random projection (method, k, seed, s, backend)"
    )
    output: str = field("loss", help=f"output function f(z; theta): one of {C.OUTPUT_FUNCTIONS}")
    draws: int = field(64, help="(eps, t) draws per sample of the diffusion outputs (ignored by MLP outputs)")
    track: str | tuple[str, ...] = field(
        "all", help="tracked parameters: 'all', 'head' or a tuple of module names (named_modules)"
    )
    path: str = field("hooks", help=f"gradient path: one of {PATHS}; tensorsketch needs hooks, the others vmap")
    seed: int = field(0, help="global seed of the diffusion noise draws, in [0, 2**63)")
    batch_size: int = field(1024, help="samples per featuriser batch (batches cross episode boundaries)")
    max_rows: int = field(
        16384,
        help="most (sample x draw) rows through the network at once: with a draw-using output a batch holds at most "
        "max_rows // draws samples, which bounds activation memory (a tiny diffusion UNet at 64 draws x 1024 "
        "samples needed ~20 GB); the default leaves every batch of <= 16 draws x 1024 samples as it was",
    )
    dtype: str = field("float16", help=f"storage dtype of per-step features: one of {STORAGE_DTYPES}")
    shard_size: int = field(256, help="most episodes per store shard (one worker writes one shard)")

    def __post_init__(self) -> None:
        if isinstance(self.projection, dict):  # tolerate a JSON-style nested dict
            object.__setattr__(self, "projection", ProjectionConfig.from_dict(self.projection))
        check(isinstance(self.projection, ProjectionConfig), "projection must be a ProjectionConfig")
        check(self.output in C.OUTPUT_FUNCTIONS, f"output must be one of {C.OUTPUT_FUNCTIONS}, got {self.output!r}")
        check(isinstance(self.draws, int) and self.draws >= 1, f"draws must be an int >= 1, got {self.draws!r}")
        if isinstance(self.track, list):
            object.__setattr__(self, "track", tuple(self.track))
        if isinstance(self.track, tuple):
            check(
                len(self.track) > 0 and all(isinstance(t, str) and t for t in self.track),
                f"track must be 'all', 'head' or a non-empty tuple of module names, got {self.track!r}",
            )
        else:
            check(isinstance(self.track, str) and self.track, f"track must be a non-empty string, got {self.track!r}")
        check(self.path in PATHS, f"path must be one of {PATHS}, got {self.path!r}")
        want = path_for_method(self.projection.method)
        check(
            self.path == want,
            f"projection method {self.projection.method!r} needs path {want!r}, got path {self.path!r} "
            "(tensorsketch factors per-layer hook captures; dense/sparse/signshift project a flat "
            "per-sample gradient from torch.func); use FeaturizeConfig.for_method(...)",
        )
        check(
            isinstance(self.seed, int) and 0 <= self.seed < 2**63, f"seed must be an int in [0, 2**63), got {self.seed!r}"
        )
        check(isinstance(self.batch_size, int) and self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size!r}")
        check(isinstance(self.max_rows, int) and self.max_rows >= 1, f"max_rows must be >= 1, got {self.max_rows!r}")
        check(self.dtype in STORAGE_DTYPES, f"dtype must be one of {STORAGE_DTYPES}, got {self.dtype!r}")
        check(isinstance(self.shard_size, int) and self.shard_size >= 1, f"shard_size must be >= 1, got {self.shard_size!r}")

    @classmethod
    def for_method(cls, method: str = "tensorsketch", *, k: int = 4096, seed: int = 0, s: int = 1,
                   backend: str = "auto", **overrides: Any) -> FeaturizeConfig:
        """A config whose ``path`` is the one ``method`` needs.

        Args:
            method: Projection method (``constants.SKETCH_METHODS``).
            k: Feature dimension.
            seed: Projection seed.
            s: Sparse non-zeros per coordinate.
            backend: Kernel backend.
            **overrides: Other :class:`FeaturizeConfig` fields.
        """
        proj = ProjectionConfig(method=method, k=k, seed=seed, s=s, backend=backend)
        return cls(**{"projection": proj, "path": path_for_method(method), **overrides})

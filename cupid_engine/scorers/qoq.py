"""QoQ max-influence scores (Quality over Quantity, 2026; DESIGN §1).

With unit-normalised step features φ̂ = φ/||φ|| and a validation set V:

  I(z) = max_{v∈V} φ̂(z)ᵀφ̂(v),   S(ξ) = sign(V) · (1/|ξ|) Σ_{z∈ξ} I(z).

No curvature is used (that is the method). sign(V) = +1 when V is clean target
demonstrations and −1 when V is failed rollouts. The per-step max over V is an exact
k = 1 inner-product search (FAISS ``IndexFlatIP``) over the validation steps, so no
step × step matrix is held; demo steps are searched in blocks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from cupid_engine.config import Config, check, field
from cupid_engine.errors import ConfigError
from cupid_engine.scorers import _inputs
from cupid_engine.scorers.base import Scorer, register
from cupid_engine.scorers.table import make_table

if TYPE_CHECKING:
    from cupid_engine.store.reader import StoreReader

VALIDATION_KINDS = ("target", "failed-rollouts")


def unit_rows(x: np.ndarray, *, what: str = "features") -> np.ndarray:
    """Rows divided by their L2 norm (float32, contiguous); zero rows are an error."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x.astype(np.float64), axis=1)
    if (norms == 0).any() or not np.isfinite(norms).all():
        raise ValueError(f"{what}: row {int(np.flatnonzero((norms == 0) | ~np.isfinite(norms))[0])} has zero or non-finite norm")
    return np.ascontiguousarray(x / norms[:, None].astype(np.float32))


def validation_index(validation_steps: np.ndarray) -> Any:
    """Exact FAISS inner-product index over unit-normalised ``[V, K]`` validation steps."""
    import faiss

    val = unit_rows(validation_steps, what="validation steps")
    index = faiss.IndexFlatIP(val.shape[1])
    index.add(val)
    return index


def qoq_scores(
    demo_steps: Sequence[np.ndarray],
    validation: np.ndarray | Any,
    *,
    sign: float = 1.0,
    block: int = 65536,
) -> np.ndarray:
    """S(ξ) for a list of demos.

    Args:
        demo_steps: ``N`` arrays ``[T_i, K]`` of raw step features φ.
        validation: ``[V, K]`` raw validation step features, or an index from
            :func:`validation_index` (reused across demo blocks).
        sign: +1 (target demos) or −1 (failed rollouts).
        block: Demo steps searched per FAISS call.

    Returns:
        ``[N]`` float64 scores.
    """
    index = validation_index(validation) if isinstance(validation, np.ndarray) else validation
    out = np.empty(len(demo_steps), np.float64)
    i = 0
    while i < len(demo_steps):
        j, rows = i, 0
        while j < len(demo_steps) and (j == i or rows + len(demo_steps[j]) <= block):
            rows += len(demo_steps[j])
            j += 1
        q = unit_rows(np.concatenate(demo_steps[i:j], 0), what="demo steps")
        best, _ = index.search(q, 1)  # [rows, 1] max inner product over V
        lens = [len(x) for x in demo_steps[i:j]]
        seg = np.repeat(np.arange(j - i), lens)
        out[i:j] = np.bincount(seg, weights=best[:, 0].astype(np.float64), minlength=j - i) / np.asarray(lens)
        i = j
    return sign * out


@dataclasses.dataclass(frozen=True)
class QoQConfig(Config):
    """Options of the QoQ scorer."""

    validation: str = field("target", help="V: 'target' (clean demos, sign +1) or 'failed-rollouts' (sign −1)")
    target: str = field("target", help="episodes of V when validation='target': split or comma-separated ids")
    rollouts: str = field("rollout", help="rollouts whose failures form V when validation='failed-rollouts'")
    episodes: str = field("train", help="episodes to score: split(s) joined by '+' or comma-separated ids")

    def __post_init__(self) -> None:
        check(self.validation in VALIDATION_KINDS, f"validation must be one of {VALIDATION_KINDS}")


@register
class QoQScorer(Scorer):
    """QoQ: mean over demo steps of the max cosine similarity to V."""

    name = "qoq"
    config_cls = QoQConfig

    def score(self, store: StoreReader, run: str, **inputs: Any) -> pa.Table:
        cfg = self.config
        r = store.run(run)
        cat = store.catalog()
        if cfg.validation == "target":
            try:
                val_ids, sign = _inputs.resolve_episodes(cat, cfg.target, default="target"), 1.0
            except ValueError as exc:
                raise ConfigError(
                    f"qoq: no validation episodes for validation='target' ({exc})",
                    hint="name clean target demos with --target SPLIT|IDS, or score against the failed rollouts "
                    "with --set validation=failed-rollouts",
                ) from None
        else:
            ro = _inputs.resolve_episodes(cat, cfg.rollouts, default="rollout")
            succ = _inputs.returns_of(cat, ro, "01")
            val_ids, sign = [e for e, s in zip(ro, succ) if s == 0.0], -1.0
            if not val_ids:
                raise ConfigError(
                    f"qoq: validation='failed-rollouts' but none of the {len(ro)} rollouts failed",
                    hint="use clean target demos instead (--set validation=target --target SPLIT|IDS)",
                )
        index = validation_index(np.concatenate([r.step_features(e) for e in val_ids], 0))
        demos = _inputs.resolve_episodes(cat, cfg.episodes, default="train")
        scores = np.empty(len(demos), np.float64)
        for start in range(0, len(demos), 1024):  # stream demos: step features never all in memory
            chunk = demos[start : start + 1024]
            scores[start : start + len(chunk)] = qoq_scores([r.step_features(e) for e in chunk], index, sign=sign)
        splits, meta = _inputs.metadata_columns(cat, demos)
        return make_table(demos, scores, method=self.name, splits=splits, config=cfg, metadata=meta)

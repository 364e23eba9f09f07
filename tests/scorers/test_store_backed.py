"""The adapters on a real Zarr gradient store give the same answers as on arrays."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

store_mod = pytest.importorskip("cupid_engine.store")

from cupid_engine.index import top_influencers  # noqa: E402
from cupid_engine.scorers import score  # noqa: E402
from cupid_engine.scorers.arrays import ArrayStore  # noqa: E402
from cupid_engine.scorers.preconditioner import Preconditioner  # noqa: E402


def _write(tmp_path, rng, k=6, gram_splits=("train",)):
    ids = [f"ep_{i:02d}" for i in range(14)]
    splits = ["train"] * 8 + ["holdout"] * 2 + ["rollout"] * 3 + ["target"]
    lengths = [1, 3, 2, 5, 4, 7, 2, 6, 3, 2, 4, 1, 3, 2]
    success = [None] * 10 + [True, False, True, None]
    steps = {e: rng.standard_normal((n, k)).astype(np.float32) for e, n in zip(ids, lengths)}
    st = store_mod.create_store(str(tmp_path / "s.zarr"))
    st.add_episodes(
        pa.table({"episode_id": ids, "split": splits, "length": lengths, "success": pa.array(success, pa.bool_())}),
        shard_size=4,
    )
    run = st.create_run("base", store_mod.RunConfig(k=k, gram_splits=gram_splits))
    for shard in range(st.num_shards):
        sid, lens = st.shard_episodes(shard)
        run.write_shard(shard, sid, np.concatenate([steps[e] for e in sid]), lens)
    run.finalize()
    return store_mod.open_store(str(tmp_path / "s.zarr")), steps, dict(zip(ids, splits)), dict(zip(ids, success))


def test_store_and_arrays_agree(tmp_path, rng):
    st, steps, splits, success = _write(tmp_path, rng)
    arr = ArrayStore.from_episodes(steps, splits, success={e: s for e, s in success.items() if s is not None})
    run = st.run("base")
    np.testing.assert_allclose(run.gram(), arr.run("base").gram(), rtol=1e-6)
    assert run.gram_count == arr.run("base").gram_count
    for method in ("cupid", "qoq", "tracin"):
        a, b = score(method, store=st, run="base"), score(method, store=arr, run="base")
        assert a["episode_id"].to_pylist() == b["episode_id"].to_pylist()
        np.testing.assert_allclose(a["score"].to_numpy(), b["score"].to_numpy(), rtol=1e-5, atol=1e-6)
    q = score("cupid-quality", store=str(tmp_path / "s.zarr"), run="base")
    assert q.num_rows == 8
    res = top_influencers(st, "base", "ep_11", k=3)
    assert res.sign == -1.0 and res.table.num_rows == 3
    assert (tmp_path / "s.zarr" / "index" / "base" / "flat.faiss").exists()


def test_store_gram_over_holdout_is_refused(tmp_path, rng):
    st, *_ = _write(tmp_path, rng, gram_splits=("train", "holdout"))
    with pytest.raises(ValueError, match="training split only"):
        Preconditioner.from_run(st.run("base"))

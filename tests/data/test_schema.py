"""Episode-level table and validation: clear errors naming the episode and the field."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from cupid_engine.data import Episode, episodes_table
from cupid_engine.data._util import escape_id
from cupid_engine.data.schema import (
    EPISODE_SCHEMA,
    EpisodeError,
    column_to_numpy,
    fixed_list,
    step_schema,
    validate_episodes,
)

from .helpers import make_episodes


def _ep(eid="a", T=4, A=2, obs=None, **kw):
    obs = {"state": np.zeros((T, 3), np.float32)} if obs is None else obs
    return Episode(eid, obs, np.zeros((T, A), np.float32), **kw)


def test_episodes_table_rows_and_types(rng):
    eps = make_episodes(rng, 5)
    table = episodes_table(eps)
    assert table.schema.equals(EPISODE_SCHEMA)
    assert table.column("episode_id").to_pylist() == [e.episode_id for e in eps]
    assert table.column("length").to_pylist() == [e.length for e in eps]
    assert table.column("success").to_pylist() == [e.success for e in eps]
    assert table.column("tier").to_pylist() == [e.tier for e in eps]
    assert [json.loads(m) for m in table.column("metadata").to_pylist()] == [e.metadata for e in eps]


def test_nullable_fields_stay_null():
    table = episodes_table([_ep()])
    row = table.to_pylist()[0]
    assert row["success"] is None and row["return"] is None and row["tier"] is None
    assert row["metadata"] == "{}"


def test_duplicate_ids_named():
    with pytest.raises(EpisodeError, match=r"episode 'a'.*'episode_id'.*duplicate"):
        episodes_table([_ep("a"), _ep("a")])


def test_length_zero_named():
    with pytest.raises(EpisodeError, match=r"episode 'empty'.*length 0"):
        episodes_table([_ep("ok"), _ep("empty", T=0)])


@pytest.mark.parametrize(
    "bad, field",
    [
        (dict(A=3), "action"),
        (dict(obs={"state": np.zeros((4, 5), np.float32)}), "observation.state"),
        (dict(obs={"other": np.zeros((4, 3), np.float32)}), "observation"),
    ],
    ids=["action-width", "obs-width", "obs-keys"],
)
def test_mismatched_dims_named(bad, field):
    with pytest.raises(EpisodeError) as info:
        validate_episodes([_ep("first"), _ep("second", **bad)])
    assert info.value.episode_id == "second" and info.value.field == field


@pytest.mark.parametrize("where", ["action", "observation.state"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_named(where, value):
    ep = _ep("bad", T=5)
    if where == "action":
        ep.actions[3, 1] = value
    else:
        ep.observations["state"][3, 1] = value
    with pytest.raises(EpisodeError, match=r"episode 'bad'.*step 3, column 1") as info:
        episodes_table([ep])
    assert info.value.field == where


def test_unknown_split_and_bad_metadata():
    with pytest.raises(EpisodeError, match="split"):
        episodes_table([_ep(split="dev")])
    with pytest.raises(EpisodeError, match="metadata"):
        episodes_table([_ep(metadata={"x": object()})])
    with pytest.raises(EpisodeError, match="metadata"):
        episodes_table([_ep(metadata={"x": float("nan")})])


def test_step_columns_round_trip(rng):
    x = rng.standard_normal((7, 3)).astype(np.float32)
    arr = fixed_list(x)
    assert arr.type == pa.list_(pa.float32(), 3)
    np.testing.assert_array_equal(column_to_numpy(arr), x)
    # Slices keep their offset: a naive .values would return the wrong rows.
    np.testing.assert_array_equal(column_to_numpy(arr.slice(2, 3)), x[2:5])
    np.testing.assert_array_equal(column_to_numpy(pa.array(list(x.astype(np.float64)), pa.list_(pa.float64())), 3), x)
    schema = step_schema({"b": 2, "a": 1}, 4)
    assert schema.names == ["episode_index", "frame_index", "observation.a", "observation.b", "action"]


@pytest.mark.parametrize("eid", ["../etc/passwd", "a/b", ".hidden", "x y~", "ünï"])
def test_escape_id_is_one_safe_component(eid):
    out = escape_id(eid)
    assert "/" not in out and not out.startswith(".") and out.isascii()
    import urllib.parse

    assert urllib.parse.unquote(out) == eid

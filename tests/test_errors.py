"""The user-error hierarchy: what the CLI prints as one line and what stays a traceback."""

from __future__ import annotations

import errno
import pickle

import pytest

from cupid_engine import errors as E
from cupid_engine.data.schema import EpisodeError, FormatError


def test_message_is_what_where_hint_and_builtins_still_catch():
    e = E.StoreExistsError("a store exists", where="/x", hint="pass --overwrite")
    assert str(e) == "a store exists, /x, pass --overwrite" and (e.what, e.where, e.hint) == ("a store exists", "/x",
                                                                                            "pass --overwrite")
    assert isinstance(e, FileExistsError) and isinstance(e, ValueError)
    assert isinstance(E.StoreNotFoundError("x"), FileNotFoundError)
    assert isinstance(E.ReadOnlyStoreError("x"), PermissionError)
    assert str(pickle.loads(pickle.dumps(e))) == str(e)  # crosses Ray process boundaries


@pytest.mark.parametrize("exc", [
    E.ConfigError("k must be > 0"), FormatError("f: bad"), EpisodeError("ep1", "action", "NaN"),
    FileNotFoundError(errno.ENOENT, "No such file or directory", "/nope"),
    OSError(errno.ENOSPC, "No space left on device", "/full"), PermissionError("denied"),
])
def test_user_errors(exc):
    assert E.is_user_error(exc)


@pytest.mark.parametrize("exc", [TypeError("bug"), ValueError("bare"), KeyError("k"), RuntimeError("size mismatch"),
                                 OSError(errno.EIO, "I/O error")])
def test_bugs_and_unknowns_keep_their_traceback(exc):
    assert not E.is_user_error(exc)


def test_one_line():
    assert E.one_line(E.DataError("a\nb", where="w")) == "a b, w"
    assert E.one_line(FileNotFoundError(errno.ENOENT, "No such file or directory", "/nope")) == \
        "No such file or directory: /nope"
    assert E.one_line(KeyError("unknown id")) == "unknown id"

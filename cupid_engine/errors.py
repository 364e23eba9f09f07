"""The exceptions a user can cause and fix, and how the CLI tells them from bugs.

Every failure the user caused (bad input, a missing file, a config mismatch, corrupt
data, a resource bound) derives from :class:`UserError`. The command line prints such
an error as one line, ``error: <what>, <where>, <what to do>``, and exits with
status 2; anything else is a bug and keeps its traceback. Each class also derives
from the builtin a caller would have caught before (``ValueError``,
``FileExistsError`` ...), so library code that catches those keeps working.

This module imports nothing from cupid_engine: every layer may raise these.
"""

from __future__ import annotations

import errno

__all__ = [
    "CheckpointError",
    "ConfigError",
    "ContentChangedError",
    "DataError",
    "LimitError",
    "NotAStoreError",
    "ReadOnlyStoreError",
    "StoreError",
    "StoreExistsError",
    "StoreNotFoundError",
    "UserError",
    "is_user_error",
    "one_line",
]


class UserError(Exception):
    """An error the user can fix; the CLI prints it as one line and exits 2.

    Args:
        what: What is wrong.
        where: The file, episode or field at fault (joined after ``what``).
        hint: What to do about it.
    """

    def __init__(self, what: str, *, where: str | None = None, hint: str | None = None) -> None:
        self.what, self.where, self.hint = str(what), where, hint
        super().__init__(", ".join(p for p in (self.what, where, hint) if p))


class ConfigError(UserError, ValueError):
    """A configuration value or command-line option is invalid."""


class DataError(UserError, ValueError):
    """A dataset cannot be read or contradicts itself (names the file, episode and field)."""


class CheckpointError(UserError, ValueError):
    """A policy checkpoint is missing, unreadable or not what it claims."""


class LimitError(UserError, ValueError):
    """A request exceeds a bound (memory estimate, k, shard size); says the estimate."""


class StoreError(UserError, ValueError):
    """A gradient store cannot be used as asked."""


class NotAStoreError(StoreError):
    """A path holds something other than a gradient store."""


class StoreNotFoundError(StoreError, FileNotFoundError):
    """No gradient store where one is expected."""


class StoreExistsError(StoreError, FileExistsError):
    """A store already exists where one would be created."""


class ReadOnlyStoreError(StoreError, PermissionError):
    """A write to a store opened (or mounted) read-only."""


class ContentChangedError(StoreError):
    """An episode id the store holds arrives with other content (fingerprint differs)."""


_USER_ERRNOS = {
    errno.ENOENT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EEXIST,
    errno.ENOTDIR, errno.EISDIR, errno.ENOTEMPTY,
}


def is_user_error(exc: BaseException) -> bool:
    """Whether ``exc`` is the user's to fix (print one line) rather than a bug (traceback).

    :class:`UserError` and file-system conditions of the user's making (a missing file,
    no permission, a read-only or full disk) are; everything else is not.
    """
    if isinstance(exc, UserError):
        return True
    return isinstance(exc, OSError) and exc.errno in _USER_ERRNOS or isinstance(
        exc, (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)
    )


def one_line(exc: BaseException) -> str:
    """The error as one line (newlines folded), without the exception class name."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None and not isinstance(exc, UserError):
        text = f"{exc.strerror}: {exc.filename}"
    else:
        text = str(exc)
        if isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
            text = exc.args[0]  # str(KeyError) adds quotes
    text = " ".join(part.strip() for part in text.splitlines() if part.strip())
    return text or type(exc).__name__

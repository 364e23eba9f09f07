"""Object-store options (``--storage-options``): endpoint, credentials, ... of fsspec URLs.

Every store, dataset and run of cupid_engine is opened through fsspec (``url_to_fs``,
zarr's ``FsspecStore``). Rather than threading a ``storage_options`` argument through
each opener, the options are registered once per process as fsspec's defaults for the
URL's protocol (``fsspec.config.conf[protocol]``), which every filesystem instance of
that protocol then receives, and exported as ``FSSPEC_<PROTOCOL>`` (JSON) so that child
processes and Ray workers (``distributed._ray.credentials_env``) get the same settings.

Options are either flat (``{"endpoint_url": ..., "key": ...}``: applied to the protocols of
the given URLs, which must be remote) or keyed by protocol (``{"s3": {...}, "gs": {...}}``).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from typing import Any

from cupid_engine.errors import ConfigError

__all__ = ["parse_storage_options", "apply_storage_options", "protocol_of", "MissingFilesystemError"]


class MissingFilesystemError(ConfigError, ImportError):
    """The fsspec implementation of a URL's protocol is not installed (names the extra)."""

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_KNOWN = ("s3", "s3a", "gs", "gcs", "az", "abfs", "http", "https", "memory", "file")
_EXTRAS = {"s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"), "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs")}


def protocol_of(url: Any) -> str | None:
    """``"s3"`` for ``s3://bucket/x``; None for a local path."""
    m = _SCHEME.match(str(url)) if url is not None else None
    return m.group(1).lower() if m else None


def parse_storage_options(text: str | None) -> dict[str, Any]:
    """``--storage-options`` value: a JSON object, or ``@path`` of a JSON file; None -> ``{}``.

    Raises:
        ConfigError: not JSON, or not an object (the message names the flag and the file).
    """
    if text is None or text == "":
        return {}
    where = "--storage-options"
    if text.startswith("@"):
        path = pathlib.Path(text[1:]).expanduser()
        where = f"--storage-options file {path}"
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read ({exc.strerror})") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: must be a JSON object, got {type(value).__name__}")
    return value


def check_backend(protocol: str) -> None:
    """Raise with the install hint when ``protocol``'s fsspec implementation is missing."""
    pkg = _EXTRAS.get(protocol)
    if pkg is None:
        return
    import importlib.util

    if importlib.util.find_spec(pkg[0]) is None:
        raise MissingFilesystemError(f"{protocol}:// URLs need {pkg[0]}", hint=f"pip install 'cupid_engine[{pkg[1]}]'")


def apply_storage_options(options: dict[str, Any] | None, *urls: Any) -> dict[str, dict[str, Any]]:
    """Register ``options`` as this process's fsspec defaults for the URLs' protocols.

    Args:
        options: Flat options (applied to the protocol of every remote URL in ``urls``) or
            ``{protocol: options}``.
        *urls: Stores / datasets the options are for (local paths and None are ignored).

    Returns:
        ``{protocol: options}`` as registered.

    Raises:
        ConfigError: flat options but no remote URL to apply them to.
        MissingFilesystemError: the protocol's filesystem package is not installed (names the extra).
    """
    import fsspec.config

    protocols = sorted({p for p in map(protocol_of, urls) if p and p not in ("file", "memory")})
    for p in protocols:
        check_backend(p)
    if not options:
        return {}
    if all(isinstance(v, dict) for v in options.values()) and set(options) <= set(_KNOWN):
        per = {p.lower(): dict(v) for p, v in options.items()}
    else:
        if not protocols:
            raise ConfigError("--storage-options given but no store or dataset is a remote URL (s3://, gs://, ...)",
                              hint='key them by protocol ({"s3": {...}}) to set them anyway')
        per = {p: dict(options) for p in protocols}
    for p, opts in per.items():
        check_backend(p)
        merged = {**fsspec.config.conf.get(p, {}), **opts}
        fsspec.config.conf[p] = merged
        os.environ[f"FSSPEC_{p.upper()}"] = json.dumps(merged)
    return per

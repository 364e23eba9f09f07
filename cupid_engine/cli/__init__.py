"""The ``cupid-engine`` command line.

Each module in this package owns one command family and exposes
``register(subparsers)``; handlers import their heavy dependencies lazily so that
``cupid-engine --help`` is instant and never imports ray or robosuite.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cupid-engine",
        description="Curate robot demonstrations with influence functions.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of user errors too (accepted anywhere on the line)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for mod in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if mod.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{mod.name}")
        module.register(sub)
    _add_storage_options(parser)
    return parser


# Flags naming a store or dataset location: a command with any of them gets --storage-options.
_LOCATION_FLAGS = ("--store", "--data", "--rollout-data", "--dataset", "--out", "--source")


def _add_storage_options(parser: argparse.ArgumentParser) -> None:
    """Give every (sub)command that opens a store or dataset a ``--storage-options`` flag."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                _add_storage_options(child)
    if any(flag in parser._option_string_actions for flag in _LOCATION_FLAGS) and \
            "--storage-options" not in parser._option_string_actions:
        parser.add_argument(
            "--storage-options", metavar="JSON", default=None,
            help='fsspec options of remote stores/datasets (s3://, gs://): a JSON object, e.g. '
                 '\'{"endpoint_url": "http://127.0.0.1:5055"}\', or @FILE; keyed by protocol '
                 '(\'{"s3": {...}}\') to set several. Also reaches Ray workers.')


def _apply_storage_options(args: argparse.Namespace) -> None:
    text = getattr(args, "storage_options", None)
    if text is None:
        return
    from cupid_engine.store.options import apply_storage_options, parse_storage_options

    urls = [getattr(args, f.lstrip("-").replace("-", "_"), None) for f in _LOCATION_FLAGS]
    apply_storage_options(parse_storage_options(text), *[u for u in urls if isinstance(u, str)])


def main(argv: list[str] | None = None) -> int:
    """Run one command; user errors print one line and return 2 (``--debug``: traceback).

    ``--debug`` is accepted anywhere on the command line (or ``CUPID_ENGINE_DEBUG=1``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("CUPID_ENGINE_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(verbose=args.verbose)
    try:
        _apply_storage_options(args)
        rc = args.handler(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the one place user errors become one line
        from cupid_engine.errors import is_user_error, one_line

        if debug or not is_user_error(exc):
            raise  # a bug (or --debug): keep the traceback
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    return int(rc or 0)


def _configure_logging(*, verbose: bool) -> None:
    """cupid_engine's own records at INFO (DEBUG with -v); other libraries only at WARNING.

    Third-party INFO lines (faiss announcing its AVX512 build, ...) are noise to a user,
    so the root logger stays at WARNING unless ``-v`` asks for everything.
    """
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger().setLevel(logging.DEBUG if verbose else logging.WARNING)  # also when handlers exist
    logging.getLogger("cupid_engine").setLevel(logging.DEBUG if verbose else logging.INFO)


if __name__ == "__main__":
    sys.exit(main())

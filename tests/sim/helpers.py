"""Helpers for the sim tests."""

from __future__ import annotations


def run_cli(module: str, argv: list[str]) -> int:
    """Run one ``cupid-engine`` command through its own ``register`` only, so a broken
    sibling command module elsewhere in the CLI cannot fail these tests."""
    import argparse
    import importlib

    parser = argparse.ArgumentParser(prog="cupid-engine")
    sub = parser.add_subparsers(dest="command", required=True)
    importlib.import_module(f"cupid_engine.cli.{module}").register(sub)
    args = parser.parse_args(argv)
    return int(args.handler(args) or 0)

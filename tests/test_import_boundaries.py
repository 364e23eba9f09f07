"""The core never imports ray or robosuite: scoring a store must work without them."""

from __future__ import annotations

import subprocess
import sys

CORE = [
    "cupid_engine", "cupid_engine.ops", "cupid_engine.data", "cupid_engine.store", "cupid_engine.policies",
    "cupid_engine.featurize", "cupid_engine.scorers", "cupid_engine.index", "cupid_engine.audit",
    "cupid_engine.demo", "cupid_engine.cli", "cupid_engine.distributed",
]


def test_core_imports_neither_ray_nor_robosuite():
    code = (
        "import sys, importlib\n"
        f"for m in {CORE!r}: importlib.import_module(m)\n"
        "from cupid_engine.cli import build_parser; build_parser()\n"
        "print(sorted(m for m in ('ray', 'robosuite', 'mujoco') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"

"""The hash-stream ids are defined once per language and agree.

C++ and CUDA share ``csrc/include/cupid/hash.h`` (read here through ``_C.hash_streams()``);
Python defines them in ``cupid_engine/constants.py``. A stream id that differs between
the two would make a backend project with other random numbers than the reference.
"""

from __future__ import annotations

import re
from pathlib import Path

from cupid_engine import _C
from cupid_engine import constants as C

REPO = Path(__file__).resolve().parents[2]
# Streams only the Python side draws from (the featuriser's layer seeds, the diffusion
# output function's noise): no kernel needs them.
PYTHON_ONLY = {"STREAM_LAYER", "STREAM_DIFFUSION_NOISE"}


def _python_streams() -> dict[str, int]:
    return {k: v for k, v in vars(C).items() if k.startswith("STREAM_") or k == "MAX_SPARSE_S"}


def test_cpp_stream_ids_equal_python():
    cpp = dict(_C.hash_streams())
    py = _python_streams()
    assert cpp, "_C.hash_streams() is empty"
    for name, value in cpp.items():
        assert name in py, f"hash.h has {name}, constants.py does not"
        assert py[name] == value, f"{name}: hash.h {value} != constants.py {py[name]}"
    assert set(py) - set(cpp) == PYTHON_ONLY


def test_stream_ranges_do_not_overlap():
    """Every stream a projection or sketch can draw from is used by one quantity only."""
    used: dict[int, str] = {}
    ranges = {
        "dense": [C.STREAM_DENSE],
        "sparse": [C.STREAM_SPARSE + r for r in range(C.MAX_SPARSE_S)],
        "signshift": [C.STREAM_SIGNSHIFT_SIGN, C.STREAM_SIGNSHIFT_SHIFT],
        "tensorsketch": [s + off for s in (C.STREAM_TS_OUT, C.STREAM_TS_IN) for off in (0, C.STREAM_TS_SIGN_OFFSET)],
        "layer": [C.STREAM_LAYER],
        "diffusion": [C.STREAM_DIFFUSION_NOISE],
    }
    for owner, streams in ranges.items():
        for s in streams:
            assert s not in used, f"stream {s} used by {used.get(s)} and {owner}"
            used[s] = owner


def test_stream_ids_defined_once_per_language():
    """No C++/CUDA file but hash.h and no Python module but constants.py assigns a stream id."""
    cpp_def = re.compile(r"\bconstexpr\s+\w+\s+k(Stream\w+|MaxSparseS)\s*=")
    cpp_files = [p for ext in ("*.h", "*.cpp", "*.cu", "*.cuh") for p in (REPO / "csrc").rglob(ext)]
    assert cpp_files
    defining = sorted(str(p.relative_to(REPO)) for p in cpp_files if cpp_def.search(p.read_text(encoding="utf-8")))
    assert defining == ["csrc/include/cupid/hash.h"]
    py_def = re.compile(r"^(STREAM_\w+|MAX_SPARSE_S)\s*=", re.MULTILINE)
    py_files = sorted((REPO / "cupid_engine").rglob("*.py"))
    defining = sorted(str(p.relative_to(REPO)) for p in py_files if py_def.search(p.read_text(encoding="utf-8")))
    assert defining == ["cupid_engine/constants.py"]
    for kernel in ("csrc/cpu/projection.cpp", "csrc/cuda/projection.cu"):
        assert '#include "cupid/hash.h"' in (REPO / kernel).read_text(encoding="utf-8")

"""Loading the compiled extension ``cupid_engine._C``: "not built" versus "broken".

Below every op that calls C++ (``cpu_backend``, ``spectral``, ``cuda_backend``), so that
they share one rule without importing each other.
"""

from __future__ import annotations

from types import ModuleType

__all__ = ["_C", "is_available"]


def _C() -> ModuleType:
    from cupid_engine import _C as mod  # noqa: N811

    return mod


def is_available() -> bool:
    """Whether the extension is installed; an installed one that fails to load is an error.

    Only "not built" falls through to another backend. An ABI mismatch ("undefined symbol")
    or a missing shared library would otherwise turn ``auto`` into the slow torch reference
    without a word.
    """
    try:
        _C()
    except ModuleNotFoundError as exc:
        if exc.name == "cupid_engine._C":
            return False
        raise RuntimeError(f"the C++ extension cupid_engine._C failed to load: {exc}") from exc
    except ImportError as exc:
        raise RuntimeError(
            f"the C++ extension cupid_engine._C is installed but failed to load: {exc}; "
            "rebuild it with `pip install --no-build-isolation --no-deps -e .`"
        ) from exc
    return True

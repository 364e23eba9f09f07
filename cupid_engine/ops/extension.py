"""Loading the compiled extension ``cupid_engine._C``: "not built" versus "broken".

Below every op that calls C++ (``cpu_backend``, ``spectral``, ``cuda_backend``), so that
they share one rule without importing each other.

Fork safety. The OpenMP kernels (int8 scan, projection, count sketch, CUPID-Quality) would
hang in a process forked after the parent ran one of them: GNU libgomp's thread pool does
not survive fork() (the child inherits the pool's bookkeeping, not its threads, and waits
for them forever), and ``multiprocessing`` forks by default on Linux with Python 3.11, as
may a DataLoader's workers. The guard is on the C++ side, so it holds however the module
was reached (``from cupid_engine import _C`` included) and for any fork, not only Python's:
loading the module registers a ``pthread_atfork`` child handler that marks the process, and
from then on every OpenMP region there runs on one thread (``_C.in_forked_child()``; a
one-thread region does not touch the pool, and results are bit-identical either way;
``tests/ops/test_omp_threads.py`` forks a real child). The tensorsketch kernels run on the
same pool (where torch's still-spinning workers pick up their chunks at once) and start
per-call threads instead in a child, so they keep their threads there
(``tests/ops/test_tensorsketch_routes.py::test_kernels_survive_fork``). torch's own CPU ops share libgomp and still
hang in such a child unless it calls ``torch.set_num_threads(1)`` first (as DataLoader
workers do); that also sets these kernels' count, since ``_C.set_num_threads`` and torch
set the same OpenMP thread count.
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

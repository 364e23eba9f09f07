"""The in-process executor (``cupid_engine.executor``): one worker built once, items in
order, results in item order, the worker closed even when an item fails."""

from __future__ import annotations

import pytest

from cupid_engine.executor import Executor, InProcess


class _Worker:
    built = 0

    def __init__(self, log: list) -> None:
        type(self).built += 1
        self.log, self.closed = log, False

    def __call__(self, item: int) -> int:
        if item < 0:
            raise ValueError(f"bad item {item}")
        self.log.append(item)
        return item * item

    def close(self) -> None:
        self.closed = True
        self.log.append("closed")


def test_in_process_runs_items_in_order_on_one_worker():
    log, seen = [], []
    _Worker.built = 0
    out = InProcess().map(lambda: _Worker(log), [3, 1, 2], on_result=lambda i, r: seen.append((i, r)))
    assert out == [9, 1, 4] and seen == [(3, 9), (1, 1), (2, 4)]
    assert _Worker.built == 1 and log == [3, 1, 2, "closed"]
    assert isinstance(InProcess(), Executor) and InProcess().in_process and InProcess().workers == 1


def test_in_process_closes_the_worker_on_error_and_builds_none_for_no_items():
    log = []
    with pytest.raises(ValueError, match="bad item -1"):
        InProcess().map(lambda: _Worker(log), [1, -1, 2])
    assert log == [1, "closed"]
    _Worker.built = 0
    assert InProcess().map(lambda: _Worker(log), []) == [] and _Worker.built == 0

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


class _EnvReader:
    """Worker of a spawned process: reads its environment (set before it was built)."""

    def __init__(self, key: str) -> None:
        import os

        self.at_build = os.environ.get(key)

    def __call__(self, key: str) -> tuple[str | None, str | None, int]:
        import os

        return self.at_build, os.environ.get(key), os.getpid()


def test_processes_set_the_environment_before_building_and_keep_item_order():
    import functools
    import os

    from cupid_engine.executor import Processes

    seen = []
    keys = ["CUPID_EXECUTOR_TEST", "CUPID_EXECUTOR_OTHER", "CUPID_EXECUTOR_TEST"[::-1]]
    out = Processes(2, env={"CUPID_EXECUTOR_TEST": "on"}).map(
        functools.partial(_EnvReader, "CUPID_EXECUTOR_TEST"), keys, on_result=lambda k, r: seen.append(k))
    assert [r[:2] for r in out] == [("on", "on"), ("on", None), ("on", None)]  # item order
    assert sorted(seen) == sorted(keys)
    assert os.getpid() not in {r[2] for r in out} and "CUPID_EXECUTOR_TEST" not in os.environ
    with pytest.raises(ValueError, match="reserves no GPUs"):
        Processes(1).map(functools.partial(_EnvReader, "x"), ["a"], gpus=1)

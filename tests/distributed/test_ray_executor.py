"""The Ray executor gives the in-process executor's results, in item order, on several
workers; a task's own error names its item; items must be distinct (the unit of retry)."""

from __future__ import annotations

import functools
import os
import sys

import pytest

from cupid_engine.distributed import RayExecutor, executor_for
from cupid_engine.errors import ConfigError
from cupid_engine.executor import InProcess

pytestmark = pytest.mark.ray


class _Power:
    """A worker with state built once: ``item ** p`` and the pid that computed it."""

    def __init__(self, p: int) -> None:
        self.p = p

    def __call__(self, item: int) -> tuple[int, int]:
        if item == 13:
            raise ValueError("thirteen is refused")
        return item ** self.p, os.getpid()


def test_ray_equals_in_process_in_item_order_and_names_a_failing_item():
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    items = [5, 2, 9, 0, 7, 3, 11, 4]
    factory = functools.partial(_Power, 3)
    want = [v for v, _ in InProcess().map(factory, items)]
    ex = RayExecutor(2, start_timeout=120)
    seen = []
    got = ex.map(factory, items, on_result=lambda i, r: seen.append(i))
    assert [v for v, _ in got] == want  # item order, whatever the completion order
    assert sorted(seen) == sorted(items)
    pids = {pid for _, pid in got}
    assert os.getpid() not in pids and pids <= set(ex.report["workers"]), (pids, ex.report)
    assert ex.report["lost_workers"] == 0 and ex.report["dispatch_seconds"] > 0
    with pytest.raises(RuntimeError, match=r"item 13 failed: ValueError: thirteen is refused"):
        ex.map(factory, [1, 13, 2])


def test_items_must_be_distinct_and_workers_positive():
    with pytest.raises(ValueError, match="distinct"):
        RayExecutor(2).map(functools.partial(_Power, 2), [1, 2, 1])  # refused before Ray starts
    with pytest.raises(ConfigError, match="workers must be >= 1"):
        executor_for(0)
    assert isinstance(executor_for(1), InProcess)
    assert isinstance(executor_for(1, "127.0.0.1:1"), RayExecutor) and not executor_for(1, "127.0.0.1:1").local

"""Backend registry: what ``auto`` may choose, and that a broken extension is an error."""

from __future__ import annotations

import logging

import pytest
import torch

from cupid_engine import ops
from cupid_engine.ops import cpu_backend, cuda_backend, extension
from cupid_engine.ops import registry as reg


def test_cpu_extension_is_built():
    """`make` builds the extension: its absence is a failure here, not a skipped case."""
    assert "cpu" in ops.available_backends()


def test_auto_on_cpu_is_the_extension_and_logged(caplog):
    reg._LOGGED.clear()
    with caplog.at_level(logging.INFO, logger="cupid_engine.ops"):
        chosen = reg.resolve("auto", "cpu", "project")
    assert chosen.name == "cpu"
    assert any("chose 'cpu'" in r.getMessage() for r in caplog.records)


def test_triton_is_never_an_automatic_cpu_choice(monkeypatch):
    """Even with the interpreter on and a higher priority, ``auto`` skips Triton on CPU."""
    triton = reg.get("triton")
    fake = reg.Backend("triton", ("cuda", "cpu"), triton.module, lambda: True, "", 99, auto_devices=("cuda",))
    monkeypatch.setitem(reg._REGISTRY, "triton", fake)
    assert reg.resolve("auto", "cpu", "tensorsketch").name == "cpu"
    # Explicitly asked for, it still runs on CPU tensors (the test vehicle).
    assert reg.resolve("triton", "cpu", "tensorsketch").name == "triton"


def test_broken_extension_raises_instead_of_falling_back(monkeypatch):
    def broken():
        raise ImportError("cupid_engine/_C.so: undefined symbol: _ZN3c10bogus")

    monkeypatch.setattr(extension, "_C", broken)
    with pytest.raises(RuntimeError, match="undefined symbol"):
        cpu_backend.is_available()
    with pytest.raises(RuntimeError, match="failed to load"):
        ops.project(torch.ones(1, 8), k=4)
    with pytest.raises(RuntimeError, match="undefined symbol"):
        cuda_backend.is_available()


def test_not_built_falls_through(monkeypatch):
    def missing():
        raise ModuleNotFoundError("No module named 'cupid_engine._C'", name="cupid_engine._C")

    monkeypatch.setattr(extension, "_C", missing)
    assert cpu_backend.is_available() is False
    assert cuda_backend.is_available() is False
    with pytest.raises(RuntimeError, match="not available"):
        ops.project(torch.ones(1, 8), k=4, backend="cpu")

"""The hook path on the C++ kernel route (CPU, k a power of two): per layer type the sketch
equals the exact per-sample gradients hashed by the definition (float64, odd shapes, many
positions), both routes of every layer agree, and the float32 features moved from the
torch.fft route by float rounding only."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cupid_engine.featurize import Featurizer, ProjectionConfig, fused_tensorsketch
from cupid_engine.featurize import hooks

from fz_helpers import explicit_sketch

K = 128  # a power of two: the kernel route
SEED = 3


class RowTask:
    """``f = sum tanh(model(x))^2`` per row."""

    supported_outputs = ("f",)

    def build_batch(self, episodes):  # batches are made directly here
        raise NotImplementedError

    def output(self, model, batch, name, *, seed=0, draws=64):
        return torch.tanh(model(batch["x"])).square().flatten(1).sum(1)


class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(23, 6, padding_idx=0)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 5)

    def forward(self, idx):
        return self.head(self.norm(self.emb(idx)))


MODELS = {
    "linear": (lambda: nn.Sequential(nn.Linear(9, 33), nn.Tanh(), nn.Linear(33, 7)), lambda g: torch.randn(5, 9, generator=g)),
    # 61 output positions per sample: many steps, some layers take the dense route.
    "conv1d": (lambda: nn.Sequential(nn.Conv1d(3, 8, 5, padding=2), nn.GroupNorm(2, 8), nn.Mish(),
                                     nn.Conv1d(8, 11, 3, stride=2, dilation=2)),
               lambda g: torch.randn(4, 3, 125, generator=g)),
    "conv2d": (lambda: nn.Sequential(nn.Conv2d(2, 5, 3, stride=2), nn.ReLU(), nn.Conv2d(5, 4, 3, padding="same")),
               lambda g: torch.randn(3, 2, 13, 11, generator=g)),
    "embedding": (Tokens, lambda g: torch.randint(0, 23, (4, 7), generator=g)),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_kernel_route_equals_definition_float64(name, generator):
    make, data = MODELS[name]
    torch.manual_seed(0)
    model = make().double().eval()
    x = data(generator)
    batch = {"x": x.double() if x.is_floating_point() else x}
    assert hooks.kernel_route(K, "cpu", torch.float64)
    task = RowTask()
    f = Featurizer(None, "f", ProjectionConfig(k=K, seed=SEED), task=task, model=model)
    want = explicit_sketch(model, task, batch, "f", k=K, seed=SEED)
    got = f(batch)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
    assert want.abs().max() > 1e-3
    factors = f.layer_factors(batch)
    dense = [(f._seeds[n], d, xx) for n, d, xx in factors if d.is_floating_point()]
    index = [(f._seeds[n], d, xx, f._by_name[n].num_embeddings) for n, d, xx in factors if not d.is_floating_point()]
    for s in ("fft", "dense", "direct"):
        torch.testing.assert_close(fused_tensorsketch(dense, k=K, strategy=s, index_factors=index), want,
                                   rtol=1e-9, atol=1e-11)


def test_kernel_route_float32_moves_by_rounding_only(generator, monkeypatch):
    """float32 features of the kernel route vs the torch.fft route (the previous CPU
    evaluation): the same sketch, differing in the last bits."""
    B, k = 40, 512
    factors = [(s + 1, torch.randn(B, T, O, generator=generator), torch.randn(B, T, I, generator=generator))
               for s, (T, O, I) in enumerate([(1, 40, 9), (1, 7, 33), (6, 24, 20), (64, 6, 5)])]
    kernel = fused_tensorsketch(factors, k=k)
    monkeypatch.setattr(hooks, "kernel_route", lambda *a, **kw: False)
    torch_route = fused_tensorsketch(factors, k=k)
    want = sum(hooks.reference.tensorsketch_materialized(d.double(), x.double(), k=k, seed=s) for s, d, x in factors)
    scale = want.abs().max()
    assert float((kernel.double() - want).abs().max() / scale) < 2e-6
    assert float((torch_route.double() - want).abs().max() / scale) < 2e-6
    assert not torch.equal(kernel, torch_route)  # it is a rounding change, and this test would see its reversal


def test_kernel_route_rows_independent_of_batch_and_threads(generator):
    """Mixed fft / dense / index layers: a row's features do not depend on the batch split
    (lane position) or the thread count."""
    from cupid_engine.ops import cpu_backend

    B, k = 45, 256
    factors = [(1, torch.randn(B, 1, 30, generator=generator), torch.randn(B, 1, 17, generator=generator)),
               (2, torch.randn(B, 90, 4, generator=generator), torch.randn(B, 90, 6, generator=generator))]
    index = [(3, torch.randint(-1, 11, (B, 5), generator=generator), torch.randn(B, 5, 4, generator=generator), 11)]

    def run(i, j):
        return fused_tensorsketch([(s, d[i:j], x[i:j]) for s, d, x in factors], k=k,
                                  index_factors=[(s, d[i:j], x[i:j], O) for s, d, x, O in index])

    assert hooks.choose_strategy("auto", 90, 4, 6, k) == "dense"
    C = cpu_backend._C()
    before_c, before_t = C.num_threads(), torch.get_num_threads()
    try:
        C.set_num_threads(2)
        torch.set_num_threads(2)
        full = run(0, B)
        C.set_num_threads(1)
        torch.set_num_threads(1)
        one = run(0, B)
    finally:
        C.set_num_threads(before_c)
        torch.set_num_threads(before_t)
    parts = torch.cat([run(a, min(B, a + 7)) for a in range(0, B, 7)])
    assert torch.equal(full, one)
    assert torch.equal(full, parts)


def test_kernel_route_only_where_it_applies():
    assert hooks.kernel_route(4096, "cpu", torch.float32)
    assert not hooks.kernel_route(96, "cpu", torch.float32)  # k not a power of two: torch.fft route
    assert not hooks.kernel_route(4096, "cpu", torch.float16)
    assert not hooks.kernel_route(4096, "meta", torch.float32)


CONV2D = [  # (C_in, kernel, stride, padding, dilation, (H, W))
    (3, 3, 1, 0, 1, (7, 9)), (2, (3, 2), (2, 1), (1, 0), (1, 2), (10, 8)), (3, 5, 2, 2, 1, (13, 11)),
    (1, (2, 4), 1, "same", (2, 1), (9, 12)), (4, 3, 3, "valid", 1, (8, 8)), (2, 1, 1, 0, 1, (5, 5)),
]
CONV1D = [(3, 5, 1, 2, 1, 16), (2, 3, 2, 0, 1, 11), (4, 4, 1, "same", 1, 9), (2, 3, 3, 1, 2, 17), (2, 5, 1, "same", 2, 7)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_im2col_kernel_equals_the_torch_copy(dtype, generator, monkeypatch):
    """The C++ im2col is a pure copy: bit-identical to the strided-view copy it replaces
    (odd kernels, strides, dilations, numeric/'same'/'valid' padding, with and without bias)."""
    cases = []
    for C, k, s, p, d, hw in CONV2D:
        for bias in (True, False):
            m = nn.Conv2d(C, 3, k, stride=s, padding=p, dilation=d, bias=bias)
            cases.append((hooks.unfold_conv2d, m, torch.randn(3, C, *hw, generator=generator, dtype=dtype), bias))
    for C, k, s, p, d, L in CONV1D:
        for bias in (True, False):
            m = nn.Conv1d(C, 3, k, stride=s, padding=p, dilation=d, bias=bias)
            cases.append((hooks.unfold_conv1d, m, torch.randn(5, C, L, generator=generator, dtype=dtype), bias))
    fast = [fn(m, x, append_one=b) for fn, m, x, b in cases]
    monkeypatch.setattr(hooks, "_im2col_kernel", lambda *a, **kw: None)
    for (fn, m, x, b), got in zip(cases, fast):
        want = fn(m, x, append_one=b)
        assert got.shape == want.shape and torch.equal(got, want), (m, tuple(x.shape), b)

"""Dense-route layers streamed from the raw captures (``hooks.stream_dense_layer``): the
unfolded inputs are formed chunk by chunk in reused buffers (stride-1 Conv1d: not formed at
all, one GEMM per tap over a shifted view), with the same numbers as the dense route on the
fully laid-out factors up to float rounding (float64 parity against the definition over odd
shapes; float32 bit for bit across chunk sizes, both hash routes)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cupid_engine.featurize import Featurizer, ProjectionConfig, fused_tensorsketch
from cupid_engine.featurize import hooks as H

from fz_helpers import explicit_sketch

SEED = 3


class DrawTask:
    """Each sample is ``draws`` contiguous rows (like a diffusion output's noise draws):
    ``f_b = sum_r sum tanh(model(x_b (1 + s_r) + s_r))^2`` with fixed shifts ``s_r``."""

    supported_outputs = ("f",)

    def build_batch(self, episodes):  # batches are made directly
        raise NotImplementedError

    def output(self, model, batch, name, *, seed=0, draws=3):
        x = batch["x"]
        shift = torch.linspace(-0.5, 0.7, draws, dtype=x.dtype).reshape((draws,) + (1,) * (x.dim() - 1))
        rows = (x.unsqueeze(1) * (1 + shift) + shift).flatten(0, 1)  # [B * draws, ...], a sample's rows contiguous
        y = torch.tanh(model(rows)).square().flatten(1).sum(1)
        return y.reshape(x.shape[0], draws).sum(1)


class Net1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(3, 5, 3, padding=2, dilation=2)
        self.c2 = nn.Conv1d(5, 4, 4, stride=2, bias=False)
        self.c3 = nn.Conv1d(4, 6, 1)
        self.head = nn.Linear(6, 5)
        self.lin = nn.Linear(5, 3, bias=False)

    def forward(self, x):
        h = torch.relu(self.c3(torch.relu(self.c2(torch.relu(self.c1(x))))))
        return self.lin(torch.tanh(self.head(h.transpose(1, 2))))


class Net2d(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 5, (3, 2), stride=(2, 1), padding=(1, 2))
        self.c2 = nn.Conv2d(5, 3, 3, padding="same", bias=False)
        self.gn = nn.GroupNorm(1, 3)

    def forward(self, x):
        return self.gn(self.c2(torch.relu(self.c1(x))))


def _featurizer(model, k, dtype):
    return Featurizer(None, "f", ProjectionConfig(k=k, seed=SEED), task=DrawTask(), model=model.to(dtype).eval(),
                      draws=3)


@pytest.mark.parametrize("k", [96, 128])  # torch hash (k not a power of two) and the C++ kernel route
@pytest.mark.parametrize("net,shape", [(Net1d, (5, 3, 11)), (Net2d, (3, 2, 7, 5))])
def test_streamed_dense_float64_parity(net, shape, k, monkeypatch):
    torch.manual_seed(0)
    model = net()
    f = _featurizer(model, k, torch.float64)
    batch = {"x": torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)}
    want = explicit_sketch(model, f.task, batch, "f", k=k, seed=SEED, draws=3)
    assert want.abs().max() > 1e-3
    monkeypatch.setattr(H, "choose_strategy", lambda strategy, *a, **kw: "dense" if strategy == "auto" else strategy)
    for chunk_bytes in (1, 1 << 30):  # one sample per chunk; the whole batch in one
        monkeypatch.setattr(H, "DENSE_CHUNK_BYTES", chunk_bytes)
        got = f(batch)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
    streamed = [n for n, v in f.layer_strategies.items() if v["strategy"] == "dense"]
    assert {"c1", "c2"} <= set(streamed)


@pytest.mark.parametrize("kernel", [True, False])
def test_streamed_dense_float32_chunk_independent_and_close_to_laid_out(kernel, monkeypatch):
    """Bit for bit whatever the chunk (a sample's GEMMs and hash do not see the others);
    against the laid-out factors (one GEMM on the unfolded input) a float-rounding change
    from c1's per-tap GEMMs only."""
    torch.manual_seed(2)
    model = Net1d()
    f = _featurizer(model, 128, torch.float32)
    batch = {"x": torch.randn(6, 3, 13, generator=torch.Generator().manual_seed(4))}
    if not kernel:
        monkeypatch.setattr(H, "kernel_route", lambda *a, **kw: False)
    monkeypatch.setattr(H, "choose_strategy", lambda strategy, *a, **kw: "dense" if strategy == "auto" else strategy)
    ref = f.layer_factors(batch)
    want = fused_tensorsketch([(f._seeds[n], d, x) for n, d, x in ref], k=128, strategy="dense")
    got = {}
    for chunk_bytes in (1, 700, 1 << 30):
        monkeypatch.setattr(H, "DENSE_CHUNK_BYTES", chunk_bytes)
        got[chunk_bytes] = f(batch)
        torch.testing.assert_close(got[chunk_bytes], want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
    assert torch.equal(got[1], got[700]) and torch.equal(got[1], got[1 << 30])
    # Buffers are reused and bounded by the chunk: with one sample per chunk, the unfold
    # buffer holds one sample's rows (3 draws x time steps x columns), not the batch's;
    # the stride-1 conv c1 unfolds nothing: its buffer is one sample's padded input
    # (draws x padded length x C_in: 3 x 17 x 3), shared with c2's transposed input (3 x 13 x 5).
    monkeypatch.setattr(H, "DENSE_CHUNK_BYTES", 1)
    f._workspace = H._Workspace()
    f(batch)
    unfolded = max(s["T"] * s["I"] for n, s in f.layer_strategies.items() if n in ("c2", "c3"))
    assert f._workspace._bufs["dense_x"].numel() == unfolded
    assert f._workspace._bufs["dense_xt"].numel() == max(3 * 17 * 3, 3 * 13 * 5)


@pytest.mark.parametrize("conv", [
    dict(in_channels=3, out_channels=5, kernel_size=5, padding=2),
    dict(in_channels=4, out_channels=3, kernel_size=4, padding="same", bias=False),
    dict(in_channels=2, out_channels=7, kernel_size=3, padding=3, dilation=2),
    dict(in_channels=5, out_channels=2, kernel_size=2),
    dict(in_channels=3, out_channels=4, kernel_size=1),
    dict(in_channels=3, out_channels=4, kernel_size=1, padding=1),
    dict(in_channels=3, out_channels=6, kernel_size=3, stride=3, padding=1),
])
@pytest.mark.parametrize("draws", [1, 3])
def test_conv1d_paths_float64_parity_odd_shapes(conv, draws, monkeypatch):
    """Every Conv1d path of the stream (per-tap GEMMs for stride 1, the pointwise transpose,
    the strided unfold) against the definition, over odd lengths, chunks of 1 and all."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv1d(**conv), nn.Tanh())
    task = DrawTask()
    f = Featurizer(None, "f", ProjectionConfig(k=128, seed=SEED), task=task, model=model.double().eval(), draws=draws)
    batch = {"x": torch.randn(5, conv["in_channels"], 9, generator=torch.Generator().manual_seed(6),
                              dtype=torch.float64)}
    want = explicit_sketch(model, task, batch, "f", k=128, seed=SEED, draws=draws)
    assert want.abs().max() > 1e-3
    monkeypatch.setattr(H, "choose_strategy", lambda strategy, *a, **kw: "dense" if strategy == "auto" else strategy)
    for chunk_bytes in (1, 1 << 30):
        monkeypatch.setattr(H, "DENSE_CHUNK_BYTES", chunk_bytes)
        torch.testing.assert_close(f(batch), want, rtol=1e-10, atol=1e-12)


def test_unfold_into_a_given_buffer_and_bad_buffers_refused():
    conv = nn.Conv1d(3, 4, 3, padding=1)
    x = torch.randn(5, 3, 8)
    want = H.unfold_conv1d(conv, x, append_one=True)
    buf = torch.full(want.shape, 7.0)
    assert H.unfold_conv1d(conv, x, append_one=True, out=buf) is buf and torch.equal(buf, want)
    with pytest.raises(ValueError, match="contiguous"):
        H.unfold_conv1d(conv, x, append_one=True, out=torch.empty(5, 8, 9))
    conv2 = nn.Conv2d(2, 3, 2, stride=2)
    x2 = torch.randn(3, 2, 6, 5, dtype=torch.float64)
    want2 = H.unfold_conv2d(conv2, x2, append_one=False)
    buf2 = torch.empty(want2.shape, dtype=torch.float64)
    assert torch.equal(H.unfold_conv2d(conv2, x2, out=buf2), want2)


class Shared(nn.Module):
    """One Linear called twice per forward (its gradient sums both calls) and one called once."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(torch.tanh(self.a(x)))))


@pytest.mark.parametrize("k", [96, 128])
def test_linear_bias_buffers_reused_across_batches_and_shared_modules(k, monkeypatch):
    monkeypatch.setattr(H, "choose_strategy", lambda strategy, *a, **kw: "fft" if strategy == "auto" else strategy)
    torch.manual_seed(1)
    model = Shared()
    f = _featurizer(model, k, torch.float64)
    g = torch.Generator().manual_seed(6)
    for rows in (5, 3):  # the second, smaller batch reuses the buffers
        batch = {"x": torch.randn(rows, 2, 4, generator=g, dtype=torch.float64)}
        want = explicit_sketch(model, f.task, batch, "f", k=k, seed=SEED, draws=3)
        torch.testing.assert_close(f(batch), want, rtol=1e-9, atol=1e-11)
    if H.kernel_route(k, "cpu", torch.float64):  # the kernel adds the bias input itself: no buffer at all
        assert not any(n.startswith("lin_x_") for n in f._workspace._bufs)
    else:
        assert "lin_x_b" in f._workspace._bufs and "lin_x_a" not in f._workspace._bufs


@pytest.mark.parametrize("route", ["fft", "direct", "dense"])
def test_implicit_bias_factor_bit_identical_to_stored_ones(route, generator):
    """``(seed, delta, x, True)``: the kernel's implicit constant-1 input gives the same
    bytes as the stored column of ones on every route (float32, odd shapes, 2 steps)."""
    B = 19
    d = torch.randn(B, 2, 9, generator=generator)
    x = torch.randn(B, 2, 12, generator=generator)
    full = torch.cat((x, torch.ones(B, 2, 1)), dim=-1)
    want = fused_tensorsketch([(7, d, full)], k=256, strategy=route)
    got = fused_tensorsketch([(7, d, x, True)], k=256, strategy=route)
    assert torch.equal(got, want)

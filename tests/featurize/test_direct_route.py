"""The tensorsketch kernel's ``direct`` route (issue 19): a layer's ``T O I`` hashed
products accumulated in the time domain inside the FFT kernel call. Exact (float64 parity
with the definition over odd shapes, mixed with FFT layers and alone), batch/thread
independent bit for bit, chosen by the cost model for narrow factors, and a float-rounding
change only against the all-FFT evaluation."""

from __future__ import annotations

import pytest
import torch

from cupid_engine.featurize import Featurizer, ProjectionConfig, fused_tensorsketch
from cupid_engine.featurize import hooks
from cupid_engine.ops import cpu_backend, reference
from cupid_engine.policies import MLPPolicy, MLPPolicyConfig

pytestmark = pytest.mark.skipif(not cpu_backend.is_available(), reason="needs the C++ extension")

# (T, O, I): narrow factors, odd widths, several steps, a 1 x 1 layer.
SHAPES = [(1, 37, 5), (1, 3, 29), (3, 11, 13), (1, 1, 1), (2, 6, 41)]


def _factors(B, dtype, generator):
    return [(s + 2, torch.randn(B, T, O, generator=generator, dtype=dtype),
             torch.randn(B, T, I, generator=generator, dtype=dtype)) for s, (T, O, I) in enumerate(SHAPES)]


def _definition(factors, k):
    return sum(reference.tensorsketch_materialized(d.double(), x.double(), k=k, seed=s) for s, d, x in factors)


@pytest.mark.parametrize("k", [8, 64, 256, 2048])
@pytest.mark.parametrize("flags", ["all", "mixed", "none"])
def test_direct_equals_definition_float64(k, flags, generator):
    """B = 19: two float64 lane groups of 8, the second partial."""
    factors = _factors(19, torch.float64, generator)
    direct = {"all": [True] * len(factors), "mixed": [i % 2 == 0 for i in range(len(factors))],
              "none": None}[flags]
    got = cpu_backend.tensorsketch_fft_layers(factors, k, direct=direct)
    want = _definition(factors, k)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert want.abs().max() > 1e-2


def test_fused_direct_strategy_equals_definition_and_dense_off_kernel(generator, monkeypatch):
    """``strategy='direct'`` through the hook path's fused call; off the kernel route it is
    evaluated as ``dense`` (the same products of G)."""
    factors = _factors(21, torch.float64, generator)
    want = _definition(factors, 128)
    torch.testing.assert_close(fused_tensorsketch(factors, k=128, strategy="direct"), want, rtol=1e-12, atol=1e-12)
    monkeypatch.setattr(hooks, "kernel_route", lambda *a, **kw: False)
    torch.testing.assert_close(fused_tensorsketch(factors, k=128, strategy="direct"),
                               fused_tensorsketch(factors, k=128, strategy="dense"), rtol=0, atol=0)


def test_direct_rows_independent_of_batch_split_and_threads(generator):
    """float32, W = 16 lanes: a row's bytes do not depend on its lane group or the thread count."""
    B, k = 45, 512
    factors = _factors(B, torch.float32, generator)
    direct = [True, False, True, True, False]
    C = cpu_backend._C()
    before = C.num_threads()
    try:
        C.set_num_threads(2)
        full = cpu_backend.tensorsketch_fft_layers(factors, k, direct=direct)
        C.set_num_threads(1)
        one = cpu_backend.tensorsketch_fft_layers(factors, k, direct=direct)
    finally:
        C.set_num_threads(before)
    parts = torch.cat([cpu_backend.tensorsketch_fft_layers([(s, d[a:a + 7], x[a:a + 7]) for s, d, x in factors], k,
                                                           direct=direct) for a in range(0, B, 7)])
    assert torch.equal(full, one)
    assert torch.equal(full, parts)


def test_direct_is_a_rounding_change_only_float32(generator):
    """Against the all-FFT kernel call: the same sketch, different last bits."""
    factors = _factors(33, torch.float32, generator)
    fft = cpu_backend.tensorsketch_fft_layers(factors, 1024)
    direct = cpu_backend.tensorsketch_fft_layers(factors, 1024, direct=[True] * len(factors))
    want = _definition(factors, 1024)
    scale = want.abs().max()
    assert float((direct.double() - want).abs().max() / scale) < 1e-6
    assert float((fft.double() - want).abs().max() / scale) < 2e-6
    assert not torch.equal(direct, fft)


def test_direct_flags_must_match_layers(generator):
    factors = _factors(3, torch.float32, generator)
    with pytest.raises(ValueError, match="direct flags"):
        cpu_backend.tensorsketch_fft_layers(factors, 64, direct=[True])


def test_cost_model_sends_narrow_layers_direct():
    """k = 4096: the MLP's 41-wide input layer and 7-wide head go direct, its 512 x 513
    layers stay on the FFT, a many-step conv layer stays dense."""
    k = 4096
    assert hooks.choose_strategy("auto", 1, 512, 41, k) == "direct"
    assert hooks.choose_strategy("auto", 1, 7, 513, k) == "direct"
    assert hooks.choose_strategy("auto", 1, 512, 513, k) == "fft"
    assert hooks.choose_strategy("auto", 64, 64, 193, k) == "dense"
    assert hooks.choose_strategy("direct", 1, 512, 513, k) == "direct"


def test_mlp_featurizer_records_direct_and_matches_definition_float64():
    """The MLP policy in float64 at k = 4096: the featuriser takes ``direct`` for its narrow
    layers and equals the all-FFT and all-dense evaluations of its captured factors."""
    torch.manual_seed(0)
    policy = MLPPolicy(MLPPolicyConfig(obs_dim=5, action_dim=3, hidden_sizes=(24, 17))).double().eval()
    g = torch.Generator().manual_seed(1)
    B = 11
    c = policy.config
    batch = {"obs": torch.randn(B, c.n_obs_steps, 5, generator=g, dtype=torch.float64),
             "action": torch.randn(B, c.horizon, 3, generator=g, dtype=torch.float64),
             "episode_key": torch.arange(B), "step": torch.arange(B)}
    f = Featurizer(policy, "loss", ProjectionConfig(k=4096, seed=5))
    got = f(batch)
    assert "direct" in {v["strategy"] for v in f.layer_strategies.values()}
    factors = [(f._seeds[n], d, x) for n, d, x in f.layer_factors(batch)]
    for s in ("fft", "dense"):
        torch.testing.assert_close(got, fused_tensorsketch(factors, k=4096, strategy=s), rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(got, _definition(factors, 4096), rtol=1e-11, atol=1e-13)


def test_mlp_featurizer_implicit_bias_same_bytes_as_laid_out_float32():
    """The featuriser hands the MLP's Linear inputs to the kernel without their bias column
    (the kernel adds the constant 1): the same bytes as the laid-out factors with the column."""
    torch.manual_seed(3)
    policy = MLPPolicy(MLPPolicyConfig(obs_dim=6, action_dim=2, hidden_sizes=(40, 33))).eval()
    g = torch.Generator().manual_seed(2)
    B = 37
    c = policy.config
    batch = {"obs": torch.randn(B, c.n_obs_steps, 6, generator=g), "action": torch.randn(B, c.horizon, 2, generator=g),
             "episode_key": torch.arange(B), "step": torch.arange(B)}
    f = Featurizer(policy, "loss", ProjectionConfig(k=1024, seed=9))
    got = f(batch)
    factors = [(f._seeds[n], d, x) for n, d, x in f.layer_factors(batch)]
    assert all(x.shape[2] == m.in_features + 1 for (_, _, x), (_, m) in zip(factors, f.modules))
    assert torch.equal(got, fused_tensorsketch(factors, k=1024))


@pytest.mark.parametrize("direct", [None, [True, False, True, False, True]])
def test_kernel_output_stores_same_bytes_aligned_or_not(direct, generator):
    """The float32 kernel writes 64-byte aligned outputs by non-temporal stores and other
    outputs by the plain loop: the same bytes."""
    B, k = 35, 1024
    factors = _factors(B, torch.float32, generator)
    aligned = cpu_backend.tensorsketch_fft_layers(factors, k, direct=direct)
    assert aligned.data_ptr() % 64 == 0
    buf = torch.empty(B * k + 1)
    shifted = buf[1:].view(B, k)
    assert shifted.data_ptr() % 64 != 0
    cpu_backend.tensorsketch_fft_layers(factors, k, out=shifted, direct=direct)
    assert torch.equal(aligned, shifted)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_row_sums_match_the_rows(dtype, generator):
    factors = _factors(29, dtype, generator)
    sums = torch.empty(29, dtype=dtype)
    out = cpu_backend.tensorsketch_fft_layers(factors, 512, direct=[True, False, False, True, False], row_sums=sums)
    torch.testing.assert_close(sums, out.sum(1), rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-4)
    with pytest.raises(ValueError, match="row_sums"):
        cpu_backend.tensorsketch_fft_layers(factors, 512, row_sums=torch.empty(28, dtype=dtype))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_featurizer_names_nonfinite_rows_from_the_kernel_sums(bad):
    """The hook path's NaN/Inf check reads the kernel's row sums: a sample with a non-finite
    observation is refused by row, the others are not blamed."""
    torch.manual_seed(0)
    policy = MLPPolicy(MLPPolicyConfig(obs_dim=5, action_dim=3, hidden_sizes=(16,))).eval()
    g = torch.Generator().manual_seed(1)
    B = 20
    c = policy.config
    batch = {"obs": torch.randn(B, c.n_obs_steps, 5, generator=g), "action": torch.randn(B, c.horizon, 3, generator=g),
             "episode_key": torch.arange(B), "step": torch.arange(B)}
    f = Featurizer(policy, "loss", ProjectionConfig(k=256), verify=False)
    assert torch.isfinite(f(batch)).all()
    batch["obs"][17, 0, 2] = bad
    with pytest.raises(ValueError, match=r"batch rows \[17\]"):
        f(batch)
    assert not torch.isfinite(f(batch, check_finite=False)[17]).all()


def test_hash_gradient_same_bytes_serial_and_threaded(generator):
    """hash_gradient runs serially below 2^20 entries and hands out rows by an atomic counter
    above: the same bytes on 1 and 2 threads, on both sides of the threshold."""
    C = cpu_backend._C()
    before = C.num_threads()
    for B, O, I in ((64, 128, 129), (9, 17, 23)):  # 1.06 M entries (threaded), 3.5 k (serial)
        G = torch.randn(B, O, I, generator=generator)
        outs = []
        try:
            for nt in (1, 2):
                C.set_num_threads(nt)
                outs.append(cpu_backend.hash_gradient(G, 5, 512, torch.zeros(B, 512), accumulate=True))
        finally:
            C.set_num_threads(before)
        assert torch.equal(outs[0], outs[1])
        assert torch.equal(outs[0][3:5], cpu_backend.hash_gradient(G[3:5], 5, 512, torch.zeros(2, 512), accumulate=True))

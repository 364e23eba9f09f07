"""Per layer type: the hook sketch equals the torch.func path's exact per-sample gradients,
laid out as the layer's gradient matrix and hashed with the same tensorsketch (float64,
odd shapes). Models here are plain ``nn.Module``s with a task object beside them: no
engine class is subclassed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cupid_engine.featurize import Featurizer, ProjectionConfig, fused_tensorsketch

from fz_helpers import explicit_sketch

K = 96
SEED = 5


class RowTask:
    """A task for a model applied to ``batch["x"]``: ``f = sum tanh(model(x))^2`` per row."""

    supported_outputs = ("f",)

    def build_batch(self, episodes):  # not used here: batches are made directly
        raise NotImplementedError

    def output(self, model, batch, name, *, seed=0, draws=64):
        y = model(batch["x"])
        return torch.tanh(y).square().flatten(1).sum(1)


def _explicit(model, task, batch, output="f", *, k=K, seed=SEED, track="all"):
    return explicit_sketch(model, task, batch, output, k=k, seed=seed, track=track)


def _check(model, x, *, strategies=("fft", "dense", "direct")):
    torch.manual_seed(0)
    model = model.double().eval()
    task = RowTask()
    batch = {"x": x.double() if x.is_floating_point() else x}
    f = Featurizer(None, "f", ProjectionConfig(k=K, seed=SEED), task=task, model=model)
    want = _explicit(model, task, batch)
    got = f(batch)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
    assert want.abs().max() > 1e-3  # a real gradient, not two zeros
    # Every evaluation strategy gives the same sketch.
    factors = f.layer_factors(batch)
    dense_layers = [(f._seeds[n], d, xx) for n, d, xx in factors if d.is_floating_point()]
    index_layers = [(f._seeds[n], d, xx, f._by_name[n].num_embeddings) for n, d, xx in factors
                    if not d.is_floating_point()]
    for s in strategies:
        if dense_layers:
            torch.testing.assert_close(
                fused_tensorsketch(dense_layers, k=K, strategy=s, index_factors=index_layers), want,
                rtol=1e-9, atol=1e-11,
            )
    return f


class Conv2dNet(nn.Module):
    def __init__(self, **conv):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, **conv)

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize(
    "conv",
    [
        dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2)),
        dict(kernel_size=4, padding="same", bias=False),
        dict(kernel_size=(2, 3), stride=(3, 2), padding="valid", dilation=(2, 1)),
        dict(kernel_size=1),
    ],
)
def test_conv2d_parity(conv):
    x = torch.randn(4, 3, 9, 7, generator=torch.Generator().manual_seed(1))
    _check(Conv2dNet(**conv), x)


class NormNet(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        if kind == "group":
            self.inp = nn.Conv2d(2, 6, 3, padding=1)
            self.norm = nn.GroupNorm(3, 6)
        elif kind == "group1d":
            self.inp = nn.Conv1d(2, 6, 3)
            self.norm = nn.GroupNorm(2, 6)
        elif kind == "layer":
            self.inp = nn.Linear(3, 5)
            self.norm = nn.LayerNorm(5)
        else:  # a 2-d normalized shape without bias
            self.inp = nn.Linear(3, 4)
            self.norm = nn.LayerNorm((7, 4), bias=False)
        with torch.no_grad():  # non-trivial affine values
            self.norm.weight.uniform_(0.5, 1.5)
            if self.norm.bias is not None:
                self.norm.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        return self.norm(self.inp(x)) * 1.3


@pytest.mark.parametrize("kind,shape", [("group", (5, 2, 5, 3)), ("group1d", (5, 2, 9)), ("layer", (5, 7, 3)),
                                        ("layer2d", (5, 7, 3))])
def test_norm_affine_parity(kind, shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    f = _check(NormNet(kind), x)
    assert f.layer_strategies["norm"]["I"] == (1 if kind == "layer2d" else 2)


class EmbeddingNet(nn.Module):
    def __init__(self, padding_idx=None):
        super().__init__()
        self.emb = nn.Embedding(11, 5, padding_idx=padding_idx)
        self.out = nn.Linear(5, 3)

    def forward(self, tokens):
        return self.out(torch.tanh(self.emb(tokens)))


@pytest.mark.parametrize("padding_idx", [None, 2])
def test_embedding_parity(padding_idx):
    tokens = torch.randint(0, 11, (6, 7), generator=torch.Generator().manual_seed(3))
    tokens[0, :3] = 2  # repeated tokens (and padding ones when padding_idx=2)
    f = _check(EmbeddingNet(padding_idx), tokens)
    assert f.layer_strategies["emb"]["strategy"] == "index"


class LinearAttention(nn.Module):
    """A pre-norm transformer block with attention built from nn.Linear layers."""

    def __init__(self, d=6, heads=2):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d + 1), nn.GELU(), nn.Linear(2 * d + 1, d))

    def forward(self, x):
        B, T, D = x.shape
        h = self.ln1(x)
        split = lambda t: t.reshape(B, T, self.heads, D // self.heads).transpose(1, 2)  # noqa: E731
        att = F.scaled_dot_product_attention(split(self.q(h)), split(self.k(h)), split(self.v(h)))
        x = x + self.o(att.transpose(1, 2).reshape(B, T, D))
        return x + self.mlp(self.ln2(x))


def test_attention_from_linear_layers_parity():
    x = torch.randn(3, 5, 6, generator=torch.Generator().manual_seed(4))
    f = _check(LinearAttention(), x)
    assert {"q", "k", "v", "o", "ln1", "ln2", "mlp.0", "mlp.2"} == set(f.layer_strategies)


class Mixed(nn.Module):
    """Conv2d -> GroupNorm -> Conv2d (stride 2) -> spatial mean -> Linear, plus a token path."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 5, padding=2)
        self.gn = nn.GroupNorm(4, 8)
        self.c2 = nn.Conv2d(8, 7, 3, stride=2, padding=1)
        self.head = nn.Linear(7, 4)

    def forward(self, x):
        h = F.mish(self.gn(self.c1(x)))
        return self.head(F.relu(self.c2(h)).mean((2, 3)))


def test_mixed_cnn_parity_and_strategy_record():
    x = torch.randn(3, 3, 11, 13, generator=torch.Generator().manual_seed(5))
    f = _check(Mixed(), x)
    s = f.layer_strategies
    assert s["c1"]["T"] == 11 * 13 and s["c1"]["I"] == 3 * 25 + 1 and s["c2"]["T"] == 6 * 7
    # The choice follows the cost model: the wide-T first conv hashes its [O, I] gradient.
    assert s["c1"]["strategy"] == "dense"
    assert {v["strategy"] for v in s.values()} <= {"dense", "fft", "direct"}


def test_multihead_attention_refused_by_name_and_vmap_takes_it():
    class WithMHA(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.attn(x, x, x, need_weights=False)[0])

    model = WithMHA().double()
    with pytest.raises(ValueError, match=r"attn \(MultiheadAttention: nn\.MultiheadAttention uses its packed "
                                         r"in_proj_weight"):
        Featurizer(None, "f", ProjectionConfig(k=K), task=RowTask(), model=model)
    # Tracking the head only is fine for the hooks; the vmap path takes every parameter.
    Featurizer(None, "f", ProjectionConfig(k=K), task=RowTask(), model=model, track=["head"])
    fv = Featurizer(None, "f", ProjectionConfig(method="sparse", k=K), path="vmap", task=RowTask(), model=model)
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    assert fv({"x": x}).shape == (2, K)
    assert "attn.in_proj_weight" in fv.order and "attn.out_proj.weight" in fv.order


def test_parameter_used_outside_its_module_is_refused():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)

        def forward(self, x):
            return F.linear(self.a(x), self.b.weight)  # b's forward never runs

    f = Featurizer(None, "f", ProjectionConfig(k=K), task=RowTask(), model=Tied().double())
    with pytest.raises(ValueError, match=r"tracked modules \['b'\] influence the output but their forward never ran"):
        f({"x": torch.randn(2, 4, dtype=torch.float64)})


def test_describe_lists_untracked_and_frozen_parameters():
    model = Mixed().double()
    model.c1.weight.requires_grad_(False)
    model.c1.bias.requires_grad_(False)
    f = Featurizer(None, "f", ProjectionConfig(k=K), task=RowTask(), model=model, track=["c2", "head"])
    d = f.describe()
    assert d["tracked_modules"] == ["c2", "head"]
    assert d["num_tracked_parameters"] == 7 * 8 * 9 + 7 + 4 * 7 + 4
    assert d["untracked_parameters"] == {
        "count": 8 * 3 * 25 + 8 + 8 + 8,
        "tensors": {"c1.weight": 8 * 3 * 25, "c1.bias": 8, "gn.weight": 8, "gn.bias": 8},
    }
    assert d["task_class"] == "RowTask" and d["policy_class"] == "Mixed"
    # Everything tracked: no untracked entry at all.
    assert "untracked_parameters" not in Featurizer(None, "f", ProjectionConfig(k=K), task=RowTask(),
                                                    model=Mixed().double()).describe()


def test_parameter_report_accounts_for_every_parameter():
    model = Mixed().double()
    model.gn.weight.requires_grad_(False)
    f = Featurizer(None, "f", ProjectionConfig(k=K), task=RowTask(), model=model, track=["c1", "gn", "c2"])
    f({"x": torch.randn(2, 3, 7, 9, dtype=torch.float64)})
    rows = {r["name"]: r for r in f.parameter_report()}
    assert sum(r["count"] for r in rows.values()) == sum(p.numel() for p in model.parameters())
    assert rows["gn.weight"]["why"] == "frozen" and rows["head.weight"]["why"] == "outside track"
    assert rows["gn.bias"]["tracked"] and rows["gn.bias"]["module"] == "GroupNorm"
    assert rows["c1.weight"]["strategy"] in ("fft", "dense", "direct") and rows["c1.weight"]["shape"] == (8, 3, 5, 5)
    tracked = sum(r["count"] for r in rows.values() if r["tracked"])
    assert tracked == f.num_tracked == f.describe()["num_tracked_parameters"]
    assert f.describe()["untracked_parameters"]["count"] == 8 + 7 * 4 + 4


def test_first_batch_check_catches_tied_weights_and_reordered_rows():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(9, 4)
            self.mix = nn.Linear(4, 4)

        def forward(self, tokens):  # the embedding weight is also the output projection
            return F.linear(torch.tanh(self.mix(self.emb(tokens))), self.emb.weight)

    tokens = torch.randint(0, 9, (3, 5), generator=torch.Generator().manual_seed(0))
    f = Featurizer(None, "f", ProjectionConfig(k=K), task=RowTask(), model=Tied().double())
    with pytest.raises(ValueError, match=r"hook-path check failed.*'emb \(rel"):
        f({"x": tokens})

    class SeqFirst(nn.Module):  # a Linear applied to a [T, B, D] layout: rows of samples interleaved
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):  # x [B, T, D] -> [T, B, D] -> Linear -> back
            return self.lin(x.transpose(0, 1).reshape(-1, 4)).reshape(x.shape[1], x.shape[0], 3).transpose(0, 1)

    x = torch.randn(2, 4, 4, dtype=torch.float64)
    f = Featurizer(None, "f", ProjectionConfig(k=K), task=RowTask(), model=SeqFirst().double())
    with pytest.raises(ValueError, match=r"hook-path check failed.*'lin \(rel"):
        f({"x": x})
    # Switched off, the same (wrong) sketch is produced without complaint: the check is what guards it.
    Featurizer(None, "f", ProjectionConfig(k=K), task=RowTask(), model=SeqFirst().double(), verify=False)({"x": x})

"""Helpers shared by the featuriser tests."""

from __future__ import annotations

import numpy as np
import torch

from cupid_engine import constants as C
from cupid_engine.data.episode import Episode
from cupid_engine.featurize import layer_seed
from cupid_engine.featurize.hooks import gradient_matrix, layer_matrix_shape
from cupid_engine.featurize.vmap import per_sample_grads
from cupid_engine.ops import reference
from cupid_engine.policies import tracked_modules, tracked_parameters


def make_episodes(n: int = 6, length: int = 9, obs_dim: int = 5, action_dim: int = 3, seed: int = 0,
                  holdout_every: int = 3) -> list[Episode]:
    """Smooth random-walk episodes; every ``holdout_every``-th is in split ``holdout``."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(obs_dim, action_dim)).astype(np.float32)
    out = []
    for i in range(n):
        T = length + (i % 3)  # odd, unequal lengths
        pos = np.cumsum(rng.normal(scale=0.2, size=(T, obs_dim)), axis=0).astype(np.float32)
        act = (np.tanh(pos @ w) + rng.normal(scale=0.05, size=(T, action_dim))).astype(np.float32)
        split = "holdout" if holdout_every and i % holdout_every == holdout_every - 1 else "train"
        out.append(Episode(episode_id=f"ep{i:03d}", observations={"pos": pos}, actions=act, split=split))
    return out


def hash_matrix(G: torch.Tensor, seed: int, k: int) -> torch.Tensor:
    """Tensorsketch of a materialised ``[B, O, I]`` gradient: bucket ``(h1(o) + h2(i)) mod k``,
    sign ``s1(o) s2(i)`` (``reference.tensorsketch_materialized`` without the factors)."""
    B, O, I = G.shape
    b1, s1 = reference.countsketch_buckets(seed, C.STREAM_TS_OUT, O, k)
    b2, s2 = reference.countsketch_buckets(seed, C.STREAM_TS_IN, I, k)
    bucket = ((b1[:, None] + b2[None, :]) % k).reshape(-1)
    sign = (s1[:, None] * s2[None, :]).reshape(-1).to(G.dtype)
    return torch.zeros(B, k, dtype=G.dtype).index_add_(1, bucket, G.reshape(B, -1) * sign)


def explicit_sketch(model, task, batch, output, *, k, seed, track="all", draws=64, noise_seed=0):
    """The definition the hook path must equal: exact per-sample gradients (torch.func),
    each tracked module's laid out as its gradient matrix, hashed with its layer seed,
    summed over modules."""
    params = tracked_parameters(model, track)
    grads = per_sample_grads(model, params, batch, output, task=task, seed=noise_seed, draws=draws)
    out = None
    for name, module in tracked_modules(model, track):
        g = {pn: grads[f"{name}.{pn}" if name else pn] for pn, p in module.named_parameters(recurse=False)
             if p.requires_grad}
        G = gradient_matrix(module, g)
        assert tuple(G.shape[1:]) == layer_matrix_shape(module)
        part = hash_matrix(G, layer_seed(seed, name), k)
        out = part if out is None else out + part
    return out

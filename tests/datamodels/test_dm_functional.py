"""Exact metagradients of the functional optimizers against finite differences."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cupid_engine.datamodels.functional import (
    FunctionalAdam,
    FunctionalSGD,
    functional_train,
    reverse_metagradient,
)


def _linear_problem(n=30, d=4, clusters=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = x @ torch.randn(d, generator=g, dtype=torch.float64) + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    cl = torch.arange(n) % clusters
    xt = torch.randn(7, d, generator=g, dtype=torch.float64)
    yt = xt @ torch.randn(d, generator=g, dtype=torch.float64)

    def step_loss(params, w, t):  # full-batch gradient descent: every step sees all samples
        (theta,) = params
        return (w[cl] * (x @ theta - y) ** 2).mean()

    def metric(params):
        (theta,) = params
        return -((xt @ theta - yt) ** 2).mean()

    return step_loss, metric, [torch.zeros(d, dtype=torch.float64)], clusters


@pytest.mark.parametrize(
    "optimizer",
    [FunctionalSGD(lr=0.1), FunctionalSGD(lr=0.05, momentum=0.9, weight_decay=0.01),
     FunctionalAdam(lr=0.05), FunctionalAdam(lr=0.05, weight_decay=0.1, decoupled=True)],
    ids=["gd", "sgd-momentum-wd", "adam", "adamw"],
)
@pytest.mark.parametrize("mode,segments", [("unroll", 1), ("checkpoint", 3)], ids=["unroll", "ckpt3"])
def test_metagradient_matches_finite_differences(optimizer, mode, segments):
    step_loss, metric, params0, c = _linear_problem()
    steps = 25
    out = reverse_metagradient(step_loss, metric, params0, optimizer, num_steps=steps, num_weights=c,
                               segments=segments, mode=mode)
    eps = 1e-6
    fd = np.zeros(c)
    for i in range(c):
        vals = []
        for sign in (1, -1):
            w = torch.ones(c, dtype=torch.float64)
            w[i] += sign * eps
            vals.append(float(metric(functional_train(step_loss, params0, optimizer, w, steps))))
        fd[i] = (vals[0] - vals[1]) / (2 * eps)
    got = out.grad.numpy()
    rel = np.abs(got - fd) / np.maximum(np.abs(fd), 1e-12)
    assert rel.max() <= 1e-4, (got, fd)
    assert out.metric == pytest.approx(float(metric(functional_train(step_loss, params0, optimizer,
                                                                      torch.ones(c, dtype=torch.float64), steps))))


def test_functional_optimizers_match_torch():
    torch.manual_seed(0)
    p = torch.randn(5, dtype=torch.float64)
    grads = [torch.randn(5, dtype=torch.float64) for _ in range(4)]
    for fopt, make in [
        (FunctionalSGD(lr=0.1, momentum=0.9, weight_decay=0.01),
         lambda q: torch.optim.SGD([q], lr=0.1, momentum=0.9, weight_decay=0.01)),
        (FunctionalAdam(lr=0.01, weight_decay=0.01), lambda q: torch.optim.Adam([q], lr=0.01, weight_decay=0.01)),
        (FunctionalAdam(lr=0.01, weight_decay=0.01, decoupled=True),
         lambda q: torch.optim.AdamW([q], lr=0.01, weight_decay=0.01)),
    ]:
        q = p.clone().requires_grad_(True)
        opt = make(q)
        params, state = [p.clone()], fopt.init([p])
        for t, g in enumerate(grads):
            q.grad = g.clone()
            opt.step()
            params, state = fopt.step(params, [g], state, t)
        torch.testing.assert_close(params[0], q.detach(), rtol=1e-12, atol=1e-14)


def test_last_k_steps_only_differentiates_suffix():
    step_loss, metric, params0, c = _linear_problem()
    opt = FunctionalSGD(lr=0.1)
    full = reverse_metagradient(step_loss, metric, params0, opt, num_steps=20, num_weights=c)
    tail = reverse_metagradient(step_loss, metric, params0, opt, num_steps=20, num_weights=c, start_step=15)
    assert tail.metric == pytest.approx(full.metric, rel=1e-12)
    assert tail.info["differentiated_steps"] == 5
    assert not torch.allclose(tail.grad, full.grad)

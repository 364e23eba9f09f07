"""Cross-check with a peer: TRAK scores from traker and from this engine agree.

Same checkpoint (a small behaviour-cloning MLP), same data, same output function (the BC
loss), k = 2048 on both sides: traker runs its own pipeline end to end (TRAKer with a
FunctionalGradientComputer, a Gaussian BasicProjector, its memmap saver and its score
computer), this engine featurises with hooks + tensorsketch and scores with its
preconditioner. traker's out-to-loss weights Q are set to 1 and its ridge lambda to the
engine's damping in absolute units, so both compute phi_target^T (Phi^T Phi + lambda I)^-1
phi_train; only the random projections differ.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

trak = pytest.importorskip("trak", reason="traker is a peer installed by `make test` (extra 'peers')")

from cupid_engine.data import Episode  # noqa: E402
from cupid_engine.featurize import Featurizer, ProjectionConfig  # noqa: E402
from cupid_engine.policies import MLPPolicyConfig, TrainConfig, build_samples, train_policy  # noqa: E402
from cupid_engine.scorers import Preconditioner  # noqa: E402

K = 2048
DAMPING = 1e-3


def _episodes(rng: np.random.Generator, n: int, prefix: str) -> list[Episode]:
    W = np.array([[0.8, -0.5], [0.3, 0.9], [-0.6, 0.2], [0.1, 0.4]], np.float32)
    out = []
    for i in range(n):
        obs = rng.standard_normal((6, 4)).astype(np.float32)
        act = np.tanh(obs @ W) + 0.1 * rng.standard_normal((6, 2)).astype(np.float32)
        out.append(Episode(f"{prefix}{i:03d}", {"state": obs}, act))
    return out


def test_trak_scores_match_traker(tmp_path, rng):
    from trak import TRAKer
    from trak.modelout_functions import AbstractModelOutput
    from trak.projectors import BasicProjector, ProjectionType

    torch.manual_seed(0)
    train_eps, target_eps = _episodes(rng, 500, "train_"), _episodes(rng, 3, "target_")
    cfg = MLPPolicyConfig(hidden_sizes=(32, 32))
    policy = train_policy(cfg, train_eps, TrainConfig(steps=150, batch_size=64, lr=3e-3, seed=0), progress=False)
    policy.eval()
    c = policy.config
    train = policy.make_batch(build_samples(train_eps, n_obs_steps=c.n_obs_steps, horizon=c.horizon, obs_keys=c.obs_keys))
    target = policy.make_batch(build_samples(target_eps, n_obs_steps=c.n_obs_steps, horizon=c.horizon, obs_keys=c.obs_keys))
    n_train, n_target = train["obs"].shape[0], target["obs"].shape[0]

    # --- this engine: hooks + tensorsketch features, training-Gram preconditioner.
    fz = Featurizer(policy, "loss", ProjectionConfig(method="tensorsketch", k=K, seed=0))
    phi_train = fz(train).double()
    phi_target = fz(target).double()
    pre = Preconditioner.from_features(phi_train.numpy(), damping=DAMPING)
    ours = pre.whiten(phi_target.numpy()) @ pre.whiten(phi_train.numpy()).T  # [targets, train]

    # --- traker, same checkpoint/data/output; Q = 1, lambda in traker's absolute units.
    class BCLoss(AbstractModelOutput):
        def __init__(self) -> None:
            pass

        @staticmethod
        def get_output(model, weights, buffers, obs, action, episode_key, step):
            one = {"obs": obs[None], "action": action[None], "episode_key": episode_key[None], "step": step[None]}
            return torch.func.functional_call(model, (weights, buffers), (one,), {"output": "loss"}).sum()

        def get_out_to_loss_grad(self, model, weights, buffers, batch):
            return torch.ones(batch[0].shape[0], 1)

    P = sum(p.numel() for p in policy.parameters())
    gram = (phi_train.T @ phi_train).numpy()
    lam_abs = DAMPING * float(np.trace(gram)) / K
    traker = TRAKer(
        model=policy, task=BCLoss(), train_set_size=n_train, save_dir=str(tmp_path / "trak"), device="cpu",
        projector=BasicProjector(grad_dim=P, proj_dim=K, seed=0, proj_type=ProjectionType.normal,
                                 device=torch.device("cpu"), dtype=torch.float32),
        proj_dim=K, use_half_precision=False, lambda_reg=lam_abs, logging_level=40,
    )
    traker.load_checkpoint(policy.state_dict(), model_id=0)
    fields = ("obs", "action", "episode_key", "step")
    traker.featurize(batch=[train[f] for f in fields], num_samples=n_train)
    traker.finalize_features()
    traker.start_scoring_checkpoint(exp_name="xcheck", checkpoint=policy.state_dict(), model_id=0, num_targets=n_target)
    traker.score(batch=[target[f] for f in fields], num_samples=n_target)
    theirs = np.asarray(traker.finalize_scores(exp_name="xcheck")).T  # [targets, train]

    assert theirs.shape == ours.shape == (n_target, n_train)
    # Curation ranks demonstrations: a demo's TRAK score is the sum over its samples.
    episode = build_samples(train_eps, n_obs_steps=c.n_obs_steps, horizon=c.horizon, obs_keys=c.obs_keys).episode_index
    onehot = torch.nn.functional.one_hot(episode, len(train_eps)).double().numpy()  # [samples, episodes]
    ours_ep, theirs_ep = ours @ onehot, theirs @ onehot
    # Against the whole target set (the score curation uses) and per target sample.
    assert spearmanr(ours_ep.sum(0), theirs_ep.sum(0)).statistic >= 0.9
    rhos = [spearmanr(ours_ep[t], theirs_ep[t]).statistic for t in range(n_target)]
    assert np.mean(rhos) >= 0.9 and min(rhos) >= 0.85, rhos
    # Per sample, both sides carry their own JL noise (each reaches 0.90-0.97 against the
    # exact unprojected influence on this model); they still agree closely.
    per_sample = [spearmanr(ours[t], theirs[t]).statistic for t in range(n_target)]
    assert np.mean(per_sample) >= 0.85, per_sample

"""Bring your own policy: attribute a policy class the engine did not write.

The policy below is written the way LeRobot writes its diffusion policy (a vision
encoder with GroupNorm and spatial-softmax keypoints, a FiLM-conditioned Conv1d
denoiser, DDPM training through ``forward(batch) -> (loss, info)``). Nothing in it comes
from ``cupid_engine``. To attribute it, the engine needs only a *task* beside it, the
policy protocol (``cupid_engine.policies.PolicyTask``):

* ``build_batch(episodes)``: one row per step of the episodes (observation windows,
  camera frames, action chunks, and ``episode_key``/``step`` to seed the noise);
* ``output(model, batch, name, *, seed, draws) -> [B]``: the output whose per-sample
  gradient is projected. Here ``square`` (CUPID Eq. 9, the label-free diffusion
  surrogate) and ``loss``, averaged over ``draws`` seeded (noise, timestep) draws.

Run the whole loop (data -> train -> featurise -> score -> query), a minute on 2 cores::

    python examples/byo_policy.py --out /tmp/byo

The same policy from the command line (``module:factory`` or ``file.py:factory``)::

    BYO_POLICY_WEIGHTS=/tmp/byo/policy.safetensors cupid-engine featurize \\
        --policy examples/byo_policy.py:make --data /tmp/byo/data --store /tmp/byo/cli.zarr \\
        --run base --output square --draws 8 --k 512
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------------------------------
# The user's policy: LeRobot-style, no cupid_engine import.
# ---------------------------------------------------------------------------------------


class SpatialSoftmax(nn.Module):
    """Expected image coordinates per feature map: ``[N, C, H, W] -> [N, 2C]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        ys = torch.linspace(-1, 1, h, dtype=x.dtype, device=x.device)
        xs = torch.linspace(-1, 1, w, dtype=x.dtype, device=x.device)
        p = torch.softmax(x.reshape(n, c, h * w), dim=-1).reshape(n, c, h, w)
        return torch.cat(((p.sum(3) * ys).sum(2), (p.sum(2) * xs).sum(2)), dim=1)


class VisionEncoder(nn.Module):
    """Conv2d + GroupNorm backbone (BatchNorm replaced, as diffusion policy does) and
    spatial-softmax keypoints: ``uint8 [N, H, W, 3] -> [N, feat]``."""

    def __init__(self, feat: int = 16, channels: int = 8):
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, channels, 3, stride=2, padding=1), nn.GroupNorm(4, channels), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(4, channels), nn.ReLU(),
        )
        self.pool = SpatialSoftmax()
        self.out = nn.Linear(2 * channels, feat)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image.permute(0, 3, 1, 2).to(self.out.weight.dtype) / 255.0
        return self.out(self.pool(self.backbone(x)))


class FiLMDenoiser(nn.Module):
    """``(noisy action [B, H, A], t [B], cond [B, C]) -> predicted noise [B, H, A]``."""

    def __init__(self, action_dim: int, cond_dim: int, width: int = 32, t_dim: int = 16):
        super().__init__()
        self.t_dim = t_dim
        self.t_mlp = nn.Sequential(nn.Linear(t_dim, 2 * t_dim), nn.Mish(), nn.Linear(2 * t_dim, t_dim))
        self.inp = nn.Conv1d(action_dim, width, 5, padding=2)
        self.norm = nn.GroupNorm(4, width)
        self.film = nn.Linear(cond_dim + t_dim, 2 * width)
        self.mid = nn.Conv1d(width, width, 3, padding=1)
        self.out = nn.Conv1d(width, action_dim, 1)

    def forward(self, noisy: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        half = self.t_dim // 2
        freqs = torch.exp(torch.arange(half, dtype=cond.dtype, device=cond.device) * (-math.log(1e4) / (half - 1)))
        arg = t.to(cond.dtype)[:, None] * freqs
        temb = self.t_mlp(torch.cat((arg.sin(), arg.cos()), dim=-1))
        scale, shift = self.film(torch.cat((cond, temb), dim=-1)).unsqueeze(-1).chunk(2, dim=1)
        h = F.mish(self.norm(self.inp(noisy.transpose(1, 2))))
        h = F.mish(self.mid(h * (1 + scale) + shift)) + h
        return self.out(h).transpose(1, 2)


class LeRobotStyleDiffusionPolicy(nn.Module):
    """Image + state diffusion policy with LeRobot's batch keys and ``forward`` contract."""

    def __init__(self, state_dim: int = 4, action_dim: int = 2, *, n_obs_steps: int = 2, horizon: int = 8,
                 camera: str = "agentview", num_train_timesteps: int = 50):
        super().__init__()
        self.state_dim, self.action_dim = state_dim, action_dim
        self.n_obs_steps, self.horizon, self.camera = n_obs_steps, horizon, camera
        self.num_train_timesteps = num_train_timesteps
        self.encoder = VisionEncoder()
        cond_dim = n_obs_steps * (16 + state_dim)
        self.denoiser = FiLMDenoiser(action_dim, cond_dim)
        steps = torch.arange(num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
        abar = torch.cos((steps + 0.008) / 1.008 * math.pi / 2) ** 2
        self.register_buffer("alphas_cumprod", (abar[1:] / abar[0]).float())
        for name, dim in (("state", state_dim), ("action", action_dim)):
            self.register_buffer(f"{name}_mean", torch.zeros(dim))
            self.register_buffer(f"{name}_std", torch.ones(dim))

    def condition(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Observation windows -> ``[B, cond]``: per-step image keypoints and normalised state."""
        state = (batch["observation.state"].to(self.state_mean.dtype) - self.state_mean) / self.state_std
        b, n = state.shape[:2]
        image = batch[f"observation.images.{self.camera}"]
        feats = self.encoder(image.reshape(b * n, *image.shape[2:])).reshape(b, n, -1)  # rows b*n.. stay contiguous
        return torch.cat((feats, state), dim=-1).flatten(1)

    def normalize_action(self, action: torch.Tensor) -> torch.Tensor:
        return (action.to(self.action_mean.dtype) - self.action_mean) / self.action_std

    def add_noise(self, action: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = self.alphas_cumprod[t].to(action.dtype).reshape(-1, 1, 1)
        return abar.sqrt() * action + (1 - abar).sqrt() * noise

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """LeRobot's training contract: random (noise, t) per sample, ``(loss, info)``."""
        action = self.normalize_action(batch["action"])
        noise = torch.randn_like(action)
        t = torch.randint(0, self.num_train_timesteps, (action.shape[0],), device=action.device)
        eps = self.denoiser(self.add_noise(action, noise, t), t, self.condition(batch))
        return F.mse_loss(eps, noise), {}


# ---------------------------------------------------------------------------------------
# The task: the only code that speaks to cupid_engine (helpers, no subclassing).
# ---------------------------------------------------------------------------------------


class LeRobotDiffusionTask:
    """The policy protocol for :class:`LeRobotStyleDiffusionPolicy`."""

    supported_outputs = ("loss", "square")
    uses_noise_draws = True

    def __init__(self, policy: LeRobotStyleDiffusionPolicy):
        self.n_obs_steps, self.horizon, self.camera = policy.n_obs_steps, policy.horizon, policy.camera
        self.action_dim, self.num_train_timesteps = policy.action_dim, policy.num_train_timesteps

    def describe(self) -> dict:
        """Recorded in the policy hash: everything that changes the batches and outputs."""
        return {"n_obs_steps": self.n_obs_steps, "horizon": self.horizon, "camera": self.camera}

    def build_batch(self, episodes) -> dict[str, torch.Tensor]:
        from cupid_engine.policies.samples import episode_key, image_windows, window_indices

        state, action, keys, steps = [], [], [], []
        for ep in episodes:
            obs_idx, act_idx = window_indices(ep.length, self.n_obs_steps, self.horizon)
            state.append(ep.obs_vector(["state"])[obs_idx])
            action.append(ep.actions[act_idx])
            keys.append(np.full(ep.length, episode_key(ep.episode_id), np.int64))
            steps.append(np.arange(ep.length, dtype=np.int64))
        frames = image_windows(episodes, [self.camera], n_obs_steps=self.n_obs_steps)[self.camera]
        return {
            "observation.state": torch.from_numpy(np.concatenate(state)),
            f"observation.images.{self.camera}": frames,
            "action": torch.from_numpy(np.concatenate(action)),
            "episode_key": torch.from_numpy(np.concatenate(keys)),
            "step": torch.from_numpy(np.concatenate(steps)),
        }

    def output(self, model, batch, name, *, seed: int = 0, draws: int = 64) -> torch.Tensor:
        from cupid_engine.policies import seeded_diffusion_noise

        if name not in self.supported_outputs:
            raise ValueError(f"unknown output {name!r}; supported: {self.supported_outputs}")
        b = batch["action"].shape[0]
        cond = model.condition(batch)  # once per sample, repeated per draw (rows stay contiguous)
        noise, t = seeded_diffusion_noise(
            batch["episode_key"], batch["step"], seed=seed, draws=draws, horizon=self.horizon,
            action_dim=self.action_dim, num_train_timesteps=self.num_train_timesteps,
        )
        noise = noise.reshape(b * draws, self.horizon, self.action_dim).to(cond.dtype)
        t = t.reshape(b * draws)
        action = model.normalize_action(batch["action"]).repeat_interleave(draws, 0)
        eps = model.denoiser(model.add_noise(action, noise, t), t, cond.repeat_interleave(draws, 0))
        per_draw = (eps - noise).square().flatten(1).mean(1) if name == "loss" else eps.square().flatten(1).sum(1)
        return per_draw.reshape(b, draws).mean(1)


def make():
    """The ``module:factory`` entry point: ``(model, task)``, weights from
    ``$BYO_POLICY_WEIGHTS`` (a safetensors file written by :func:`save`) when set."""
    model = LeRobotStyleDiffusionPolicy()
    path = os.environ.get("BYO_POLICY_WEIGHTS")
    if path:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(path))
    return model.eval(), LeRobotDiffusionTask(model)


def save(model: nn.Module, path: str | os.PathLike) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


# ---------------------------------------------------------------------------------------
# A toy reaching dataset with a camera, the user's own training loop, and the engine.
# ---------------------------------------------------------------------------------------


def make_episodes(n_good: int = 14, n_bad: int = 6, n_rollouts: int = 6, length: int = 16, seed: int = 0):
    """2-D reaching with a 12x12 camera (target red, agent green). Bad demos wander."""
    from cupid_engine.data.episode import Episode

    rng = np.random.default_rng(seed)
    out = []
    kinds = ["good"] * n_good + ["bad"] * n_bad + ["roll_good", "roll_bad"] * (n_rollouts // 2)
    for i, kind in enumerate(kinds):
        pos, target = rng.uniform(-1, 1, 2), rng.uniform(-1, 1, 2)
        states, actions, frames = [], [], []
        for _ in range(length):
            img = np.zeros((12, 12, 3), np.uint8)
            for c, (x, y) in ((0, target), (1, pos)):
                img[int((y + 1) * 5.5), int((x + 1) * 5.5), c] = 255
            good = kind in ("good", "roll_good")
            act = np.clip(target - pos, -0.2, 0.2) if good else rng.normal(0, 0.2, 2)
            states.append(np.concatenate((pos, target)))
            actions.append(act)
            frames.append(img)
            pos = np.clip(pos + act, -1, 1)
        split = "train" if kind in ("good", "bad") else "rollout"
        out.append(Episode(
            episode_id=f"{kind}_{i:03d}", observations={"state": np.array(states, np.float32)},
            actions=np.array(actions, np.float32), images={"agentview": np.stack(frames)}, split=split,
            success=None if split == "train" else kind == "roll_good", metadata={"quality": kind},
        ))
    return out


def train(model: LeRobotStyleDiffusionPolicy, task: LeRobotDiffusionTask, episodes, *, steps: int = 150,
          batch_size: int = 64, seed: int = 0) -> LeRobotStyleDiffusionPolicy:
    """The user's own loop (LeRobot-style): fit normalisation stats, AdamW on ``forward``."""
    torch.manual_seed(seed)
    data = task.build_batch([e for e in episodes if e.split == "train"])
    with torch.no_grad():
        model.state_mean.copy_(data["observation.state"][:, -1].mean(0))
        model.state_std.copy_(data["observation.state"][:, -1].std(0).clamp_min(1e-2))
        model.action_mean.copy_(data["action"].flatten(0, 1).mean(0))
        model.action_std.copy_(data["action"].flatten(0, 1).std(0).clamp_min(1e-2))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    n = data["action"].shape[0]
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, n, (batch_size,))
        loss, _ = model({k: v[idx] for k, v in data.items()})
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def main(argv=None) -> None:
    import cupid_engine as ce
    from cupid_engine.data import write_dataset
    from cupid_engine.featurize import FeaturizeConfig, featurize

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="byo_policy_out", help="output folder")
    ap.add_argument("--steps", type=int, default=150, help="training steps")
    ap.add_argument("--draws", type=int, default=8, help="noise draws per sample of the square output")
    args = ap.parse_args(argv)
    out = pathlib.Path(args.out)
    episodes = make_episodes()
    data = write_dataset(out / "data", episodes, overwrite=True)
    model = LeRobotStyleDiffusionPolicy()
    task = LeRobotDiffusionTask(model)
    train(model, task, episodes, steps=args.steps)
    save(model, out / "policy.safetensors")
    config = FeaturizeConfig.for_method("tensorsketch", k=512, output="square", draws=args.draws, dtype="float32")
    run = featurize(str(data), out / "store.zarr", "base", task=task, model=model, config=config, progress=False,
                    overwrite=True)
    print(f"featurised {run.info()['shards_done']} shards; tracked modules: "
          f"{len(run.config.featurizer['tracked_modules'])}, task {run.config.featurizer['task_class']}")
    scores = ce.score("cupid", store=str(out / "store.zarr"), run="base").to_pylist()
    scores.sort(key=lambda r: r["score"])
    print("lowest CUPID scores (candidates to filter):", [(r["episode_id"], round(r["score"], 4)) for r in scores[:6]])
    failed = next(e.episode_id for e in episodes if e.split == "rollout" and not e.success)
    result = ce.top_influencers(store=str(out / "store.zarr"), run="base", rollout=failed, k=3)
    print(f"demos that most influenced failed rollout {failed!r}:", result)


if __name__ == "__main__":
    main()

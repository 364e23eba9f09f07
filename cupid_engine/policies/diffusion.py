"""Diffusion policy: a small Conv1d UNet noise-prediction network (Chi et al., 2023).

The network follows diffusion_policy's ``ConditionalUnet1D``: the action chunk
``[B, H, A]`` is treated as an ``A``-channel 1-D signal over the horizon; residual blocks
of ``Conv1d -> GroupNorm -> Mish`` are FiLM-conditioned (per-channel scale and bias) on
the concatenation of a sinusoidal diffusion-timestep embedding and the flattened
observation window; a down path, two mid blocks and an up path with skip connections
end in a 1x1 Conv1d back to ``A`` channels. Training is DDPM (epsilon prediction, 100
steps, squared-cosine betas); sampling is deterministic DDIM (eta = 0, 10 steps by
default) from seeded Gaussian noise, with the predicted clean action clipped to
``[-1, 1]`` (hence the ``minmax`` normaliser by default).

Differences from diffusion_policy, all for the featuriser's hook path, which handles
only ``nn.Linear`` and plain ``nn.Conv1d`` (unfolded as a Linear over time):

* upsampling is parameter-free nearest-neighbour ``nn.Upsample`` followed by a
  ``Conv1d(k=3)`` instead of ``ConvTranspose1d``;
* GroupNorm's affine parameters are optional (``group_norm_affine``, default False):
  with affine GroupNorm, ``track="all"`` works only on the torch.func path, and the
  hook path must track a subset (e.g. ``"head"``). FiLM already provides per-channel
  scale and bias, so dropping the affine costs little.

Default size: ~1M parameters at ``obs_dim`` 40, ``action_dim`` 7.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from cupid_engine.config import check, field
from cupid_engine.constants import STREAM_DIFFUSION_NOISE
from cupid_engine.ops.hashing import MASK32, fastrange, hash32, stream_key
from cupid_engine.policies.base import Policy, PolicyConfig


def squared_cosine_alphas_cumprod(num_steps: int, max_beta: float = 0.999) -> torch.Tensor:
    """ᾱ_t of the squared-cosine schedule (diffusers ``squaredcos_cap_v2``): ``[T]`` float32."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = torch.tensor(
        [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta) for i in range(num_steps)],
        dtype=torch.float64,
    )
    return torch.cumprod(1.0 - betas, 0).float()


def seeded_diffusion_noise(
    episode_key: torch.Tensor,
    step: torch.Tensor,
    *,
    seed: int,
    draws: int,
    horizon: int,
    action_dim: int,
    num_train_timesteps: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (ε, t) draws from the counter-based hash: independent of batch layout.

    Derivation (all hashes are ``ops.hashing.hash32``; arithmetic mod 2**32)::

        k      = stream_key(seed, STREAM_DIFFUSION_NOISE)
        k_s    = hash32(hash32(k, episode_key), step)         # the sample
        k_sd   = hash32(k_s, d)                               # draw d
        t      = fastrange(hash32(k_sd, 0), T)                # uniform in {0..T-1}
        u_j    = ((hash32(k_sd, 1 + j) >> 8) + 0.5) / 2**24   # uniform in (0, 1)
        ε_2m   = sqrt(-2 ln u_2m) cos(2π u_2m+1)              # Box-Muller
        ε_2m+1 = sqrt(-2 ln u_2m) sin(2π u_2m+1)

    and ε is reshaped row-major to ``[H, A]``. Uniforms keep 24 bits so they are exact in
    float32; the transform runs in float64 and is cast to float32, so draws agree across
    devices up to float64 rounding of ``log``/``cos`` (the integer part is bit-exact).

    Args:
        episode_key: ``[B]`` int64 31-bit episode keys.
        step: ``[B]`` int64 steps.
        seed: Global seed in ``[0, 2**63)``.
        draws: Draws per sample.
        horizon: ``H``.
        action_dim: ``A``.
        num_train_timesteps: ``T``.

    Returns:
        ``noise [B, draws, H, A]`` float32 and ``timestep [B, draws]`` int64.
    """
    key = stream_key(seed, STREAM_DIFFUSION_NOISE)
    device = episode_key.device
    k_s = hash32(hash32(key, episode_key.long() & MASK32), step.long() & MASK32)  # [B]
    d = torch.arange(draws, dtype=torch.int64, device=device)
    k_sd = hash32(k_s.unsqueeze(-1), d)  # [B, draws]
    t = fastrange(hash32(k_sd, torch.zeros((), dtype=torch.int64, device=device)), num_train_timesteps)
    n = horizon * action_dim
    pairs = (n + 1) // 2
    counters = 1 + torch.arange(2 * pairs, dtype=torch.int64, device=device)
    bits = hash32(k_sd.unsqueeze(-1), counters) >> 8  # [B, draws, 2 * pairs]
    u = (bits.to(torch.float64) + 0.5) / float(1 << 24)
    radius = torch.sqrt(-2.0 * torch.log(u[..., 0::2]))
    angle = 2.0 * math.pi * u[..., 1::2]
    # Interleave (cos, sin) pairs so element j uses counters of pair j // 2.
    normals = torch.stack((radius * torch.cos(angle), radius * torch.sin(angle)), dim=-1).flatten(-2)[..., :n]
    noise = normals.to(torch.float32).reshape(*k_sd.shape, horizon, action_dim)
    return noise, t


def check_diffusion_fields(config: Any) -> None:
    """Validate the diffusion fields every diffusion-headed policy config shares
    (timestep embedding width, DDPM steps, DDIM steps)."""
    check(config.diffusion_step_embed_dim % 2 == 0 and config.diffusion_step_embed_dim >= 4, "embed dim: even, >= 4")
    check(config.num_train_timesteps >= 2, "num_train_timesteps must be >= 2")
    check(
        1 <= config.num_inference_steps <= config.num_train_timesteps
        and config.num_train_timesteps % config.num_inference_steps == 0,
        "num_inference_steps must divide num_train_timesteps",
    )


@dataclasses.dataclass(frozen=True)
class DiffusionPolicyConfig(PolicyConfig):
    """Conv1d-UNet diffusion policy."""

    n_obs_steps: int = field(2, help="observation window length")
    horizon: int = field(16, help="action chunk length H (divisible by 2**(len(down_dims)-1))")
    n_action_steps: int = field(8, help="actions executed per query")
    normalizer_mode: str = field("minmax", help="minmax to [-1, 1]: DDIM clips the clean action to that box")
    down_dims: tuple[int, ...] = field((32, 64, 128), help="channel widths of the UNet levels")
    kernel_size: int = field(5, help="Conv1d kernel size of the residual blocks (odd)")
    n_groups: int = field(8, help="GroupNorm groups (must divide every width in down_dims)")
    diffusion_step_embed_dim: int = field(64, help="sinusoidal timestep embedding width")
    group_norm_affine: bool = field(
        False, help="GroupNorm affine params; True makes track='all' incompatible with the hook path"
    )
    num_train_timesteps: int = field(100, help="DDPM steps T")
    num_inference_steps: int = field(10, help="DDIM sampling steps (divides num_train_timesteps)")
    clip_sample: bool = field(True, help="clip the predicted clean action to [-1, 1] while sampling")

    def __post_init__(self) -> None:
        super().__post_init__()
        check(len(self.down_dims) >= 1 and all(d >= 1 for d in self.down_dims), "down_dims must be positive")
        check(
            self.horizon % (2 ** (len(self.down_dims) - 1)) == 0,
            f"horizon {self.horizon} must be divisible by 2**(len(down_dims)-1) = {2 ** (len(self.down_dims) - 1)}",
        )
        check(all(d % self.n_groups == 0 for d in self.down_dims), f"n_groups {self.n_groups} must divide down_dims")
        check(self.kernel_size % 2 == 1, "kernel_size must be odd (same-length convolutions)")
        check_diffusion_fields(self)

    @classmethod
    def tiny(cls, **overrides: Any) -> DiffusionPolicyConfig:
        """A few ten-thousand parameters, horizon 8: for tests and smoke runs."""
        base = {"down_dims": (16, 32), "n_groups": 4, "diffusion_step_embed_dim": 16, "horizon": 8, "n_action_steps": 4}
        return cls(**{**base, **overrides})


class SinusoidalPosEmb(nn.Module):
    """Parameter-free sinusoidal embedding of the diffusion timestep: ``[B] -> [B, dim]``.

    The embedding is computed in the module's floating dtype (float32 by default, float64
    after ``.double()``), so a float64 policy never feeds float32 into its Linear layers.
    Having no parameters, the module carries that dtype in a zero-size, non-persistent
    buffer, which ``.to()``/``.double()`` convert and checkpoints never see.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.register_buffer("dtype_probe", torch.empty(0), persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        dtype = self.dtype_probe.dtype
        freqs = torch.exp(torch.arange(half, device=t.device, dtype=dtype) * (-math.log(10000.0) / (half - 1)))
        arg = t.to(dtype).unsqueeze(-1) * freqs
        return torch.cat((arg.sin(), arg.cos()), dim=-1)


class Conv1dBlock(nn.Sequential):
    """``Conv1d -> GroupNorm -> Mish`` keeping the length: ``[B, C_in, L] -> [B, C_out, L]``."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, n_groups: int, affine: bool):
        super().__init__(
            nn.Conv1d(c_in, c_out, kernel_size, padding=kernel_size // 2),
            nn.GroupNorm(n_groups, c_out, affine=affine),
            nn.Mish(),
        )


class ConditionalResidualBlock1D(nn.Module):
    """Two Conv1d blocks with FiLM conditioning in between and a residual connection."""

    def __init__(self, c_in: int, c_out: int, cond_dim: int, kernel_size: int, n_groups: int, affine: bool):
        super().__init__()
        self.blocks = nn.ModuleList(
            [
                Conv1dBlock(c_in, c_out, kernel_size, n_groups, affine),
                Conv1dBlock(c_out, c_out, kernel_size, n_groups, affine),
            ]
        )
        self.out_channels = c_out
        self.cond_encoder = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, 2 * c_out))
        self.residual_conv = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        out = self.blocks[0](x)
        film = self.cond_encoder(cond).reshape(cond.shape[0], 2, self.out_channels, 1)
        out = film[:, 0] * out + film[:, 1]
        out = self.blocks[1](out)
        return out + self.residual_conv(x)


class ConditionalUnet1D(nn.Module):
    """Noise-prediction UNet: ``(x [B, H, A], t [B], cond [B, C]) -> [B, H, A]``."""

    def __init__(self, config: DiffusionPolicyConfig):
        super().__init__()
        c = config
        k, g, aff = c.kernel_size, c.n_groups, c.group_norm_affine
        dsed = c.diffusion_step_embed_dim
        self.diffusion_step_encoder = nn.Sequential(
            SinusoidalPosEmb(dsed), nn.Linear(dsed, 4 * dsed), nn.Mish(), nn.Linear(4 * dsed, dsed)
        )
        cond_dim = dsed + c.n_obs_steps * c.obs_dim
        dims = (c.action_dim, *c.down_dims)
        pairs = list(zip(dims[:-1], dims[1:]))
        self.down_modules = nn.ModuleList()
        for i, (d_in, d_out) in enumerate(pairs):
            last = i == len(pairs) - 1
            self.down_modules.append(
                nn.ModuleList(
                    [
                        ConditionalResidualBlock1D(d_in, d_out, cond_dim, k, g, aff),
                        ConditionalResidualBlock1D(d_out, d_out, cond_dim, k, g, aff),
                        nn.Conv1d(d_out, d_out, 3, stride=2, padding=1) if not last else nn.Identity(),
                    ]
                )
            )
        mid = c.down_dims[-1]
        self.mid_modules = nn.ModuleList(
            [
                ConditionalResidualBlock1D(mid, mid, cond_dim, k, g, aff),
                ConditionalResidualBlock1D(mid, mid, cond_dim, k, g, aff),
            ]
        )
        self.up_modules = nn.ModuleList()
        # Every up level undoes one down-sampling (the last down level has none).
        for d_in, d_out in reversed(pairs[1:]):
            self.up_modules.append(
                nn.ModuleList(
                    [
                        ConditionalResidualBlock1D(2 * d_out, d_in, cond_dim, k, g, aff),
                        ConditionalResidualBlock1D(d_in, d_in, cond_dim, k, g, aff),
                        # Nearest upsampling + Conv1d instead of ConvTranspose1d: see module doc.
                        nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv1d(d_in, d_in, 3, padding=1)),
                    ]
                )
            )
        start = c.down_dims[0]
        self.final_block = Conv1dBlock(start, start, k, g, aff)
        self.final_conv = nn.Conv1d(start, c.action_dim, 1)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        x = sample.transpose(1, 2)  # [B, A, H]: channels first for Conv1d
        global_feature = torch.cat((self.diffusion_step_encoder(timestep), cond), dim=-1)
        skips = []
        for res1, res2, down in self.down_modules:
            x = res2(res1(x, global_feature), global_feature)
            skips.append(x)
            x = down(x)
        for block in self.mid_modules:
            x = block(x, global_feature)
        for res1, res2, up in self.up_modules:
            x = torch.cat((x, skips.pop()), dim=1)
            x = res2(res1(x, global_feature), global_feature)
            x = up(x)
        x = self.final_conv(self.final_block(x))
        return x.transpose(1, 2)


class DiffusionPolicy(Policy):
    """DDPM-trained, DDIM-sampled Conv1d-UNet policy.

    Modules: ``model`` (the :class:`ConditionalUnet1D`); buffer ``alphas_cumprod [T]``.
    """

    config_class = DiffusionPolicyConfig
    supported_outputs = ("loss", "square", "energy")
    uses_noise_draws = True
    #: Batch fields that stay at one row per sample when a batch is expanded per noise draw
    #: (none here: the UNet reads ``obs`` on every row; image policies encode once per sample).
    per_sample_fields: tuple[str, ...] = ()

    def __init__(self, config: DiffusionPolicyConfig):
        super().__init__(config)
        self.model = ConditionalUnet1D(config)
        self.register_buffer("alphas_cumprod", squared_cosine_alphas_cumprod(config.num_train_timesteps))

    def head_modules(self) -> list[str]:
        return ["model.final_conv"]

    # -- output functions (policy protocol) ---------------------------------------------
    def output_hint(self, name: str) -> str:
        hint = " (logprob needs an MLP with head='gaussian'; for diffusion policies use 'square', CUPID Eq. 9)"
        return f"; supported: {self.supported_outputs}{hint if name == 'logprob' else ''}"

    def expand_for_output(
        self, batch: dict[str, torch.Tensor], name: str, *, draws: int = 64, seed: int = 0
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Repeat each sample once per noise draw with its seeded ``noise [R, H, A]``,
        ``timestep [R]`` and ``row_weight [R]`` (= 1/draws): rows ``b * draws .. (b+1) *
        draws - 1`` are sample b's. Fields in :attr:`per_sample_fields` keep one row per
        sample. Returns ``(expanded, group_index [R])``."""
        self.check_output(name)
        if draws < 1:
            raise ValueError(f"draws must be >= 1, got {draws}")
        for key in ("episode_key", "step"):
            if key not in batch:
                raise ValueError(f"output {name!r} needs batch field {key!r} to seed its noise draws")
        batch_size = batch["obs"].shape[0]
        device = batch["obs"].device
        c = self.config
        noise, timestep = seeded_diffusion_noise(
            batch["episode_key"], batch["step"], seed=seed, draws=draws, horizon=c.horizon,
            action_dim=c.action_dim, num_train_timesteps=c.num_train_timesteps,
        )
        keep = self.per_sample_fields
        expanded = {k: (v if k in keep else v.repeat_interleave(draws, dim=0)) for k, v in batch.items()}
        expanded["noise"] = noise.reshape(batch_size * draws, *noise.shape[2:]).to(batch["obs"].dtype)
        expanded["timestep"] = timestep.reshape(batch_size * draws)
        # 1/draws per row, carried as data so that output_rows needs no side channel.
        expanded["row_weight"] = torch.full((batch_size * draws,), 1.0 / draws, dtype=batch["obs"].dtype, device=device)
        group_index = torch.arange(batch_size, device=device).repeat_interleave(draws)
        return expanded, group_index

    def output_rows(self, expanded: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        """Per-row contributions ``[R]`` (already divided by ``draws``) of an expanded batch."""
        self.check_output(name)
        if not {"noise", "timestep", "row_weight"} <= set(expanded):
            raise ValueError("diffusion outputs need an expanded batch (see expand_for_output)")
        rows = expanded["timestep"].shape[0]
        eps_hat = self.predict_noise_for(expanded)
        if name == "loss":
            per_row = (eps_hat - expanded["noise"]).square().reshape(rows, -1).mean(1)
        else:  # square and energy: the label-agnostic squared-norm surrogate (CUPID Eq. 9)
            per_row = eps_hat.square().reshape(rows, -1).sum(1)
        return per_row * expanded["row_weight"]

    def _output(self, batch: dict[str, torch.Tensor], name: str, *, seed: int, draws: int) -> torch.Tensor:
        """Mean over ``draws`` seeded (ε, t) draws (CUPID Eq. 9 for ``square``): ``[B]``."""
        batch_size = batch["obs"].shape[0]
        expanded, _ = self.expand_for_output(batch, name, draws=draws, seed=seed)
        rows = self.output_rows(expanded, name)
        # Rows of a sample are contiguous and equally many, so a reshape-sum replaces
        # index_add: cheaper, and trivially vmap-compatible.
        return rows.reshape(batch_size, -1).sum(1)

    def predict_noise(self, noisy_action: torch.Tensor, timestep: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        """ε_θ: ``noisy_action [B, H, A]``, ``timestep [B]`` int64, normalised ``obs [B, n_obs, D]``
        -> ``[B, H, A]``."""
        return self.model(noisy_action, timestep, obs.reshape(obs.shape[0], -1))

    def add_noise(self, action: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """``√ᾱ_t a + √(1-ᾱ_t) ε``: all ``[B, H, A]``, ``timestep [B]``."""
        abar = self.alphas_cumprod[timestep].to(action.dtype).reshape(-1, 1, 1)
        return abar.sqrt() * action + (1 - abar).sqrt() * noise

    def predict_noise_for(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """ε_θ on a batch carrying ``noise`` and ``timestep``: ``[B, H, A]``."""
        self.check_batch(batch)
        noisy = self.add_noise(batch["action"], batch["noise"], batch["timestep"])
        return self.predict_noise(noisy, batch["timestep"], batch["obs"])

    def per_sample_loss(
        self, batch: dict[str, torch.Tensor], *, generator: torch.Generator | None = None, **kwargs: Any
    ) -> torch.Tensor:
        """Denoising loss ``mean_elem (ε - ε_θ)²`` per sample, one (ε, t) draw each: ``[B]``.

        The draw comes from ``batch["noise"]``/``batch["timestep"]`` when present, else
        from ``generator`` (training), else from the seeded hash with seed 0 (so that a
        call without a generator is deterministic and order-independent).
        """
        self.check_batch(batch)
        c = self.config
        if "noise" in batch and "timestep" in batch:
            drawn = batch
        else:
            act = batch["action"]
            if generator is not None:
                # Drawn on the generator's device (CPU by default), then moved: the
                # numbers then do not depend on the training device.
                gdev = generator.device
                noise = torch.randn(act.shape, generator=generator, device=gdev).to(act.device, act.dtype)
                t = torch.randint(0, c.num_train_timesteps, (act.shape[0],), generator=generator, device=gdev)
                t = t.to(act.device)
            else:
                noise, t = seeded_diffusion_noise(
                    batch["episode_key"], batch["step"], seed=0, draws=1, horizon=c.horizon,
                    action_dim=c.action_dim, num_train_timesteps=c.num_train_timesteps,
                )
                noise, t = noise[:, 0].to(act.dtype), t[:, 0]
            drawn = {**batch, "noise": noise, "timestep": t}
        eps_hat = self.predict_noise_for(drawn)
        return (eps_hat - drawn["noise"]).square().flatten(1).mean(1)

    @torch.no_grad()
    def predict_normalized(self, obs: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Deterministic DDIM (eta = 0) from seeded start noise: ``[B, n_obs, D] -> [B, H, A]``."""
        return self.ddim_sample(lambda x, t: self.predict_noise(x, t, obs), like=obs, generator=generator)

    @torch.no_grad()
    def ddim_sample(
        self,
        denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        *,
        like: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Deterministic DDIM (eta = 0) over ``num_inference_steps`` of the DDPM schedule.

        Args:
            denoise: ``(x [B, H, A], timestep [B] int64) -> ε̂ [B, H, A]``, the condition
                already bound (every diffusion policy's sampler is this loop).
            like: A ``[B, ...]`` tensor giving the batch size, device and dtype of the chunk.
            generator: Source of the start noise, drawn on the generator's device (CPU by
                default) and then moved, so the numbers do not depend on the device.

        Returns:
            The normalised action chunk ``[B, H, A]`` (clean-action estimates clipped to
            ``[-1, 1]`` when ``clip_sample``).
        """
        c = self.config
        batch_size = like.shape[0]
        gdev = generator.device if generator is not None else torch.device("cpu")
        x = torch.randn((batch_size, c.horizon, c.action_dim), generator=generator, device=gdev).to(like.device, like.dtype)
        stride = c.num_train_timesteps // c.num_inference_steps
        ac = self.alphas_cumprod.to(torch.float64)
        for t in range(c.num_train_timesteps - stride, -1, -stride):
            tt = torch.full((batch_size,), t, dtype=torch.int64, device=like.device)
            eps = denoise(x, tt)
            abar_t = float(ac[t])
            abar_prev = float(ac[t - stride]) if t - stride >= 0 else 1.0
            x0 = (x - math.sqrt(1 - abar_t) * eps) / math.sqrt(abar_t)
            if c.clip_sample:
                x0 = x0.clamp(-1.0, 1.0)
                # Re-derive ε from the clipped x0 so the update stays on the DDIM path.
                eps = (x - math.sqrt(abar_t) * x0) / math.sqrt(1 - abar_t)
            x = math.sqrt(abar_prev) * x0 + math.sqrt(1 - abar_prev) * eps
        return x

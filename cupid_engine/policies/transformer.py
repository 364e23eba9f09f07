"""Transformer policy (Octo/ACT-like): image patches + state + language tokens, diffusion head.

Tokens, all width ``d_model``:

* language: the task text as word-hash tokens (``image_samples.tokenize_text``, no hub
  tokenizer) through a learned ``nn.Embedding``; padding tokens are masked as keys;
* images: every camera of every observation step cut into ``patch_size`` x
  ``patch_size`` patches, flattened, and embedded by one ``nn.Linear`` (a ViT patch
  embedding written as a Linear over the unfolded patches);
* state: the low-dim observation of each step through an ``nn.Linear``;
* one learned readout token (Octo's readout), looked up from an ``nn.Embedding``.

Learned position embeddings (one per token slot) come from an ``nn.Embedding`` looked up
with per-sample indices, and the readout likewise: the policy has no bare
``nn.Parameter``, and every lookup has a batch axis, so per-sample gradients of every
parameter are visible to a hook featuriser. Pre-LayerNorm blocks of self-attention built
from ``nn.Linear`` (fused ``qkv`` and an output projection; never
``nn.MultiheadAttention``, whose packed ``in_proj_weight`` hooks cannot see) and a GELU
MLP; a final LayerNorm. The readout's final state conditions a diffusion head (Octo): an
MLP on ``[noisy action chunk, timestep embedding, readout]`` predicting ε, trained with
DDPM and sampled with DDIM exactly like :class:`~cupid_engine.policies.diffusion.DiffusionPolicy`.
The trunk runs once per sample; only the head sees the ``draws`` rows of the diffusion
outputs (see :mod:`cupid_engine.policies.diffusion_image`).

Attention is full over all tokens (Octo uses a block-causal mask so that observation
tokens never read the readout; with one readout token and no later readouts the
difference is only that observation tokens may attend to it).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from cupid_engine.config import check, field
from cupid_engine.data.episode import Episode
from cupid_engine.policies.base import PolicyConfig
from cupid_engine.policies.diffusion import SinusoidalPosEmb, check_diffusion_fields
from cupid_engine.policies.diffusion_image import (
    ImageDiffusionBase,
    build_samples_for,
    check_image_fields,
    resolve_image_fields,
)
from cupid_engine.policies.image_samples import ImageSampleSet
from cupid_engine.policies.vision import images_to_float


@dataclasses.dataclass(frozen=True)
class TransformerPolicyConfig(PolicyConfig):
    """Octo-like transformer with a diffusion head."""

    n_obs_steps: int = field(1, help="observation window length")
    horizon: int = field(8, help="action chunk length H")
    n_action_steps: int = field(4, help="actions executed per query")
    normalizer_mode: str = field("minmax", help="minmax to [-1, 1]: DDIM clips the clean action to that box")
    image_keys: tuple[str, ...] | None = field(None, help="camera keys, in order (None: sorted keys of the data)")
    image_shape: tuple[int, ...] = field((), help="(H, W, C) of every camera (empty: inferred from the data)")
    patch_size: int = field(14, help="square patch side in pixels (divides H and W; 84 -> 6x6 patches)")
    d_model: int = field(64, help="token width")
    depth: int = field(3, help="transformer blocks")
    num_heads: int = field(4, help="attention heads (divide d_model)")
    mlp_ratio: int = field(2, help="hidden width of the block MLP = mlp_ratio * d_model")
    text_tokens: int = field(16, help="task-text tokens (0: no language tokens)")
    vocab_size: int = field(1024, help="word-hash buckets of the text tokenizer (token 0 is padding)")
    head_dims: tuple[int, ...] = field((256, 256), help="hidden widths of the diffusion-head MLP")
    diffusion_step_embed_dim: int = field(32, help="sinusoidal timestep embedding width of the head")
    num_train_timesteps: int = field(100, help="DDPM steps T")
    num_inference_steps: int = field(10, help="DDIM sampling steps (divides num_train_timesteps)")
    clip_sample: bool = field(True, help="clip the predicted clean action to [-1, 1] while sampling")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_image_fields(self)
        check(self.patch_size >= 1, "patch_size must be >= 1")
        if len(self.image_shape) == 3:
            check(
                self.image_shape[0] % self.patch_size == 0 and self.image_shape[1] % self.patch_size == 0,
                f"patch_size {self.patch_size} must divide the image size {self.image_shape[:2]}",
            )
        check(self.d_model >= 1 and self.depth >= 1 and self.mlp_ratio >= 1, "d_model, depth, mlp_ratio: >= 1")
        check(self.num_heads >= 1 and self.d_model % self.num_heads == 0, "num_heads must divide d_model")
        check(len(self.head_dims) >= 1 and all(h >= 1 for h in self.head_dims), "head_dims must be positive")
        check_diffusion_fields(self)

    @property
    def resolved(self) -> bool:
        return super().resolved and bool(self.image_keys) and len(self.image_shape) == 3

    @property
    def patches_per_image(self) -> int:
        return (self.image_shape[0] // self.patch_size) * (self.image_shape[1] // self.patch_size)

    @property
    def num_tokens(self) -> int:
        """Sequence length: text + per step (cameras x patches + state) + readout."""
        return self.text_tokens + self.n_obs_steps * (len(self.image_keys or ()) * self.patches_per_image + 1) + 1

    @classmethod
    def tiny(cls, **overrides: Any) -> TransformerPolicyConfig:
        """d_model 32, 2 blocks, 8 text tokens, small head: for tests and smoke runs."""
        base = {"d_model": 32, "depth": 2, "num_heads": 2, "text_tokens": 8, "vocab_size": 128,
                "head_dims": (64, 64), "diffusion_step_embed_dim": 16, "horizon": 4, "n_action_steps": 2}
        return cls(**{**base, **overrides})

    def resolve_samples(self, samples: ImageSampleSet) -> TransformerPolicyConfig:
        return resolve_image_fields(self, samples)

    def build_samples(self, data: ImageSampleSet | Iterable[Episode]) -> ImageSampleSet:
        return build_samples_for(self, data)


class SelfAttention(nn.Module):
    """Multi-head self-attention from two ``nn.Linear`` layers (hook-visible).

    ``x [B, T, d]``, ``key_mask [B, T]`` bool (True = may be attended to) -> ``[B, T, d]``.
    """

    def __init__(self, d_model: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        h = self.num_heads
        q, k, v = self.qkv(x).reshape(B, T, 3, h, d // h).permute(2, 0, 3, 1, 4)  # 3 x [B, h, T, dh]
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d // h)
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        out = torch.softmax(scores, dim=-1) @ v  # [B, h, T, dh]
        return self.proj(out.transpose(1, 2).reshape(B, T, d))


class Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(LN(x))``, then ``x + MLP(LN(x))``."""

    def __init__(self, d_model: int, num_heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, num_heads)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, mlp_ratio * d_model), nn.GELU(), nn.Linear(mlp_ratio * d_model, d_model))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), key_mask)
        return x + self.mlp(self.norm2(x))


class DiffusionHead(nn.Module):
    """Octo-style diffusion head: ``(noisy [R, H, A], t [R], cond [R, C]) -> ε̂ [R, H, A]``."""

    def __init__(self, horizon: int, action_dim: int, cond_dim: int, hidden: tuple[int, ...], embed_dim: int):
        super().__init__()
        self.horizon, self.action_dim = horizon, action_dim
        self.time_embed = nn.Sequential(
            SinusoidalPosEmb(embed_dim), nn.Linear(embed_dim, 2 * embed_dim), nn.Mish(), nn.Linear(2 * embed_dim, embed_dim)
        )
        layers: list[nn.Module] = []
        width = horizon * action_dim + embed_dim + cond_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.Mish()]
            width = h
        self.mlp = nn.Sequential(*layers)
        self.out = nn.Linear(width, horizon * action_dim)

    def forward(self, noisy: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        x = torch.cat((noisy.flatten(1), self.time_embed(timestep), cond), dim=-1)
        return self.out(self.mlp(x)).reshape(-1, self.horizon, self.action_dim)


class TransformerPolicy(ImageDiffusionBase):
    """Transformer trunk + diffusion head (module docstring).

    Modules: ``text_embed``, ``patch_embed``, ``state_embed``, ``readout``, ``pos_embed``,
    ``blocks``, ``norm`` (the trunk) and ``head`` (:class:`DiffusionHead`).
    """

    config_class = TransformerPolicyConfig

    def __init__(self, config: TransformerPolicyConfig):
        super().__init__(config)
        c = config
        d = c.d_model
        H, W, C = c.image_shape
        self.text_embed = nn.Embedding(c.vocab_size, d, padding_idx=0) if c.text_tokens else None
        self.patch_embed = nn.Linear(c.patch_size * c.patch_size * C, d)
        self.state_embed = nn.Linear(c.obs_dim, d)
        self.readout = nn.Embedding(1, d)
        self.pos_embed = nn.Embedding(c.num_tokens, d)
        self.blocks = nn.ModuleList(Block(d, c.num_heads, c.mlp_ratio) for _ in range(c.depth))
        self.norm = nn.LayerNorm(d)
        self.head = DiffusionHead(c.horizon, c.action_dim, d, tuple(c.head_dims), c.diffusion_step_embed_dim)
        for emb in (self.readout, self.pos_embed, self.text_embed):
            if emb is not None:
                nn.init.normal_(emb.weight, std=0.02)
                if emb.padding_idx is not None:
                    with torch.no_grad():
                        emb.weight[emb.padding_idx].zero_()

    def head_modules(self) -> list[str]:
        return ["head"]

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """``uint8 [B, N, H, W, C]`` -> ``[B, N * P, p * p * C]`` float patches in ``[-1, 1]``."""
        p = self.config.patch_size
        x = images_to_float(images, self.patch_embed.weight.dtype)  # [B, N, C, H, W]
        B, N, C, H, W = x.shape
        x = x.reshape(B, N, C, H // p, p, W // p, p).permute(0, 1, 3, 5, 4, 6, 2)  # [B, N, h, w, p, p, C]
        return x.reshape(B, N * (H // p) * (W // p), p * p * C)

    def encode(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        c = self.config
        obs, img = batch["obs"], batch["image"]
        B, n_obs = obs.shape[:2]
        K, P = len(c.image_keys), c.patches_per_image
        patches = self.patch_embed(self.patchify(img.reshape(B, n_obs * K, *img.shape[3:])))  # [B, n_obs*K*P, d]
        state = self.state_embed(obs)  # [B, n_obs, d]
        obs_tokens = torch.cat((patches.reshape(B, n_obs, K * P, -1), state[:, :, None]), dim=2).reshape(B, -1, c.d_model)
        parts, masks = [], []
        if c.text_tokens:
            text = batch["text"]
            parts.append(self.text_embed(text))
            masks.append(text != 0)
        parts.append(obs_tokens)
        masks.append(torch.ones(obs_tokens.shape[:2], dtype=torch.bool, device=obs.device))
        parts.append(self.readout(torch.zeros(B, 1, dtype=torch.long, device=obs.device)))
        masks.append(torch.ones(B, 1, dtype=torch.bool, device=obs.device))
        x = torch.cat(parts, dim=1)
        positions = torch.arange(x.shape[1], device=obs.device).expand(B, -1)
        x = x + self.pos_embed(positions)
        key_mask = torch.cat(masks, dim=1)
        for block in self.blocks:
            x = block(x, key_mask)
        return self.norm(x[:, -1])

    def denoise(self, noisy: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.head(noisy, timestep, cond)


__all__ = ["TransformerPolicy", "TransformerPolicyConfig", "SelfAttention", "Block", "DiffusionHead"]

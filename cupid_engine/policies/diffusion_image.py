"""Image diffusion policy: ResNet-18 (GroupNorm, spatial softmax) encoders + the Conv1d UNet.

CUPID's hardware policy (paper 001, appendix B.2): diffusion policy (Chi et al., 2023)
whose parameters are ``θ = (θ_o, θ_a)``, a ResNet-18 image encoder ``E_θo`` and the
noise-prediction network ``ε_θa``; influences are computed over *all* of θ. Here:

* one :class:`~cupid_engine.policies.vision.ImageEncoder` per camera (ResNet-18 with
  GroupNorm, spatial-softmax pooling, Linear to ``image_feature_dim``), as in
  diffusion_policy's robomimic image encoder (no weight sharing between cameras);
* per observation step the camera features are concatenated with the low-dim state, the
  window is flattened, and the result FiLM-conditions the
  :class:`~cupid_engine.policies.diffusion.ConditionalUnet1D` of the low-dim policy;
* training, the ``loss``/``square``/``energy`` outputs and DDIM sampling are those of
  :class:`~cupid_engine.policies.diffusion.DiffusionPolicy`.

Encode once per sample. The diffusion outputs average over ``draws`` noise draws
(CUPID: 64). The observation encoding does not depend on the draw, so
:meth:`ImageDiffusionBase.expand_for_output` leaves ``obs``/``image``/``text`` at one row
per sample and only the UNet sees ``B * draws`` rows: the encoder runs ``draws`` times
less, and autograd sums the draws' gradients into the encoder's per-sample rows, which is
exactly the gradient of the draw average. For the hook featuriser this means encoder
layers capture ``B * n_obs`` (or ``B``) rows and UNet layers ``B * draws`` rows; both are
contiguous per sample.

Differences from diffusion_policy: no random-crop augmentation (outputs must be
deterministic functions of the sample; a crop would need its own seeded draws), and the
default encoder is narrower (``encoder_width`` 16, torchvision's ResNet-18 has 64) so the
policy trains in minutes on two CPU cores at 84x84; depth (``encoder_blocks``), layer
types and pooling are ResNet-18's.
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
from cupid_engine.policies.base import Policy, PolicyConfig
from cupid_engine.policies.diffusion import (
    ConditionalUnet1D,
    DiffusionPolicy,
    DiffusionPolicyConfig,
    squared_cosine_alphas_cumprod,
)
from cupid_engine.policies.image_samples import ImageSampleSet, build_image_samples
from cupid_engine.policies.vision import ImageEncoder

#: Batch fields the observation encoder reads: one row per sample, never repeated per draw.
PER_SAMPLE_FIELDS = ("obs", "image", "text")


def check_image_fields(config: Any) -> None:
    """Validate the image fields shared by the image policy configs."""
    check(config.image_keys is None or isinstance(config.image_keys, tuple), "image_keys must be a tuple or None")
    check(
        config.image_shape == () or (len(config.image_shape) == 3 and all(s >= 1 for s in config.image_shape)),
        f"image_shape must be () (inferred) or (H, W, C), got {config.image_shape}",
    )
    check(config.text_tokens >= 0, "text_tokens must be >= 0")
    check(config.vocab_size >= 2, "vocab_size must be >= 2")


def resolve_image_fields(config: Any, samples: ImageSampleSet) -> Any:
    """Fill ``image_keys``/``image_shape`` from the samples; mismatches raise naming the field."""
    if not isinstance(samples, ImageSampleSet):
        raise TypeError(f"{type(config).__name__} trains on image samples (ImageSampleSet), got {type(samples).__name__}")
    for name, value in (("image_keys", tuple(samples.image_keys)), ("image_shape", tuple(samples.image_shape))):
        have = getattr(config, name)
        if have not in (None, (), value):
            raise ValueError(f"config {name}={have} but the samples have {value}")
    if samples.text.shape[1] != config.text_tokens:
        raise ValueError(f"samples carry {samples.text.shape[1]} text tokens, the config wants {config.text_tokens}")
    return config.replace(image_keys=tuple(samples.image_keys), image_shape=tuple(samples.image_shape))


def build_samples_for(config: Any, data: ImageSampleSet | Iterable[Episode]) -> ImageSampleSet:
    """The :class:`ImageSampleSet` an image-policy config trains and featurises on."""
    if isinstance(data, ImageSampleSet):
        return data
    return build_image_samples(
        data, n_obs_steps=config.n_obs_steps, horizon=config.horizon, obs_keys=config.obs_keys,
        image_keys=config.image_keys, text_tokens=config.text_tokens, vocab_size=config.vocab_size,
    )


@dataclasses.dataclass(frozen=True)
class DiffusionImagePolicyConfig(DiffusionPolicyConfig):
    """Image diffusion policy: per-camera ResNet-18 (GN) encoders conditioning the UNet."""

    image_keys: tuple[str, ...] | None = field(None, help="camera keys, in order (None: sorted keys of the data)")
    image_shape: tuple[int, ...] = field((), help="(H, W, C) of every camera (empty: inferred from the data)")
    encoder_width: int = field(16, help="channels of the first ResNet stage (torchvision ResNet-18: 64)")
    encoder_blocks: tuple[int, ...] = field((2, 2, 2, 2), help="basic blocks per ResNet stage (ResNet-18: 2,2,2,2)")
    num_keypoints: int = field(32, help="spatial-softmax keypoints per camera")
    image_feature_dim: int = field(64, help="feature width per camera after the spatial softmax + Linear")
    text_tokens: int = field(0, help="task-text tokens in a batch (this policy ignores language: keep 0)")
    vocab_size: int = field(1024, help="word-hash buckets of the text tokenizer (unused while text_tokens = 0)")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_image_fields(self)
        check(self.encoder_width >= 1, "encoder_width must be >= 1")
        check(len(self.encoder_blocks) >= 1 and all(b >= 1 for b in self.encoder_blocks), "encoder_blocks: >= 1 each")
        check(self.num_keypoints >= 1 and self.image_feature_dim >= 1, "num_keypoints, image_feature_dim: >= 1")

    @property
    def resolved(self) -> bool:
        return super().resolved and bool(self.image_keys) and len(self.image_shape) == 3

    @classmethod
    def tiny(cls, **overrides: Any) -> DiffusionImagePolicyConfig:
        """Width 4, three stages of one block, horizon 8: for tests and smoke runs (images >= 17 px)."""
        base = {
            "down_dims": (16, 32), "n_groups": 4, "diffusion_step_embed_dim": 16, "horizon": 8, "n_action_steps": 4,
            "encoder_width": 4, "encoder_blocks": (1, 1, 1), "num_keypoints": 8, "image_feature_dim": 16,
        }
        return cls(**{**base, **overrides})

    def resolve_samples(self, samples: ImageSampleSet) -> DiffusionImagePolicyConfig:
        return resolve_image_fields(self, samples)

    def build_samples(self, data: ImageSampleSet | Iterable[Episode]) -> ImageSampleSet:
        return build_samples_for(self, data)


class ImageDiffusionBase(DiffusionPolicy):
    """Diffusion policies whose condition is computed from images (and text) once per sample.

    Subclasses implement :meth:`encode` (``batch -> cond [B, C]``) and :meth:`denoise`
    (``noisy [R, H, A], timestep [R], cond [R, C] -> ε̂ [R, H, A]``). Batches carry, besides
    the low-dim fields, ``image: uint8 [B, n_obs, K, H, W, C]`` and ``text: [B, L]`` int64.
    """

    per_sample_fields = PER_SAMPLE_FIELDS

    def __init__(self, config: PolicyConfig):
        # DiffusionPolicy.__init__ would build the low-dim UNet; subclasses build their own.
        Policy.__init__(self, config)
        self.register_buffer("alphas_cumprod", squared_cosine_alphas_cumprod(config.num_train_timesteps))

    # -- to implement ---------------------------------------------------------------
    def encode(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Observation condition ``[B, C]`` from ``obs``, ``image`` (and ``text``)."""
        raise NotImplementedError

    def denoise(self, noisy: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """ε̂: ``[R, H, A]``, ``[R]`` int64, ``[R, C]`` -> ``[R, H, A]``."""
        raise NotImplementedError

    # -- batches --------------------------------------------------------------------
    def build_samples(self, data: ImageSampleSet | Iterable[Episode]) -> ImageSampleSet:
        """Samples (frames, text tokens) of episodes cut with this policy's config."""
        return build_samples_for(self.config, data)

    def build_batch(self, episodes: Iterable[Episode]) -> dict[str, torch.Tensor]:
        """Policy protocol: normalised batch (frames, text) of one sample per step of ``episodes``."""
        return self.make_batch(self.build_samples(episodes))

    def make_batch(self, samples: Any, indices: Any = None) -> dict[str, torch.Tensor]:
        if not isinstance(samples, ImageSampleSet):
            raise TypeError(f"{type(self).__name__} needs an ImageSampleSet (build_samples), got {type(samples).__name__}")
        batch = self.normalizer.normalize_batch(samples.batch(indices))
        device = self.normalizer.obs_center.device
        batch["image"] = batch["image"].to(device)
        batch["text"] = batch["text"].to(device)
        return batch

    def check_batch(self, batch: dict[str, torch.Tensor], *, need_action: bool = True) -> None:
        """Raise a ValueError naming the field whose shape does not fit the config.

        ``action``/``noise``/``timestep`` may have ``R = B * draws`` rows (an expanded
        batch); the per-sample fields ``obs``/``image``/``text`` have ``B``.
        """
        c = self.config
        obs = batch.get("obs")
        if obs is None or obs.dim() != 3 or tuple(obs.shape[1:]) != (c.n_obs_steps, c.obs_dim):
            raise ValueError(
                f"batch field 'obs' must be [B, {c.n_obs_steps}, {c.obs_dim}], got {None if obs is None else tuple(obs.shape)}"
            )
        B = obs.shape[0]
        img = batch.get("image")
        want = (B, c.n_obs_steps, len(c.image_keys), *c.image_shape)
        if img is None or tuple(img.shape) != want:
            raise ValueError(
                f"batch field 'image' must be {list(want)} (B, n_obs, cameras {c.image_keys}, H, W, C), got "
                f"{None if img is None else tuple(img.shape)}"
            )
        if c.text_tokens:
            text = batch.get("text")
            if text is None or tuple(text.shape) != (B, c.text_tokens):
                raise ValueError(
                    f"batch field 'text' must be [B={B}, {c.text_tokens}] tokens, got {None if text is None else tuple(text.shape)}"
                )
        if need_action:
            act = batch.get("action")
            if act is None or act.dim() != 3 or tuple(act.shape[1:]) != (c.horizon, c.action_dim) or act.shape[0] % B:
                raise ValueError(
                    f"batch field 'action' must be [B * draws (B={B}), {c.horizon}, {c.action_dim}], got "
                    f"{None if act is None else tuple(act.shape)}"
                )

    # -- diffusion ------------------------------------------------------------------
    def predict_noise(self, noisy_action: torch.Tensor, timestep: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        raise TypeError(f"{type(self).__name__} conditions on images: use predict_noise_for(batch)")

    def predict_noise_for(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """ε_θ on a batch carrying ``noise`` and ``timestep`` (``R`` rows, ``R / B`` per sample)."""
        self.check_batch(batch)
        cond = self.encode(batch)
        rows, samples = batch["timestep"].shape[0], cond.shape[0]
        if rows != samples:
            cond = cond.repeat_interleave(rows // samples, dim=0)
        noisy = self.add_noise(batch["action"], batch["noise"], batch["timestep"])
        return self.denoise(noisy, batch["timestep"], cond)

    # -- sampling -------------------------------------------------------------------
    def predict_normalized(self, obs: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        raise TypeError(
            f"{type(self).__name__} needs images to act: use predict_action_batch(batch) or "
            "predict_normalized_batch(batch)"
        )

    @torch.no_grad()
    def predict_normalized_batch(
        self, batch: dict[str, torch.Tensor], *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Deterministic DDIM (eta = 0) on a normalised batch (no ``action`` needed): ``[B, H, A]``."""
        self.check_batch(batch, need_action=False)
        cond = self.encode(batch)
        return self.ddim_sample(lambda x, t: self.denoise(x, t, cond), like=batch["obs"], generator=generator)

    @torch.no_grad()
    def predict_action_batch(
        self, batch: dict[str, torch.Tensor], *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Raw batch (``obs`` unnormalised, ``image`` uint8, ``text``) -> raw actions
        ``[B, n_action_steps, A]`` to execute."""
        was_training = self.training
        self.eval()
        try:
            device = self.normalizer.obs_center.device
            norm = self.normalizer.normalize_batch({"obs": batch["obs"]})
            norm["image"] = batch["image"].to(device)
            norm["text"] = batch.get("text", torch.zeros(batch["obs"].shape[0], 0, dtype=torch.long)).to(device)
            chunk = self.predict_normalized_batch(norm, generator=generator)
            return self.normalizer.unnormalize_action(chunk[:, : self.config.n_action_steps])
        finally:
            self.train(was_training)


class DiffusionImagePolicy(ImageDiffusionBase):
    """CUPID's image diffusion policy (module docstring).

    Modules: ``encoders`` (one :class:`ImageEncoder` per camera, in ``image_keys`` order)
    and ``model`` (the :class:`ConditionalUnet1D`); buffer ``alphas_cumprod [T]``.
    """

    config_class = DiffusionImagePolicyConfig

    def __init__(self, config: DiffusionImagePolicyConfig):
        super().__init__(config)
        c = config
        if c.image_shape[2] != 3:
            raise ValueError(f"image_shape {c.image_shape}: the encoders take RGB (C = 3)")
        # Stem conv and max-pool halve the size, every later stage halves it again.
        final = [math.ceil(side / 2 ** (len(c.encoder_blocks) + 1)) for side in c.image_shape[:2]]
        if final == [1, 1]:
            raise ValueError(
                f"image_shape {c.image_shape} with {len(c.encoder_blocks)} ResNet stages leaves a 1x1 feature map: "
                "the spatial softmax is then constant and no gradient reaches the encoder; use fewer "
                "encoder_blocks or larger images"
            )
        self.encoders = nn.ModuleList(
            ImageEncoder(c.encoder_width, c.encoder_blocks, c.num_keypoints, c.image_feature_dim)
            for _ in c.image_keys
        )
        # The UNet conditions on the flattened window of [camera features, low-dim state]:
        # it reads only obs_dim * n_obs_steps from its config, so widen obs_dim for it.
        per_step = c.obs_dim + len(c.image_keys) * c.image_feature_dim
        self.model = ConditionalUnet1D(c.replace(obs_dim=per_step))

    def head_modules(self) -> list[str]:
        return ["model.final_conv"]

    def load_encoder_weights(self, path: str, prefix: str = "") -> None:
        """Initialise every camera's encoder from a local safetensors file (no download).

        Args:
            path: A ``.safetensors`` file holding an :class:`ImageEncoder` state dict under
                ``prefix`` (e.g. ``"encoders.0."`` of another policy's ``model.safetensors``).
            prefix: Name prefix of the encoder's tensors in the file.

        Raises:
            FileNotFoundError, ValueError: see :func:`~cupid_engine.policies.vision.load_encoder_weights`
                (every missing, unexpected or mis-shaped tensor is named).
        """
        from cupid_engine.policies.vision import load_encoder_weights

        for encoder in self.encoders:
            load_encoder_weights(encoder, path, prefix=prefix)

    def encode(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        obs, img = batch["obs"], batch["image"]
        B, n_obs = obs.shape[:2]
        feats = [
            enc(img[:, :, k].reshape(B * n_obs, *img.shape[3:])).reshape(B, n_obs, -1)
            for k, enc in enumerate(self.encoders)
        ]
        return torch.cat((*feats, obs), dim=-1).reshape(B, -1)

    def denoise(self, noisy: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.model(noisy, timestep, cond)

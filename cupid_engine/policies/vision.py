"""Vision building blocks written in the project: ResNet-18 with GroupNorm, spatial softmax.

PyPI ``torchvision`` does not import beside the pinned torch, so the ResNet is written
here. It follows ``torchvision.models.resnet18`` layer for layer (7x7/2 stem conv, 3x3/2
max-pool, four stages of two ``BasicBlock`` each, 1x1/2 projection shortcuts), with the
changes diffusion_policy (Chi et al., 2023) makes for its image encoders:

* every ``BatchNorm2d`` is a ``GroupNorm(max(1, C // 16), C)`` (diffusion_policy's
  ``replace_bn_with_gn``): no batch statistics, so samples never interact inside the
  network (the hook featuriser's premise) and eval equals train;
* the global average pool and the classifier are replaced by robomimic's
  :class:`SpatialSoftmax`: a 1x1 conv to ``num_keypoints`` maps, a softmax over each
  map's pixels, and the expected ``(x, y)`` of each map, followed by a Linear to
  ``feature_dim``.

Widths scale with ``width`` (torchvision: 64, i.e. stages 64/128/256/512); a narrower
width keeps the depth and the layer types of ResNet-18 but trains in minutes on two CPU
cores at 84x84. Weights are random (seeded by the caller) or read from a *local*
safetensors file with :func:`load_encoder_weights`; nothing is ever downloaded.

Images enter as ``uint8 [B, H, W, C]`` (the layout episodes store) and are mapped to
``[-1, 1]`` float channels-first inside :class:`ImageEncoder`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BasicBlock",
    "ImageEncoder",
    "ResNet18GN",
    "SpatialSoftmax",
    "group_norm",
    "images_to_float",
    "load_encoder_weights",
]


def group_norm(channels: int, group_size: int = 16) -> nn.GroupNorm:
    """``GroupNorm(max(1, C // group_size), C)``: diffusion_policy's BatchNorm replacement."""
    groups = max(1, channels // group_size)
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels)


def images_to_float(images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``uint8 [..., H, W, C]`` -> ``[..., C, H, W]`` in ``[-1, 1]`` of ``dtype``.

    Float inputs are taken to be in ``[0, 1]`` already (tests, rendered frames).
    """
    x = images.to(dtype)
    if images.dtype == torch.uint8:
        x = x / 255.0
    return (x * 2.0 - 1.0).movedim(-1, -3)


class BasicBlock(nn.Module):
    """ResNet basic block: ``conv3x3 -> GN -> ReLU -> conv3x3 -> GN`` + shortcut, ReLU.

    ``[B, C_in, H, W] -> [B, C_out, ceil(H / stride), ceil(W / stride)]``.
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm1 = group_norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = group_norm(c_out)
        self.downsample: nn.Module
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), group_norm(c_out))
        else:
            self.downsample = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.downsample(x))


class ResNet18GN(nn.Module):
    """ResNet-18 trunk (no pooling, no classifier) with GroupNorm.

    Args:
        in_channels: Input channels (3 for RGB).
        width: Channels of the first stage; stages have ``width * (1, 2, 4, 8)``
            (torchvision's ResNet-18: 64).
        blocks: Basic blocks per stage (ResNet-18: ``(2, 2, 2, 2)``).

    Shapes: ``[B, C, H, W] -> [B, 8 * width, ~H / 32, ~W / 32]`` (``84 -> 3``).
    """

    def __init__(self, in_channels: int = 3, width: int = 64, blocks: Sequence[int] = (2, 2, 2, 2)):
        super().__init__()
        if width < 1 or not blocks or any(b < 1 for b in blocks):
            raise ValueError(f"width must be >= 1 and blocks positive, got {width}, {tuple(blocks)}")
        self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        self.norm1 = group_norm(width)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        stages = []
        c_in = width
        for i, n in enumerate(blocks):
            c_out = width * 2**i
            layer = [BasicBlock(c_in, c_out, stride=1 if i == 0 else 2)]
            layer += [BasicBlock(c_out, c_out) for _ in range(n - 1)]
            stages.append(nn.Sequential(*layer))
            c_in = c_out
        self.layers = nn.Sequential(*stages)
        self.out_channels = c_in
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.norm1(self.conv1(x))))
        return self.layers(x)


class SpatialSoftmax(nn.Module):
    """robomimic's spatial-softmax pooling: ``[B, C, H, W] -> [B, 2 * num_keypoints]``.

    A 1x1 conv maps the features to ``num_keypoints`` maps; each map is softmaxed over
    its ``H * W`` pixels (temperature 1) and reduced to the expected pixel coordinates
    ``(x, y)`` in ``[-1, 1]``. The coordinate grid is built from the input size at call
    time in the input's dtype, so the module has no size-dependent state.
    """

    def __init__(self, in_channels: int, num_keypoints: int = 32):
        super().__init__()
        self.num_keypoints = num_keypoints
        self.keypoints = nn.Conv2d(in_channels, num_keypoints, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.keypoints(x)
        B, K, H, W = maps.shape
        attn = torch.softmax(maps.reshape(B, K, H * W), dim=-1)
        ys = torch.linspace(-1.0, 1.0, H, dtype=x.dtype, device=x.device)
        xs = torch.linspace(-1.0, 1.0, W, dtype=x.dtype, device=x.device)
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        coords = torch.stack((grid_x.reshape(-1), grid_y.reshape(-1)), dim=-1)  # [H*W, 2]
        return (attn @ coords).reshape(B, 2 * K)


class ImageEncoder(nn.Module):
    """One camera's encoder: ResNet-18 (GN) -> spatial softmax -> Linear -> ``feature_dim``.

    ``uint8 [B, H, W, 3]`` (or float in ``[0, 1]``) -> ``[B, feature_dim]``.
    """

    def __init__(self, width: int = 64, blocks: Sequence[int] = (2, 2, 2, 2), num_keypoints: int = 32,
                 feature_dim: int = 64, in_channels: int = 3):
        super().__init__()
        self.backbone = ResNet18GN(in_channels, width, blocks)
        self.pool = SpatialSoftmax(self.backbone.out_channels, num_keypoints)
        self.proj = nn.Linear(2 * num_keypoints, feature_dim)
        self.feature_dim = feature_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        dtype = self.proj.weight.dtype
        return self.proj(self.pool(self.backbone(images_to_float(images, dtype))))


def load_encoder_weights(encoder: nn.Module, path: str | os.PathLike[str], *, prefix: str = "",
                         strict: bool = True) -> list[str]:
    """Load encoder weights from a local safetensors file (no download, no pickle).

    Args:
        encoder: The module to fill (e.g. an :class:`ImageEncoder` or its ``backbone``).
        path: A local ``.safetensors`` file.
        prefix: Only tensors whose names start with ``prefix`` are used, with it stripped
            (e.g. ``"backbone."`` to take a trunk out of a whole-policy file).
        strict: Every parameter and buffer of ``encoder`` must be in the file with the same
            shape, and the selected file tensors must all be used.

    Returns:
        The names of ``encoder``'s state entries left untouched (empty when strict).

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: Missing, unexpected or mis-shaped tensors (all of them named).
    """
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise FileNotFoundError(f"encoder weights {path} is not a local file")
    tensors = {k[len(prefix):]: v for k, v in load_file(str(path)).items() if k.startswith(prefix)}
    state = encoder.state_dict()
    missing = sorted(set(state) - set(tensors))
    unexpected = sorted(set(tensors) - set(state))
    bad_shape = sorted(k for k in set(state) & set(tensors) if tuple(state[k].shape) != tuple(tensors[k].shape))
    if bad_shape or (strict and (missing or unexpected)):
        raise ValueError(
            f"{path}: cannot load into {type(encoder).__name__}: missing {missing}, unexpected {unexpected}, "
            f"shape mismatch {[(k, tuple(tensors[k].shape), tuple(state[k].shape)) for k in bad_shape]}"
        )
    encoder.load_state_dict({k: tensors[k] for k in set(state) & set(tensors)}, strict=False)
    return missing

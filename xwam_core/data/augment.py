"""Training augmentation (METHOD.md section 5), on batched tensors after the loader.

- Per view: a random crop of `crop_scale` of each side, resized back to the original size (bilinear
  for RGB, nearest for depth so no depth is invented at edges). The same crop for every frame of a
  view (the video stays consistent) and the intrinsics follow the crop, so geometry stays right.
- Colour jitter shared across views and frames of a sample: brightness, contrast, saturation, hue.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AugmentConfig:
    """Recipe section `[train.augment]`. Defaults are the paper's fine-tuning augmentation."""

    enabled: bool = True
    crop_scale: float = 0.95  # crop side as a fraction of the image side
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.05


def _grayscale(rgb: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) in [0, 1] -> (..., 1, H, W) with ITU-R 601 luma weights."""
    r, g, b = rgb.unbind(-3)
    return (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(-3)


def _shift_hue(rgb: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate hue by shift[i] (fraction of a turn) for every image of sample i; rgb (B, ..., 3, H, W)."""
    from torchvision.transforms.v2 import functional as TF

    out = torch.empty_like(rgb)
    for i in range(rgb.shape[0]):  # one call per sample: all its views and frames share the shift
        images = rgb[i].reshape(-1, *rgb.shape[-3:])  # (V*T, 3, H, W)
        out[i] = TF.adjust_hue(images, float(shift[i])).reshape(rgb.shape[1:])
    return out


def augment_batch(
    rgb: torch.Tensor,
    depth: torch.Tensor,
    intrinsics: torch.Tensor,
    config: AugmentConfig,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Augment one batch.

    rgb: (B, V, T, 3, H, W) float in [0, 1]; depth: (B, V, T, H, W) metres; intrinsics (B, V, T, 3, 3).
    Returns new tensors of the same shapes (the inputs are not modified).
    """
    if not config.enabled:
        return rgb, depth, intrinsics
    b, v, t, _, h, w = rgb.shape
    dev = rgb.device
    rand = torch.rand(b, v, 2, generator=generator).to(dev)  # crop offsets per view
    ch, cw = max(1, round(h * config.crop_scale)), max(1, round(w * config.crop_scale))
    top = (rand[..., 0] * (h - ch + 1)).long().clamp(max=h - ch)  # (B, V)
    left = (rand[..., 1] * (w - cw + 1)).long().clamp(max=w - cw)
    out_rgb = torch.empty_like(rgb)
    out_depth = torch.empty_like(depth)
    out_k = intrinsics.clone()
    for i in range(b):
        for j in range(v):
            y0, x0 = int(top[i, j]), int(left[i, j])
            crop = rgb[i, j, :, :, y0 : y0 + ch, x0 : x0 + cw]  # (T, 3, ch, cw)
            out_rgb[i, j] = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
            dcrop = depth[i, j, :, None, y0 : y0 + ch, x0 : x0 + cw]  # (T, 1, ch, cw)
            out_depth[i, j] = F.interpolate(dcrop, size=(h, w), mode="nearest")[:, 0]
    # Pixel centres sit at integer coordinates (xwam_core.geometry). Resizing maps pixel-edge
    # coordinates e' = (e - x0) * w / cw, and e = u + 0.5, so u' = (u + 0.5 - x0) * w / cw - 0.5.
    sx, sy = w / cw, h / ch
    out_k[..., 0, 0] *= sx
    out_k[..., 0, 2] = (out_k[..., 0, 2] + 0.5 - left[:, :, None].to(out_k.dtype)) * sx - 0.5
    out_k[..., 1, 1] *= sy
    out_k[..., 1, 2] = (out_k[..., 1, 2] + 0.5 - top[:, :, None].to(out_k.dtype)) * sy - 0.5

    # colour jitter: one set of factors per sample, shared by all views and frames
    jitter = torch.rand(b, 4, generator=generator).to(dev) * 2 - 1  # (B, 4) in [-1, 1]
    shape = (b, 1, 1, 1, 1, 1)
    brightness = (1 + config.brightness * jitter[:, 0]).view(shape)
    contrast = (1 + config.contrast * jitter[:, 1]).view(shape)
    saturation = (1 + config.saturation * jitter[:, 2]).view(shape)
    hue = config.hue * jitter[:, 3]  # (B,)
    x = (out_rgb * brightness).clamp(0, 1)
    mean = _grayscale(x).mean(dim=(-3, -2, -1), keepdim=True)
    x = ((x - mean) * contrast + mean).clamp(0, 1)
    gray = _grayscale(x)
    x = ((x - gray) * saturation + gray).clamp(0, 1)
    if config.hue > 0:
        x = _shift_hue(x, hue)
    return x, out_depth, out_k

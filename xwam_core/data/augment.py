"""Training augmentation (docs/method.md section 6), on batched tensors after the loader.

- Per view: a random crop of `crop_scale` of each side, resized back to the original size (bilinear
  for RGB, nearest for depth so no depth is invented at edges). The same crop for every frame of a
  view (the video stays consistent) and the intrinsics follow the crop, so geometry stays right.
- Colour jitter shared across views and frames of a sample: brightness, contrast, saturation, hue.
  Hue turns the chroma plane of YIQ colour space by 2*pi*h (one 3x3 matrix per sample), a linear
  stand-in for HSV hue rotation that runs on the whole batch at once.
Everything is batched: one grid_sample per modality, one matrix product for hue.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from xwam_core.errors import require


@dataclass
class AugmentConfig:
    """Recipe section `[train.augment]`. Defaults are the paper's fine-tuning augmentation."""

    enabled: bool = True
    crop_scale: float = 0.95  # crop side as a fraction of the image side
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.05

    def validate(self) -> None:
        """Raise RecipeError naming the first field outside its range (the recipe loader calls it)."""
        key = "train.augment"
        require(
            0.0 < self.crop_scale <= 1.0,
            f"{key}.crop_scale",
            "a fraction of the side in (0, 1]",
            self.crop_scale,
        )
        for name in ("brightness", "contrast", "saturation"):  # factors 1 +- value must stay >= 0
            value = getattr(self, name)
            require(0.0 <= value <= 1.0, f"{key}.{name}", "a jitter strength in [0, 1]", value)
        require(0.0 <= self.hue <= 0.5, f"{key}.hue", "a hue shift in [0, 0.5] turns", self.hue)


def _grayscale(rgb: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) in [0, 1] -> (..., 1, H, W) with ITU-R 601 luma weights."""
    r, g, b = rgb.unbind(-3)
    return (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(-3)


_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def _hue_matrices(turns: torch.Tensor) -> torch.Tensor:
    """(B,) hue shifts in turns -> (B, 3, 3) RGB matrices rotating the YIQ chroma plane."""
    angle = turns * 2 * torch.pi
    cos, sin = torch.cos(angle), torch.sin(angle)
    rot = torch.zeros(turns.shape[0], 3, 3, dtype=torch.float32)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    yiq = _RGB_TO_YIQ
    return torch.linalg.inv(yiq) @ rot @ yiq


def _crop_grid(top: torch.Tensor, left: torch.Tensor, ch: int, cw: int, h: int, w: int) -> torch.Tensor:
    """(N,) crop corners -> (N, h, w, 2) grid_sample coordinates resizing the crop to (h, w).

    Pixel centres are integers: output pixel i samples input y = top + (i + 0.5) ch / h - 0.5;
    grid_sample (align_corners=False) wants 2 (y + 0.5) / H - 1.
    """
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) * ch / h  # (h,) = y + 0.5 - top
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) * cw / w
    gy = 2 * (top[:, None].float() + ys[None]) / h - 1  # (N, h)
    gx = 2 * (left[:, None].float() + xs[None]) / w - 1  # (N, w)
    n = top.shape[0]
    return torch.stack([gx[:, None, :].expand(n, h, w), gy[:, :, None].expand(n, h, w)], dim=-1)


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
    rand = torch.rand(b, v, 2, generator=generator)  # crop offsets per view
    ch, cw = max(1, round(h * config.crop_scale)), max(1, round(w * config.crop_scale))
    top = (rand[..., 0] * (h - ch + 1)).long().clamp(max=h - ch)  # (B, V)
    left = (rand[..., 1] * (w - cw + 1)).long().clamp(max=w - cw)
    grid = _crop_grid(top.flatten(), left.flatten(), ch, cw, h, w).to(dev)  # (B*V, h, w, 2)
    grid = grid[:, None].expand(b * v, t, h, w, 2).reshape(b * v * t, h, w, 2)
    out_rgb = F.grid_sample(
        rgb.reshape(b * v * t, 3, h, w), grid, mode="bilinear", padding_mode="border", align_corners=False
    ).reshape(rgb.shape)
    out_depth = F.grid_sample(
        depth.reshape(b * v * t, 1, h, w), grid, mode="nearest", padding_mode="border", align_corners=False
    ).reshape(depth.shape)
    # Pixel centres sit at integer coordinates (xwam_core.geometry). Resizing maps pixel-edge
    # coordinates e' = (e - x0) * w / cw, and e = u + 0.5, so u' = (u + 0.5 - x0) * w / cw - 0.5.
    out_k = intrinsics.clone()
    sx, sy = w / cw, h / ch
    out_k[..., 0, 0] *= sx
    out_k[..., 0, 2] = (out_k[..., 0, 2] + 0.5 - left[:, :, None].to(dev, out_k.dtype)) * sx - 0.5
    out_k[..., 1, 1] *= sy
    out_k[..., 1, 2] = (out_k[..., 1, 2] + 0.5 - top[:, :, None].to(dev, out_k.dtype)) * sy - 0.5

    # colour jitter: one set of factors per sample, shared by all views and frames
    jitter = torch.rand(b, 4, generator=generator).to(dev) * 2 - 1  # (B, 4) in [-1, 1]
    shape = (b, 1, 1, 1, 1, 1)
    brightness = (1 + config.brightness * jitter[:, 0]).view(shape)
    contrast = (1 + config.contrast * jitter[:, 1]).view(shape)
    saturation = (1 + config.saturation * jitter[:, 2]).view(shape)
    x = (out_rgb * brightness).clamp(0, 1)
    mean = _grayscale(x).mean(dim=(-3, -2, -1), keepdim=True)
    x = ((x - mean) * contrast + mean).clamp(0, 1)
    gray = _grayscale(x)
    x = ((x - gray) * saturation + gray).clamp(0, 1)
    if config.hue > 0:
        m = _hue_matrices(config.hue * jitter[:, 3].cpu()).to(dev, x.dtype)  # (B, 3, 3)
        x = torch.einsum("bij,bvtjhw->bvtihw", m, x).clamp(0, 1)
    return x, out_depth, out_k

"""Evaluation metrics: PSNR, SSIM, LPIPS on RGB; AbsRel, delta1 on depth; Chamfer on point clouds; action error.

Inputs are numpy arrays or torch tensors. Images are channels-last (..., H, W, C) like the episode store
(uint8 RGB or floats, scaled by `data_range`); depth maps are (..., H, W) metres with 0 = invalid.
Image and depth metrics return one value per image, a float64 numpy array of the leading shape (...)
(0-d for a single image); Chamfer and the action metrics return one float. docs/metrics.md has the
definitions and conventions.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from xwam_core.errors import XWAMError
from xwam_core.geometry import chamfer_distance

ArrayLike = np.ndarray | torch.Tensor
LPIPS_WEIGHTS_ENV = "XWAM_LPIPS_WEIGHTS"
LPIPS_BATCH = 16  # image pairs per AlexNet forward


def _float64(x: ArrayLike) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to(device="cpu", dtype=torch.float64)
    return torch.from_numpy(np.asarray(x)).to(torch.float64)


def _image_pair(pred: ArrayLike, target: ArrayLike, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    p, t = _float64(pred), _float64(target)
    if p.shape != t.shape:
        raise XWAMError(f"{name}: prediction {tuple(p.shape)} and target {tuple(t.shape)} differ in shape")
    if p.ndim < 3:
        raise XWAMError(f"{name}: images have shape {tuple(p.shape)}, expected (..., H, W, C)")
    return p, t


def psnr(pred: ArrayLike, target: ArrayLike, data_range: float) -> np.ndarray:
    """Peak signal-to-noise ratio in dB per image (higher is better; +inf for identical images).

    PSNR = 10 log10(data_range^2 / MSE), MSE over the image's pixels and channels; same as
    skimage.metrics.peak_signal_noise_ratio. Images (..., H, W, C).
    """
    p, t = _image_pair(pred, target, "psnr")
    mse = ((p - t) ** 2).mean(dim=(-3, -2, -1))
    with np.errstate(divide="ignore"):
        return np.asarray(10 * np.log10(float(data_range) ** 2 / mse.numpy()), dtype=np.float64)


SSIM_K1, SSIM_K2 = 0.01, 0.03


def ssim(pred: ArrayLike, target: ArrayLike, data_range: float) -> np.ndarray:
    """Structural similarity per image, in [-1, 1] (1 = identical; higher is better).

    The setting papers report (Wang et al. 2004): 11x11 Gaussian window with sigma 1.5, population
    covariance, K1 = 0.01, K2 = 0.03. Equals skimage's structural_similarity(..., channel_axis=-1,
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=data_range).
    The SSIM map is averaged over the valid window positions (no padding) and over channels.
    Images (..., H, W, C) with H, W >= 11.
    """
    p, t = _image_pair(pred, target, "ssim")
    x = torch.arange(-5, 6, dtype=torch.float64)  # 11 taps, sigma 1.5 (scipy's truncate 3.5 -> radius 5)
    taps = torch.exp(-0.5 * (x / 1.5) ** 2)
    taps = taps / taps.sum()
    size = len(taps)
    height, width, channels = p.shape[-3:]
    if height < size or width < size:
        raise XWAMError(f"ssim: images are {height}x{width}, expected at least {size}x{size} for the window")
    lead = p.shape[:-3]
    # (..., H, W, C) -> (B * C, 1, H, W): every channel filtered independently.
    p = p.reshape(-1, height, width, channels).permute(0, 3, 1, 2).reshape(-1, 1, height, width)
    t = t.reshape(-1, height, width, channels).permute(0, 3, 1, 2).reshape(-1, 1, height, width)

    def blur(x: torch.Tensor) -> torch.Tensor:  # separable, "valid": only full windows
        x = F.conv2d(x, taps.view(1, 1, size, 1))
        return F.conv2d(x, taps.view(1, 1, 1, size))

    mu_p, mu_t = blur(p), blur(t)
    var_p = blur(p * p) - mu_p * mu_p
    var_t = blur(t * t) - mu_t * mu_t
    cov = blur(p * t) - mu_p * mu_t
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * mu_p * mu_t + c1) * (2 * cov + c2)) / ((mu_p**2 + mu_t**2 + c1) * (var_p + var_t + c2))
    per_image = ssim_map.reshape(-1, channels, *ssim_map.shape[-2:]).mean(dim=(1, 2, 3))
    return per_image.reshape(lead).numpy()


def _depth_pair(
    pred: ArrayLike, gt: ArrayLike, valid: ArrayLike | None, name: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    p, g = np.asarray(_float64(pred)), np.asarray(_float64(gt))
    if p.shape != g.shape or p.ndim < 2:
        raise XWAMError(f"{name}: prediction {p.shape} and ground truth {g.shape} must be equal (..., H, W)")
    mask = np.isfinite(g) & (g > 0)
    if valid is not None:
        v = np.asarray(_float64(valid)).astype(bool)
        if v.shape != g.shape:
            raise XWAMError(f"{name}: valid mask {v.shape} does not match the depth {g.shape}")
        mask &= v
    return p, g, mask


def _per_map_mean(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    count = mask.sum(axis=(-2, -1))
    total = np.where(mask, values, 0.0).sum(axis=(-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def depth_abs_rel(pred: ArrayLike, gt: ArrayLike, valid: ArrayLike | None = None) -> np.ndarray:
    """Mean |pred - gt| / gt over valid pixels, per depth map (lower is better, >= 0).

    Valid: gt > 0 and finite (and `valid` where given). NaN for a map without valid pixels.
    """
    p, g, mask = _depth_pair(pred, gt, valid, "absrel")
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = np.abs(p - g) / g
    rel = np.where(np.isfinite(rel), rel, np.inf)  # a non-finite prediction is infinitely wrong
    return _per_map_mean(rel, mask)


def depth_delta1(
    pred: ArrayLike, gt: ArrayLike, valid: ArrayLike | None = None, threshold: float = 1.25
) -> np.ndarray:
    """Fraction of valid pixels with max(pred / gt, gt / pred) < 1.25, per depth map (in [0, 1], higher better).

    Valid as in depth_abs_rel; a prediction <= 0 or non-finite counts as a miss. NaN without valid pixels.
    """
    p, g, mask = _depth_pair(pred, gt, valid, "delta1")
    positive = np.isfinite(p) & (p > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.maximum(p / g, g / p)
    hit = positive & (ratio < threshold)
    return _per_map_mean(hit.astype(np.float64), mask)


def _action_error(pred: ArrayLike, target: ArrayLike, name: str, power: int) -> float:
    p, t = np.asarray(_float64(pred)), np.asarray(_float64(target))
    if p.shape != t.shape or p.ndim < 1:
        raise XWAMError(f"{name}: prediction {p.shape} and target {t.shape} must be equal (..., D)")
    return float((np.abs(p - t) ** power).mean())


def action_mse(pred: ArrayLike, target: ArrayLike) -> float:
    """Mean squared error over all elements of (..., D) actions (lower better, in squared action units)."""
    return _action_error(pred, target, "action_mse", 2)


def action_l1(pred: ArrayLike, target: ArrayLike) -> float:
    """Mean absolute error over all elements of (..., D) actions (lower better, in action units)."""
    return _action_error(pred, target, "action_l1", 1)


# --- LPIPS --------------------------------------------------------------------------------------


# LPIPS's AlexNet trunk keeps torchvision's layer indices: features.{i} -> net.slice{k}.{i}.
_ALEX_SLICES = {0: 1, 3: 2, 6: 3, 8: 4, 10: 5}


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A tensor dict from safetensors or a torch file, never unpickling arbitrary objects."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise XWAMError(
            f"LPIPS weights {path}: not a safetensors or torch state-dict file ({reason})"
        ) from err
    if not isinstance(state, dict):
        raise XWAMError(f"LPIPS weights {path}: expected a state dict, found {type(state).__name__}")
    return state


class LPIPSMetric:
    """LPIPS (Zhang et al. 2018, net='alex', v0.1) per image pair: >= 0, 0 = identical, lower is better.

    The linear heads ship with the `lpips` package; the AlexNet trunk comes from a local file
    (`weights_path` or $XWAM_LPIPS_WEIGHTS): torchvision's alexnet state dict, as safetensors or .pth.
    Nothing is downloaded; without weights the constructor refuses with one line.
    """

    def __init__(self, weights_path: str | Path | None = None, device: str = "cpu"):
        path_str = str(weights_path) if weights_path is not None else os.environ.get(LPIPS_WEIGHTS_ENV)
        if not path_str:
            raise XWAMError(
                "LPIPS needs the AlexNet weights: pass --lpips-weights PATH or set "
                f"{LPIPS_WEIGHTS_ENV} (torchvision alexnet state dict, safetensors or .pth)"
            )
        path = Path(path_str).expanduser()
        if not path.is_file():
            raise XWAMError(
                f"LPIPS weights {path} do not exist (expected torchvision alexnet weights, "
                "safetensors or .pth)"
            )
        state = _load_state_dict(path)
        trunk: dict[str, torch.Tensor] = {}
        for index, slice_no in _ALEX_SLICES.items():
            for kind in ("weight", "bias"):
                key = f"features.{index}.{kind}"
                if key not in state:
                    raise XWAMError(
                        f"LPIPS weights {path}: missing '{key}'; expected torchvision alexnet "
                        f"keys (features.0.weight, ...), found {sorted(state)[:4]}..."
                    )
                trunk[f"slice{slice_no}.{index}.{kind}"] = state[key]
        try:
            import lpips
        except ImportError as err:
            raise XWAMError("LPIPS needs the lpips package: pip install 'xwam[eval]'") from err
        with warnings.catch_warnings():  # lpips passes torchvision's deprecated `pretrained=False`
            warnings.simplefilter("ignore")
            # pnet_rand: a randomly initialised trunk (no download), replaced by the local weights below.
            model = lpips.LPIPS(pretrained=True, net="alex", pnet_rand=True, verbose=False)
        try:
            model.net.load_state_dict(trunk)
        except RuntimeError as err:
            first = str(err).strip().splitlines()[-1].strip()
            raise XWAMError(f"LPIPS weights {path}: do not fit AlexNet ({first})") from err
        self.model = model.eval().to(device)
        self.device, self.path = device, path

    @torch.no_grad()
    def __call__(self, pred: ArrayLike, target: ArrayLike, data_range: float = 255.0) -> np.ndarray:
        """LPIPS per image of RGB images (..., H, W, 3) scaled by data_range; shape (...)."""
        p, t = _image_pair(pred, target, "lpips")
        if p.shape[-1] != 3:
            raise XWAMError(f"lpips: images have {p.shape[-1]} channels, expected RGB (3)")
        lead = p.shape[:-3]
        height, width = p.shape[-3:-1]
        if min(height, width) < 16:
            raise XWAMError(f"lpips: images are {height}x{width}, expected at least 16x16 for AlexNet")
        # (..., H, W, 3) in [0, data_range] -> (B, 3, H, W) in [-1, 1], LPIPS's input range.
        p = (p.reshape(-1, height, width, 3).permute(0, 3, 1, 2) / data_range * 2 - 1).float()
        t = (t.reshape(-1, height, width, 3).permute(0, 3, 1, 2) / data_range * 2 - 1).float()
        out = []
        for start in range(0, len(p), LPIPS_BATCH):
            chunk = slice(start, start + LPIPS_BATCH)
            out.append(self.model(p[chunk].to(self.device), t[chunk].to(self.device)).flatten().cpu())
        return torch.cat(out).to(torch.float64).reshape(lead).numpy()


# --- registry -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricSpec:
    """What `xwam evaluate` needs to know about a metric."""

    name: str
    fn: Callable[..., Any]  # the function; for lpips the LPIPSMetric class (build it with weights)
    kind: str  # "rgb", "depth", "points" or "action": what it compares
    higher_is_better: bool
    unit: str
    needs_weights: bool = False


METRICS: dict[str, MetricSpec] = {
    spec.name: spec
    for spec in (
        MetricSpec("psnr", psnr, "rgb", True, "dB"),
        MetricSpec("ssim", ssim, "rgb", True, ""),
        MetricSpec("lpips", LPIPSMetric, "rgb", False, "", needs_weights=True),
        MetricSpec("absrel", depth_abs_rel, "depth", False, ""),
        MetricSpec("delta1", depth_delta1, "depth", True, "fraction"),
        MetricSpec("chamfer", chamfer_distance, "points", False, "m"),
        MetricSpec("action_mse", action_mse, "action", False, "action units^2"),
        MetricSpec("action_l1", action_l1, "action", False, "action units"),
    )
}


def parse_metrics(text: str) -> list[MetricSpec]:
    """'psnr,chamfer' -> their specs, in the given order, duplicates dropped; unknown names refused."""
    names = [name.strip().lower() for name in text.split(",") if name.strip()]
    if not names:
        raise XWAMError(f"--metrics is empty; choose from {', '.join(METRICS)}")
    unknown = [name for name in names if name not in METRICS]
    if unknown:
        raise XWAMError(
            f"unknown metric{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"choose from {', '.join(METRICS)}"
        )
    return [METRICS[name] for name in dict.fromkeys(names)]

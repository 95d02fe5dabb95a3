"""Codecs between frames and the transformer's latents, and the depth <-> image mapping.

Both codecs share the Wan VAE's time layout: a clip of 1 + k*T frames (T = temporal factor) becomes
1 + k latent frames, the first frame alone. Frames are (B, 3, T, H, W) in [-1, 1]; latents are
(B, C, F, h, w). Depth goes through the same codec as an image: inverse depth scaled to [-1, 1] over
a recorded [near, far] range and repeated to 3 channels (docs/method.md section 3); or, for the authors'
release's relative 8-bit depth, the stored value scaled linearly (`DepthRange.encoding = "linear"`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from xwam_core.errors import XWAMError

WAN_VAE_HUB_ID = "Wan-AI/Wan2.2-TI2V-5B-Diffusers"
DEPTH_ENCODINGS = ("inverse", "linear")


# --------------------------------------------------------------------------------------------------
# Depth as an image
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DepthRange:
    """Metric depth range (metres) mapped onto [-1, 1] as inverse depth: near -> +1, far -> -1.

    `encoding = "linear"` maps depth itself linearly instead: near -> -1, far -> +1. With near 0.001 and
    far 0.256 it is exactly the authors' release's reading of its 8-bit depth videos (value / 127.5 - 1)
    for a store made by `xwam prepare xwam-release` (which keeps the value v as v + 1 mm).

    `near`/`far` are one number for every view, or one per view (tuples of equal length): a wrist camera
    that sees 2-30 cm and a fixed camera that sees 1-6 m cannot share one inverse-depth range without
    losing all precision on one of them. Per-view ranges need the view axis at dim -4 of depth
    (..., V, T, H, W) and at dim -5 of depth images (..., V, 3, T, H, W).
    """

    near: float | tuple[float, ...]
    far: float | tuple[float, ...]
    encoding: str = "inverse"

    def __post_init__(self) -> None:
        if self.encoding not in DEPTH_ENCODINGS:
            raise XWAMError(f"depth_encoding={self.encoding!r}: expected one of {', '.join(DEPTH_ENCODINGS)}")
        nears, fars = _as_tuple(self.near), _as_tuple(self.far)
        if (
            isinstance(self.near, tuple) != isinstance(self.far, tuple)
            or len(nears) != len(fars)
            or not nears
        ):
            raise XWAMError(
                f"depth range near={self.near}, far={self.far}: expected two numbers or two lists of one "
                "number per view, of the same length"
            )
        for n, f in zip(nears, fars, strict=True):
            if not (0 < n < f < float("inf")):
                raise XWAMError(f"depth range near={n}, far={f}: expected 0 < near < far (metres)")

    @classmethod
    def from_config(cls, near: Any, far: Any, encoding: str = "inverse") -> DepthRange:
        """From a model config's depth_near/depth_far (numbers, or lists (JSON) of one per view) and
        depth_encoding."""
        if isinstance(near, (list, tuple)) or isinstance(far, (list, tuple)):
            return cls(
                tuple(float(x) for x in _as_list(near)), tuple(float(x) for x in _as_list(far)), encoding
            )
        return cls(float(near), float(far), encoding)

    @property
    def per_view(self) -> bool:
        return isinstance(self.near, tuple)

    @property
    def max_far(self) -> float:
        return max(_as_tuple(self.far))

    def view(self, index: int) -> DepthRange:
        """The range of one view slot."""
        if not self.per_view:
            return self
        return DepthRange(_as_tuple(self.near)[index], _as_tuple(self.far)[index], self.encoding)

    def to_json(self) -> list[Any]:
        return [
            list(_as_tuple(self.near)) if self.per_view else self.near,
            list(_as_tuple(self.far)) if self.per_view else self.far,
        ]

    def bounds(self, like: torch.Tensor, view_dim: int) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """(near, far) as numbers, or per view as tensors that broadcast over `like` along `view_dim`."""
        if not self.per_view:
            return float(self.near), float(self.far)  # type: ignore[arg-type]
        views = like.shape[view_dim]
        nears, fars = _as_tuple(self.near), _as_tuple(self.far)
        if views != len(nears):
            raise XWAMError(f"depth range has {len(nears)} views, the depth has {views} (dim {view_dim})")
        shape = [1] * (like.ndim + view_dim) + [views] + [1] * (-view_dim - 1)
        return (
            torch.tensor(nears, dtype=torch.float32, device=like.device).view(shape),
            torch.tensor(fars, dtype=torch.float32, device=like.device).view(shape),
        )


def _as_tuple(x: float | tuple[float, ...]) -> tuple[float, ...]:
    return x if isinstance(x, tuple) else (x,)


def _as_list(x: Any) -> list[Any]:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def depth_to_image(depth: torch.Tensor, depth_range: DepthRange) -> torch.Tensor:
    """Metric depth (..., T, H, W) -> 3-channel image (..., 3, T, H, W) in [-1, 1].

    Depth is clamped to [near, far]; invalid depth (<= 0 or not finite, the store's 0) maps to far (-1;
    +1 with the linear encoding).
    A per-view range reads the view axis at dim -4: (..., V, T, H, W).
    """
    depth = depth.float()
    near, far = depth_range.bounds(depth, -4)
    valid = torch.isfinite(depth) & (depth > 0)
    depth = torch.where(valid, depth, far).clamp(near, far)  # type: ignore[arg-type]  # clamp takes numbers too
    if depth_range.encoding == "linear":
        image = (depth - near) / (far - near) * 2.0 - 1.0  # -1 at near, +1 at far
    else:
        inverse = (1.0 / depth - 1.0 / far) / (1.0 / near - 1.0 / far)  # 0 at far, 1 at near
        image = inverse * 2.0 - 1.0
    return image.unsqueeze(-4).expand(*image.shape[:-3], 3, *image.shape[-3:]).contiguous()


def image_to_depth(image: torch.Tensor, depth_range: DepthRange) -> torch.Tensor:
    """3-channel depth image (..., 3, T, H, W) in [-1, 1] -> metric depth (..., T, H, W) (channel mean).

    A per-view range reads the view axis at dim -5: (..., V, 3, T, H, W).
    """
    x = image.float().mean(dim=-4).clamp(-1.0, 1.0)
    near, far = depth_range.bounds(x, -4)
    if depth_range.encoding == "linear":
        return (x + 1.0) / 2.0 * (far - near) + near
    inverse = (x + 1.0) / 2.0 * (1.0 / near - 1.0 / far) + 1.0 / far
    return 1.0 / inverse


# --------------------------------------------------------------------------------------------------
# Codecs
# --------------------------------------------------------------------------------------------------


class Codec(nn.Module, ABC):
    """Frames (B, 3, T, H, W) in [-1, 1] <-> latents (B, C, F, h, w), with T = 1 + temporal_factor * (F - 1)."""

    latent_channels: int
    spatial_factor: int
    temporal_factor: int

    @abstractmethod
    def encode(self, frames: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, F, h, w) for a clip, or XWAMError naming what does not fit the codec's layout."""
        t, s = self.temporal_factor, self.spatial_factor
        if num_frames < 1 or (num_frames - 1) % t:
            raise XWAMError(f"{num_frames} frames: the codec needs 1 + {t}k frames (the first frame alone)")
        if height % s or width % s:
            raise XWAMError(f"frames {height}x{width}: the codec needs height and width divisible by {s}")
        return self.latent_channels, 1 + (num_frames - 1) // t, height // s, width // s

    def encode_views(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, V, 3, T, H, W) -> (B, V, C, F, h, w): every view encoded on its own."""
        return self.encode(frames.flatten(0, 1)).unflatten(0, frames.shape[:2])

    def decode_views(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, V, C, F, h, w) -> (B, V, 3, T, H, W)."""
        return self.decode(latents.flatten(0, 1)).unflatten(0, latents.shape[:2])

    def _check_frames(self, frames: torch.Tensor) -> None:
        if frames.ndim != 5 or frames.shape[1] != 3:
            raise XWAMError(f"frames must be (B, 3, T, H, W) in [-1, 1], got shape {tuple(frames.shape)}")
        self.latent_shape(*frames.shape[2:])


class PixelCodec(Codec):
    """Exact, parameter-free space-to-depth codec for tiny CPU recipes.

    Each latent frame stacks `temporal_factor` frames of `spatial_factor`^2 pixel blocks into channels:
    C = 3 * temporal_factor * spatial_factor^2. Latent frame 0 holds the first frame repeated
    (as the Wan VAE's causal padding does); decoding reads its first copy, so decode(encode(x)) == x.
    """

    def __init__(self, spatial_factor: int = 8, temporal_factor: int = 4) -> None:
        super().__init__()
        if spatial_factor < 1 or temporal_factor < 1:
            raise XWAMError(f"PixelCodec factors must be >= 1, got {spatial_factor} and {temporal_factor}")
        self.spatial_factor = spatial_factor
        self.temporal_factor = temporal_factor
        self.latent_channels = 3 * temporal_factor * spatial_factor**2

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        self._check_frames(frames)
        b, c, _, height, width = frames.shape
        t, s = self.temporal_factor, self.spatial_factor
        first = frames[:, :, :1].expand(-1, -1, t, -1, -1)  # (B, 3, t, H, W)
        x = torch.cat([first, frames[:, :, 1:]], dim=2)  # (B, 3, F*t, H, W)
        f = x.shape[2] // t
        x = x.reshape(b, c, f, t, height // s, s, width // s, s)
        x = x.permute(0, 1, 3, 5, 7, 2, 4, 6)  # (B, 3, t, s, s, F, h, w)
        return x.reshape(b, self.latent_channels, f, height // s, width // s)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if latents.ndim != 5 or latents.shape[1] != self.latent_channels:
            raise XWAMError(
                f"latents must be (B, {self.latent_channels}, F, h, w), got {tuple(latents.shape)}"
            )
        b, _, f, h, w = latents.shape
        t, s = self.temporal_factor, self.spatial_factor
        x = latents.reshape(b, 3, t, s, s, f, h, w).permute(
            0, 1, 5, 2, 6, 3, 7, 4
        )  # (B, 3, F, t, h, s, w, s)
        x = x.reshape(b, 3, f, t, h * s, w * s)
        return torch.cat([x[:, :, :1, 0], x[:, :, 1:].flatten(2, 3)], dim=2)  # (B, 3, 1 + (F-1)t, H, W)


class WanVAECodec(Codec):
    """The frozen Wan VAE (diffusers AutoencoderKLWan) with its per-channel latent normalisation.

    encode: posterior mode, then (z - latents_mean) / latents_std, as the Wan pipelines do.
    """

    latents_mean: torch.Tensor
    latents_std: torch.Tensor

    def __init__(self, vae: Any) -> None:  # diffusers AutoencoderKLWan
        super().__init__()
        self.vae: Any = vae.eval().requires_grad_(False)
        cfg = vae.config
        self.latent_channels = int(cfg.z_dim)
        self.spatial_factor = int(cfg.scale_factor_spatial)
        self.temporal_factor = int(cfg.scale_factor_temporal)
        shape = (1, self.latent_channels, 1, 1, 1)
        self.register_buffer("latents_mean", torch.tensor(cfg.latents_mean).view(shape), persistent=False)
        self.register_buffer("latents_std", torch.tensor(cfg.latents_std).view(shape), persistent=False)

    @classmethod
    def from_pretrained(
        cls, path_or_hub_id: str | Path = WAN_VAE_HUB_ID, torch_dtype: torch.dtype | None = None
    ):
        """Load from a pipeline folder with `vae/`, the VAE folder itself, or a hub id (subfolder `vae`)."""
        from diffusers import AutoencoderKLWan

        path = Path(str(path_or_hub_id)).expanduser()
        if path.is_dir():
            subfolder = "vae" if (path / "vae" / "config.json").is_file() else None
            if subfolder is None and not (path / "config.json").is_file():
                raise XWAMError(f"{path}: no config.json here or in vae/; expected a diffusers Wan VAE")
        else:
            subfolder = "vae"
        try:
            vae = AutoencoderKLWan.from_pretrained(
                str(path_or_hub_id), subfolder=subfolder, torch_dtype=torch_dtype
            )
        except (OSError, ValueError) as err:
            raise XWAMError(
                f"cannot load a Wan VAE from '{path_or_hub_id}': {str(err).strip().splitlines()[0]}"
            ) from err
        return cls(vae)

    def train(self, mode: bool = True) -> WanVAECodec:
        super().train(mode)
        self.vae.eval()  # always frozen
        return self

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        self._check_frames(frames)
        dtype = self.vae.dtype
        z = self.vae.encode(frames.to(dtype)).latent_dist.mode()
        return (z - self.latents_mean.to(z)) / self.latents_std.to(z)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.to(self.vae.dtype) * self.latents_std.to(self.vae.dtype) + self.latents_mean.to(
            self.vae.dtype
        )
        return self.vae.decode(z).sample.clamp(-1.0, 1.0)


# A checkpoint records its codec as a small JSON description, not weights: the pixel codec has none and
# the Wan VAE is frozen, loaded from its own folder or hub id.
def describe_codec(preset: str, vae: str = "") -> dict[str, Any]:
    """The codec a model preset pairs with, as JSON (see `codec_from_description`)."""
    if preset == "tiny":
        return {"kind": "pixel", "spatial_factor": 8, "temporal_factor": 4}
    if preset == "base":
        return {"kind": "wan-vae", "source": vae or WAN_VAE_HUB_ID}
    raise XWAMError(f"unknown model preset '{preset}', expected 'tiny' or 'base'")


def codec_from_description(description: dict[str, Any], vae: str | Path | None = None) -> Codec:
    """Build a frozen codec from its description; `vae` overrides where the Wan VAE is read from."""
    kind = description.get("kind")
    if kind == "pixel":
        factors: list[Any] = [description.get(key) for key in ("spatial_factor", "temporal_factor")]
        for key, factor in zip(("spatial_factor", "temporal_factor"), factors, strict=True):
            if isinstance(factor, bool) or not isinstance(factor, int):
                raise XWAMError(f"codec {description}: '{key}' is {factor!r}, expected an integer")
        codec: Codec = PixelCodec(factors[0], factors[1])
    elif kind == "wan-vae":
        source = vae or description.get("source")
        if not isinstance(source, (str, Path)) or not str(source):
            raise XWAMError(
                f"codec {description}: 'source' is {source!r}, expected the Wan VAE's folder or hub id"
            )
        codec = WanVAECodec.from_pretrained(source)
    else:
        raise XWAMError(f"codec {description}: unknown kind {kind!r} (expected 'pixel' or 'wan-vae')")
    codec.requires_grad_(False)
    return codec.eval()


# The Wan2.2 VAE's geometry (Wan-AI/Wan2.2-TI2V-5B-Diffusers, vae/config.json), so it can be sized without
# its weights; its latent statistics are not needed for that.
WAN22_VAE_GEOMETRY: dict[str, Any] = {
    "base_dim": 160,
    "decoder_base_dim": 256,
    "z_dim": 48,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
    "is_residual": True,
    "in_channels": 12,
    "out_channels": 12,
    "patch_size": 2,
    "scale_factor_temporal": 4,
    "scale_factor_spatial": 16,
}


def empty_codec(preset: str, vae: str = "") -> Codec:
    """The preset's codec with the right geometry and no weights read (build it under accelerate's
    `init_empty_weights` to allocate none): the Wan2.2 VAE's from `vae`'s config.json when that is a
    local folder, else `WAN22_VAE_GEOMETRY`. For sizing (xwam_core.plan), never for encoding."""
    import inspect
    import json

    description = describe_codec(preset, vae)
    if description["kind"] != "wan-vae":
        return codec_from_description(description)
    from diffusers import AutoencoderKLWan

    config = dict(WAN22_VAE_GEOMETRY)
    folder = Path(vae).expanduser() if vae else None
    if folder is not None and folder.is_dir():
        for candidate in (folder / "vae" / "config.json", folder / "config.json"):
            if candidate.is_file():
                config = json.loads(candidate.read_text(encoding="utf-8"))
                break
    accepted = set(inspect.signature(AutoencoderKLWan.__init__).parameters) - {"self"}
    config = {k: v for k, v in config.items() if k in accepted}
    z_dim = int(config["z_dim"])
    config.setdefault("latents_mean", [0.0] * z_dim)
    config.setdefault("latents_std", [1.0] * z_dim)
    return WanVAECodec(AutoencoderKLWan(**config))

"""Model presets: a name plus overrides -> an XWAMTransformer config (and the codec it pairs with).

| preset | blocks | width | heads x dim | FFN   | M  | latent C | text dim | codec                 |
|--------|--------|-------|-------------|-------|----|----------|----------|-----------------------|
| tiny   | 4      | 128   | 4 x 32      | 256   | 2  | 768      | 64       | PixelCodec(8, 4)      |
| base   | 30     | 3072  | 24 x 128    | 14336 | 10 | 48       | 4096     | WanVAECodec (Wan2.2)  |

Both take XWAMTransformer's defaults for the maths the authors' release fixes (`action_state_readout`,
`depth_main_kv_grad`, `new_parameter_init`): the release's. An override names the older alternative.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from xwam_core.errors import XWAMError
from xwam_core.models.codecs import Codec, codec_from_description, describe_codec

_LAYOUT = {"num_views": 3, "action_dim": 14, "state_dim": 16, "num_actions": 32, "num_states": 9}

PRESETS: dict[str, dict[str, Any]] = {
    # 3 views x 9 frames of 64x64 -> PixelCodec(8, 4) -> 3 latent frames of 8x8x768 -> 4x4 tokens per view.
    "tiny": {
        "patch_size": (1, 2, 2),
        "num_attention_heads": 4,
        "attention_head_dim": 32,
        "in_channels": 768,
        "out_channels": 768,
        "text_dim": 64,
        "freq_dim": 64,
        "ffn_dim": 256,
        "num_layers": 4,
        "num_depth_blocks": 2,
        # a token holds 4 x 768 pixel values but the model is 128 wide: predict the clean sample, gated
        # against the current frame, derive the velocity (see XWAMTransformer.video_prediction); and hand
        # every future token its current-frame token (a from-scratch model finds it by attention too slowly)
        "video_prediction": "gated",
        "condition_broadcast": True,
        **_LAYOUT,
    },
    # Wan2.2-TI2V-5B geometry (docs/method.md section 1) plus the depth copy of its last 10 blocks.
    "base": {
        "patch_size": (1, 2, 2),
        "num_attention_heads": 24,
        "attention_head_dim": 128,
        "in_channels": 48,
        "out_channels": 48,
        "text_dim": 4096,
        "freq_dim": 256,
        "ffn_dim": 14336,
        "num_layers": 30,
        "num_depth_blocks": 10,
        **_LAYOUT,
    },
}


def preset_config(name: str, **overrides: Any) -> dict[str, Any]:
    """The preset's XWAMTransformer arguments with overrides applied; unknown names/keys raise XWAMError."""
    from xwam_core.models.transformer import XWAMTransformer

    if name not in PRESETS:
        raise XWAMError(f"unknown model preset '{name}', expected one of {sorted(PRESETS)}")
    allowed = set(XWAMTransformer._get_init_keys(XWAMTransformer)) - {"self"}
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise XWAMError(f"unknown model setting(s) {unknown} for preset '{name}'")
    return {**PRESETS[name], **overrides}


def build_model(name: str, **overrides: Any):
    """A freshly initialised XWAMTransformer from a preset (build under `torch.device('meta')` to only count)."""
    from xwam_core.models.transformer import XWAMTransformer

    return XWAMTransformer(**preset_config(name, **overrides))


def preset_codec(name: str, vae_path_or_hub_id: str | Path | None = None) -> Codec:
    """The codec a preset's latents come from: PixelCodec for tiny, the Wan2.2 VAE for base."""
    if name not in PRESETS:
        raise XWAMError(f"unknown model preset '{name}', expected one of {sorted(PRESETS)}")
    return codec_from_description(describe_codec(name, str(vae_path_or_hub_id or "")))

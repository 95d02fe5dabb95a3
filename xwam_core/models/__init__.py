"""The X-WAM model: transformer (Wan2.2 trunk + views, actions/states, depth branch), its plug-in heads and
conditioners, codecs, text, presets.

Names resolve lazily, so `from xwam_core.models.codecs import PixelCodec` does not pay for importing
diffusers' transformer stack (several seconds on a small CPU).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Codec": "codecs",
    "DepthRange": "codecs",
    "PixelCodec": "codecs",
    "WanVAECodec": "codecs",
    "depth_to_image": "codecs",
    "image_to_depth": "codecs",
    "CurrentFrameBroadcast": "heads",
    "GatedSampleHead": "heads",
    "ObservedDepthConditioner": "heads",
    "ResidualSampleHead": "heads",
    "SampleHead": "heads",
    "VelocityHead": "heads",
    "VideoHead": "heads",
    "PRESETS": "presets",
    "build_model": "presets",
    "preset_codec": "presets",
    "preset_config": "presets",
    "PrecomputedText": "text",
    "TaskEmbeddingText": "text",
    "TextConditioner": "text",
    "encode_prompts_umt5": "text",
    "WAN_HUB_ID": "transformer",
    "WanInitReport": "transformer",
    "XWAMOutput": "transformer",
    "XWAMStepCache": "transformer",
    "XWAMTransformer": "transformer",
    "upgrade_legacy_state_dict": "transformer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return __all__

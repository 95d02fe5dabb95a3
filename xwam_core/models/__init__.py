"""The X-WAM model: transformer (Wan2.2 trunk + views, actions/states, depth branch), codecs, text, presets."""

from xwam_core.models.codecs import (
    Codec,
    DepthRange,
    PixelCodec,
    WanVAECodec,
    depth_to_image,
    image_to_depth,
)
from xwam_core.models.presets import PRESETS, build_model, preset_codec, preset_config
from xwam_core.models.text import (
    PrecomputedText,
    TaskEmbeddingText,
    TextConditioner,
    encode_prompts_umt5,
)
from xwam_core.models.transformer import (
    WanInitReport,
    XWAMOutput,
    XWAMStepCache,
    XWAMTransformer,
)

__all__ = [
    "PRESETS",
    "Codec",
    "DepthRange",
    "PixelCodec",
    "PrecomputedText",
    "TaskEmbeddingText",
    "TextConditioner",
    "WanInitReport",
    "WanVAECodec",
    "XWAMOutput",
    "XWAMStepCache",
    "XWAMTransformer",
    "build_model",
    "depth_to_image",
    "encode_prompts_umt5",
    "image_to_depth",
    "preset_codec",
    "preset_config",
]

"""The X-WAM transformer: a Wan2.2 video DiT that also denoises actions and states and regresses depth.

One token sequence (docs/method.md section 2), per sample:

    [ video tokens, frame-major (latent frame, view, h, w) | K action tokens | S state tokens ]

The trunk is a diffusers `WanTransformer3DModel` held as `self.wan`; its patch embedding, RoPE,
condition embedder, blocks and output head are used as they are. X-WAM adds a view embedding,
action/state MLP encoders and decoders, per-token timesteps (the clean current frame and current
state at t = 0) and a depth branch: copies of the last M blocks whose queries attend to their own
keys/values and to the main branch's keys/values of the same layer, never the other way round.

The defaults are the maths of the authors' release (github sharinka0715/X-WAM, checked by running both
with the same weights); each has a named alternative, xwam's behaviour before it followed the release:
- `action_state_readout="last_hidden"`: only the video tokens go through Wan's final norm and the
  timestep shift/scale before the video head; actions and states are decoded from the last block's raw
  hidden state. "final_norm": every token goes through the final norm first.
- `depth_main_kv_grad=True`: the main branch's keys/values the depth queries attend to are not detached,
  so the depth loss also trains the last M main blocks (through those keys/values only; the main
  outputs are the same with the depth branch on or off). False: detached.
- `new_parameter_init="release"`: view embedding, action/state MLP weights and the depth head's weight
  from N(0, 0.02), their biases 0. "pytorch": zero view embedding and nn.Linear's default init.
A config.json without these keys was written before they existed and loads with the alternatives
(`XWAMTransformer.from_config`), so older checkpoints compute what they computed before.
What the paper's model does without (x-prediction video heads, conditioners for small models trained
from scratch) plugs in from `xwam_core.models.heads`.
"""

from __future__ import annotations

import copy
import functools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeVar, cast

import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import get_1d_rotary_pos_embed
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.transformers.transformer_wan import (
    WanAttention,
    WanTransformer3DModel,
)
from diffusers.utils import BaseOutput

from xwam_core.errors import XWAMError
from xwam_core.models.codecs import DepthRange
from xwam_core.models.heads import (
    CurrentFrameBroadcast,
    CurrentStateBroadcast,
    CurrentStateModulation,
    ObservedDepthConditioner,
    VideoHead,
    build_video_head,
)

WAN_HUB_ID = "Wan-AI/Wan2.2-TI2V-5B-Diffusers"

# WanRotaryPosEmbed's theta; WanTransformer3DModel never overrides it. Fractional RoPE positions
# (actions, states) use the same frequencies; a test checks they reproduce Wan's integer table.
_ROPE_THETA = 10000.0

# The WanTransformer3DModel arguments X-WAM carries in its own config (the I2V image branch is not supported).
WAN_CONFIG_KEYS = (
    "patch_size",
    "num_attention_heads",
    "attention_head_dim",
    "in_channels",
    "out_channels",
    "text_dim",
    "freq_dim",
    "ffn_dim",
    "num_layers",
    "cross_attn_norm",
    "qk_norm",
    "eps",
    "rope_max_seq_len",
)

# The release's maths (defaults) and the values a config.json written before these keys existed means.
ACTION_STATE_READOUTS = ("last_hidden", "final_norm")
NEW_PARAMETER_INITS = ("release", "pytorch")
_LEGACY_CONFIG: dict[str, Any] = {
    "action_state_readout": "final_norm",
    "depth_main_kv_grad": False,
    "new_parameter_init": "pytorch",
}
_RELEASE_INIT_STD = 0.02

# Timestep classes of the per-token timestep: the clean context, the video stream, the action stream.
_T_CLEAN, _T_VIDEO, _T_ACTION = 0, 1, 2

# Parameter-name prefixes of checkpoints written before the plug-ins were modules -> their names now.
_LEGACY_PREFIXES = {
    "gate_proj.": "video_head.gate.",
    "depth_condition_embedding.": "depth_conditioner.embedding.",
    "depth_gate_proj.": "depth_conditioner.gate.",
    "condition_proj.": "frame_broadcast.proj.",
}
_Value = TypeVar("_Value")


# --------------------------------------------------------------------------------------------------
# Attention: one processor for every attention module of the trunk and of the depth branch
# --------------------------------------------------------------------------------------------------


class CrossKV(NamedTuple):
    """A block's precomputed text keys/values, (B, L, heads, head_dim) each, passed where Wan passes text."""

    key: torch.Tensor
    value: torch.Tensor


class KVSink:
    """Receives one main-branch layer's self-attention (key, value) for the depth branch.

    `detach`: hand them over detached (the depth loss then stops at the main branch's keys/values);
    the release does not detach them.
    """

    def __init__(self, detach: bool = False) -> None:
        self.detach = detach
        self.kv: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass
class SelfAttnInputs:
    """What a block's self-attention needs, passed in the slot where Wan passes `rotary_emb`.

    The block hands `rotary_emb` to `attn1` untouched, so this carries the RoPE tables plus the depth
    branch's plumbing without forking `WanTransformerBlock.forward`.
    """

    freqs_cos: torch.Tensor  # (1, N, 1, head_dim)
    freqs_sin: torch.Tensor  # (1, N, 1, head_dim)
    kv_sink: KVSink | None = None  # main branch, last M layers: keep (key, value) for the depth branch
    kv_extra: tuple[torch.Tensor, torch.Tensor] | None = None  # depth branch: the main branch's (key, value)


def _apply_rotary_emb(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved rotary embedding (the same arithmetic as WanAttnProcessor)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def text_kv(attn: WanAttention, text_hidden: torch.Tensor) -> CrossKV:
    """A cross-attention module's keys/values for projected text (B, L, D) -> CrossKV of (B, L, H, d)."""
    if getattr(attn, "fused_projections", False):
        key, value = attn.to_kv(text_hidden).chunk(2, dim=-1)
    else:
        key, value = attn.to_k(text_hidden), attn.to_v(text_hidden)
    key = attn.norm_k(key)
    return CrossKV(key.unflatten(2, (attn.heads, -1)), value.unflatten(2, (attn.heads, -1)))


class XWAMAttnProcessor:
    """WanAttnProcessor's arithmetic plus three optional extras, all off for plain Wan inputs.

    - self-attention given `SelfAttnInputs`: store (key, value) in a sink, or attend to extra keys/values
      (the depth branch's unilateral attention);
    - cross-attention given `CrossKV` instead of text: use the cached keys/values.
    With plain tensors it computes exactly what WanAttnProcessor computes (no I2V image branch).
    """

    _attention_backend = None
    _parallel_config = None

    def __call__(
        self,
        attn: WanAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | CrossKV | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | SelfAttnInputs | None = None,
    ) -> torch.Tensor:
        is_self = encoder_hidden_states is None
        kv_sink = kv_extra = None
        if is_self:
            if getattr(attn, "fused_projections", False):
                query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
            else:
                query, key, value = (
                    attn.to_q(hidden_states),
                    attn.to_k(hidden_states),
                    attn.to_v(hidden_states),
                )
            query = attn.norm_q(query).unflatten(2, (attn.heads, -1))  # (B, N, H, d)
            key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
            value = value.unflatten(2, (attn.heads, -1))
            if isinstance(rotary_emb, SelfAttnInputs):
                kv_sink, kv_extra = rotary_emb.kv_sink, rotary_emb.kv_extra
                rotary_emb = (rotary_emb.freqs_cos, rotary_emb.freqs_sin)
            if rotary_emb is not None:
                query = _apply_rotary_emb(query, *rotary_emb)
                key = _apply_rotary_emb(key, *rotary_emb)
            if kv_sink is not None:  # the forward values are the same either way; only gradients differ
                kv_sink.kv = (key.detach(), value.detach()) if kv_sink.detach else (key, value)
            if kv_extra is not None:
                key = torch.cat([key, kv_extra[0]], dim=1)  # (B, N_depth + N_main, H, d)
                value = torch.cat([value, kv_extra[1]], dim=1)
        else:
            query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
            if isinstance(encoder_hidden_states, CrossKV):
                key, value = encoder_hidden_states
            else:
                key, value = text_kv(attn, cast(torch.Tensor, encoder_hidden_states))
            if key.shape[0] != query.shape[0]:  # one prompt for the whole batch
                key = key.expand(query.shape[0], -1, -1, -1)
                value = value.expand(query.shape[0], -1, -1, -1)

        hidden_states = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=attention_mask,
            dropout_p=0.0,
            is_causal=False,
            backend=self._attention_backend,
            parallel_config=self._parallel_config if (is_self and kv_extra is None) else None,
        )
        hidden_states = hidden_states.flatten(2, 3).type_as(query)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states


# --------------------------------------------------------------------------------------------------
# Outputs, step cache, load report
# --------------------------------------------------------------------------------------------------


@dataclass
class XWAMOutput(BaseOutput):
    """Predicted flow velocities (same shapes as the inputs) and the predicted clean depth latent.

    Entries for the clean context (latent frame 0, state 0) are returned but carry no loss.
    """

    video: torch.Tensor  # (B, V, C, F, h, w)
    actions: torch.Tensor | None = None  # (B, K, action_dim)
    states: torch.Tensor | None = None  # (B, S, state_dim)
    depth: torch.Tensor | None = None  # (B, V, C, F, h, w) clean depth latent, None with run_depth=False


@dataclass
class XWAMStepCache:
    """Everything a denoising step recomputes for nothing: RoPE tables, projected text, text K/V per block.

    Built once per sample by `XWAMTransformer.build_step_cache` (inference); valid for one token layout.
    """

    layout: tuple[int, ...]  # (V, C, F, h, w, K, S)
    freqs_cos: torch.Tensor  # (1, N, 1, head_dim)
    freqs_sin: torch.Tensor  # (1, N, 1, head_dim)
    timestep_class: torch.Tensor  # (N,) long: 0 clean context, 1 t_video, 2 t_action
    text_hidden: torch.Tensor  # (B, L, D) text after Wan's text projection
    cross_kv: list[CrossKV]  # one per trunk block
    depth_cross_kv: list[CrossKV]  # one per depth block


@dataclass
class WanInitReport:
    """What `from_wan_pretrained` did: which weights came from the checkpoint and which are new."""

    source: str
    loaded_parameters: int  # trunk parameters read from the checkpoint
    copied_blocks: dict[str, str] = field(default_factory=dict)  # depth block -> trunk block it copies
    copied_parameters: int = 0
    new_parameters: dict[str, int] = field(default_factory=dict)  # name -> numel, freshly initialised

    @property
    def num_new_parameters(self) -> int:
        return sum(self.new_parameters.values())

    def summary(self) -> str:
        lines = [
            f"trunk: {self.loaded_parameters:,} parameters loaded from {self.source}",
            f"depth branch: {self.copied_parameters:,} parameters copied from "
            + ", ".join(f"{src} -> {dst}" for dst, src in self.copied_blocks.items()),
            f"new: {self.num_new_parameters:,} parameters in {len(self.new_parameters)} tensors",
        ]
        lines += [f"  {name}: {numel:,}" for name, numel in self.new_parameters.items()]
        return "\n".join(lines)


@dataclass(frozen=True)
class _Layout:
    """Shapes of one forward call's inputs and the token grid they make."""

    batch: int
    views: int
    channels: int
    frames: int
    height: int
    width: int
    num_actions: int
    num_states: int
    patch: tuple[int, int, int]

    @property
    def grid(self) -> tuple[int, int, int]:  # tokens per view: (latent frames, h, w) after patching
        return self.frames // self.patch[0], self.height // self.patch[1], self.width // self.patch[2]

    @property
    def num_video_tokens(self) -> int:
        f, h, w = self.grid
        return f * self.views * h * w

    @property
    def key(self) -> tuple[int, ...]:
        return (
            self.views,
            self.channels,
            self.frames,
            self.height,
            self.width,
            self.num_actions,
            self.num_states,
        )


def _init_linear(layer: nn.Linear, release: bool) -> None:
    """The release's N(0, 0.02) weight and zero bias, or nn.Linear's own default init."""
    if release:
        layer.weight.normal_(std=_RELEASE_INIT_STD)
        if layer.bias is not None:
            layer.bias.zero_()
    else:
        layer.reset_parameters()


def _mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """The action/state encoder and decoder shape: Linear, GELU-tanh, Linear."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim), nn.GELU(approximate="tanh"), nn.Linear(hidden_dim, out_dim)
    )


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


# The action/state streams' modules (XWAMTransformer attribute names; a plug-in that is off is None): new in
# X-WAM (Wan has no actions); `train.action_lr_scale` multiplies their learning rate (xwam_core.train).
ACTION_MODULES = (
    "action_encoder",
    "action_decoder",
    "state_encoder",
    "state_decoder",
    "state_broadcaster",
    "state_modulator",
)


class XWAMTransformer(ModelMixin, ConfigMixin):  # type: ignore[misc]
    r"""Wan2.2 DiT over [multi-view video | actions | states] with per-token timesteps and a depth branch.

    The first block of arguments is `WanTransformer3DModel`'s (defaults: Wan2.2-TI2V-5B); the rest is X-WAM's:
    `num_views` view-embedding slots, the action/state layout, `num_depth_blocks` (M, the depth branch copies
    the last M blocks) and the depth range the depth latents were encoded with. The last four choose the
    plug-ins of `xwam_core.models.heads`; their defaults are the paper's model:
    `video_prediction` names the video head (`VIDEO_HEADS`): "velocity" (Wan's own output, the paper's),
    "sample", "residual" or "gated" (x-prediction heads, each declaring the loss form training uses).
    `condition_broadcast` adds a `CurrentFrameBroadcast`, `state_broadcast` a `CurrentStateBroadcast` (the
    current state's token added to every action and future-state token), `state_modulation` a
    `CurrentStateModulation` (the current state embedded into the action stream's timestep embedding, so
    it sets every block's AdaLN for the action and future-state tokens), `video_state_modulation` another
    `CurrentStateModulation` for the future video tokens' timestep embedding (their AdaLN, the final norm's
    and the depth branch's); `depth_condition` an `ObservedDepthConditioner`
    (RGB-D input to the depth branch, whose head is gated against the observed depth). `gate_init_logit` is
    where both gated heads start (sigmoid(-4) ~ 0.018 of the head, the rest the current frame / observed depth).

    The last three choose between the release's maths (the defaults) and xwam's earlier behaviour:
    `action_state_readout` ("last_hidden": actions and states decoded from the last block's raw hidden state,
    only video tokens through the final norm; "final_norm": every token through it), `depth_main_kv_grad`
    (True: the depth loss reaches the main branch's last M blocks through the keys/values the depth queries
    attend to; False: those are detached) and `new_parameter_init` ("release": N(0, 0.02) weights and zero
    biases for the view embedding, the action/state MLPs and the depth head; "pytorch": zero view embedding
    and nn.Linear's default). A config without them (an older checkpoint) means "final_norm", False and
    "pytorch": see `from_config`. `depth_encoding` says how depth became the depth image the latents encode:
    "inverse" (inverse depth over [depth_near, depth_far], the default) or "linear" (depth itself; the
    release's relative 8-bit depth with depth_near 0.001, depth_far 0.256: `DepthRange`).
    """

    _supports_gradient_checkpointing = True
    # diffusers reads these class attributes (FSDP wrap units, fp32 islands); typed None on ModelMixin.
    _no_split_modules = ["WanTransformerBlock"]  # type: ignore[assignment]  # noqa: RUF012
    _repeated_blocks = ["WanTransformerBlock"]  # type: ignore[assignment]  # noqa: RUF012
    _keep_in_fp32_modules = ["rope", "time_embedder", "scale_shift_table", "norm1", "norm2", "norm3"]  # type: ignore[assignment]  # noqa: RUF012
    _skip_layerwise_casting_patterns = ["patch_embedding", "condition_embedder", "norm"]  # type: ignore[assignment]  # noqa: RUF012

    @register_to_config
    def __init__(
        self,
        patch_size: tuple[int, ...] = (1, 2, 2),
        num_attention_heads: int = 24,
        attention_head_dim: int = 128,
        in_channels: int = 48,
        out_channels: int = 48,
        text_dim: int = 4096,
        freq_dim: int = 256,
        ffn_dim: int = 14336,
        num_layers: int = 30,
        cross_attn_norm: bool = True,
        qk_norm: str | None = "rms_norm_across_heads",
        eps: float = 1e-6,
        rope_max_seq_len: int = 1024,
        num_views: int = 3,
        action_dim: int = 14,
        state_dim: int = 16,
        num_actions: int = 32,
        num_states: int = 9,
        num_depth_blocks: int = 10,
        depth_near: float | list[float] = 0.1,
        depth_far: float | list[float] = 10.0,
        video_prediction: str = "velocity",
        condition_broadcast: bool = False,
        depth_condition: bool = False,
        gate_init_logit: float = -4.0,
        action_state_readout: str = "last_hidden",
        depth_main_kv_grad: bool = True,
        new_parameter_init: str = "release",
        depth_encoding: str = "inverse",
        state_broadcast: bool = False,
        state_modulation: bool = False,
        video_state_modulation: bool = False,
    ) -> None:
        super().__init__()
        if action_state_readout not in ACTION_STATE_READOUTS:
            raise XWAMError(
                f"action_state_readout={action_state_readout!r}: expected 'last_hidden' (the release) or 'final_norm'"
            )
        if not isinstance(depth_main_kv_grad, bool):
            raise XWAMError(
                f"depth_main_kv_grad={depth_main_kv_grad!r}: expected true (the release) or false"
            )
        if new_parameter_init not in NEW_PARAMETER_INITS:
            raise XWAMError(
                f"new_parameter_init={new_parameter_init!r}: expected 'release' (the release) or 'pytorch'"
            )
        sizes = {
            "num_attention_heads": num_attention_heads,
            "attention_head_dim": attention_head_dim,
            "in_channels": in_channels,
            "text_dim": text_dim,
            "freq_dim": freq_dim,
            "ffn_dim": ffn_dim,
            "num_layers": num_layers,
            "num_actions": num_actions,
            "num_states": num_states,
        }
        small = {k: v for k, v in sizes.items() if not (isinstance(v, int) and v >= 1)}
        if small:
            name, value = next(iter(small.items()))
            raise XWAMError(f"{name}={value!r}: expected an integer >= 1")
        if not 0 <= num_depth_blocks <= num_layers:
            raise XWAMError(f"num_depth_blocks={num_depth_blocks}: expected 0..num_layers ({num_layers})")
        if num_views < 1 or action_dim < 1 or state_dim < 1:
            raise XWAMError(
                f"num_views/action_dim/state_dim must be >= 1, got {num_views}/{action_dim}/{state_dim}"
            )
        if out_channels != in_channels:
            raise XWAMError(
                f"out_channels={out_channels} must equal in_channels={in_channels} (velocity = latent)"
            )
        depth_range = DepthRange.from_config(depth_near, depth_far, depth_encoding)  # validates the range
        if depth_range.per_view and len(depth_range.near) != num_views:  # type: ignore[arg-type]
            raise XWAMError(
                f"depth_near/depth_far list one range per view: expected {num_views}, got {depth_near}"
            )

        self.wan = WanTransformer3DModel(
            patch_size=tuple(patch_size),
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            in_channels=in_channels,
            out_channels=out_channels,
            text_dim=text_dim,
            freq_dim=freq_dim,
            ffn_dim=ffn_dim,
            num_layers=num_layers,
            cross_attn_norm=cross_attn_norm,
            qk_norm=qk_norm,
            eps=eps,
            rope_max_seq_len=rope_max_seq_len,
        )
        inner_dim = num_attention_heads * attention_head_dim
        self.view_embedding = nn.Parameter(torch.zeros(num_views, inner_dim))  # (V_max, D)
        self.action_encoder = _mlp(action_dim, inner_dim, inner_dim)
        self.action_decoder = _mlp(inner_dim, inner_dim, action_dim)
        self.state_encoder = _mlp(state_dim, inner_dim, inner_dim)
        self.state_decoder = _mlp(inner_dim, inner_dim, state_dim)
        first = num_layers - num_depth_blocks
        self.depth_blocks = nn.ModuleList(copy.deepcopy(self.wan.blocks[i]) for i in range(first, num_layers))
        self.depth_scale_shift_table = nn.Parameter(torch.randn(1, 2, inner_dim) / inner_dim**0.5)
        self.depth_proj_out = nn.Linear(inner_dim, out_channels * math.prod(patch_size))

        # Plug-ins (xwam_core.models.heads). Their creation order fixes what a seed draws and the parameter
        # order (optimizer and EMA state are indexed by it): keep it. Older checkpoints' names for their
        # parameters: upgrade_legacy_state_dict.
        values_per_token = out_channels * math.prod(patch_size)
        self.video_head: VideoHead = build_video_head(
            video_prediction, inner_dim, values_per_token, gate_init_logit
        )
        patch = (int(patch_size[0]), int(patch_size[1]), int(patch_size[2]))
        self.depth_conditioner = (
            ObservedDepthConditioner(in_channels, inner_dim, patch, gate_init_logit)
            if depth_condition
            else None
        )
        self.frame_broadcast = CurrentFrameBroadcast(inner_dim) if condition_broadcast else None
        self.state_broadcaster = CurrentStateBroadcast(inner_dim) if state_broadcast else None
        self.state_modulator = CurrentStateModulation(state_dim, inner_dim) if state_modulation else None
        self.video_state_modulator = (
            CurrentStateModulation(state_dim, inner_dim) if video_state_modulation else None
        )
        self.gradient_checkpointing = False
        self._init_new_parameters()  # the depth blocks are deep copies of the last M blocks
        self.video_head.prepare_output_layer(self.wan.proj_out)
        self._install_processors()

    # ---- construction helpers ------------------------------------------------------------------

    def _new_parameter_names(self) -> list[str]:
        """Parameters that are neither Wan's nor copies of Wan's blocks."""
        return [n for n, _ in self.named_parameters() if not n.startswith(("wan.", "depth_blocks."))]

    @torch.no_grad()
    def _init_new_parameters(self) -> None:
        """Explicit init of the X-WAM additions, as `new_parameter_init` says; Wan-style depth head table.

        "release": view embedding, action/state MLP weights and depth head weight N(0, 0.02), biases 0;
        "pytorch": zero view embedding, nn.Linear's default init (kaiming-uniform weights and biases).
        """
        release = self.cfg.new_parameter_init == "release"
        linears = [
            layer
            for mlp in (self.action_encoder, self.action_decoder, self.state_encoder, self.state_decoder)
            for layer in mlp
            if isinstance(layer, nn.Linear)
        ]
        if release:
            self.view_embedding.normal_(std=_RELEASE_INIT_STD)
        else:
            self.view_embedding.zero_()
        for layer in linears:
            _init_linear(layer, release)
        self.depth_scale_shift_table.normal_(std=self.inner_dim**-0.5)
        _init_linear(self.depth_proj_out, release)
        plugins = (
            self.video_head,
            self.depth_conditioner,
            self.frame_broadcast,
            self.state_broadcaster,
            self.state_modulator,
            self.video_state_modulator,
        )
        for plugin in plugins:
            if plugin is not None:
                plugin.reset_parameters()  # no-ops and shut gates: see xwam_core.models.heads

    def _install_processors(self) -> None:
        for module in self.modules():
            if isinstance(module, WanAttention) and not isinstance(module.processor, XWAMAttnProcessor):
                if module.add_k_proj is not None:
                    raise XWAMError(
                        "Wan I2V checkpoints with an image cross-attention branch are not supported"
                    )
                module.set_processor(XWAMAttnProcessor())  # type: ignore[arg-type]

    @classmethod
    def from_config(
        cls, config: dict[str, Any] | None = None, return_unused_kwargs: bool = False, **kwargs: Any
    ) -> Any:
        """diffusers' from_config (which `from_pretrained` also calls), with older configs read as written.

        A config without `action_state_readout`, `depth_main_kv_grad` or `new_parameter_init` predates them:
        it gets the behaviour it was trained with ("final_norm", False, "pytorch"), not today's defaults;
        a keyword argument still wins. A live model's config always holds all three keys.
        """
        if isinstance(config, dict):  # diffusers' FrozenDict is one
            legacy = {k: v for k, v in _LEGACY_CONFIG.items() if k not in config and k not in kwargs}
            if legacy:
                config = {**config, **legacy}
        return super().from_config(cast(dict[str, Any], config), return_unused_kwargs, **kwargs)

    @property
    def cfg(self) -> Any:
        """`self.config` with attribute access typed loosely (diffusers' FrozenDict supports it)."""
        return self.config

    @property
    def inner_dim(self) -> int:
        return self.cfg.num_attention_heads * self.cfg.attention_head_dim

    @property
    def depth_range(self) -> DepthRange:
        """The inverse-depth range the depth latents were encoded with (recovers metric depth)."""
        return DepthRange.from_config(self.cfg.depth_near, self.cfg.depth_far, self.cfg.depth_encoding)

    # ---- loading Wan weights -------------------------------------------------------------------

    @classmethod
    def from_wan_pretrained(
        cls,
        path_or_hub_id: str | Path = WAN_HUB_ID,
        *,
        torch_dtype: torch.dtype | None = None,
        **xwam_kwargs: Any,
    ) -> tuple[XWAMTransformer, WanInitReport]:
        """Trunk from a diffusers-layout Wan2.2 checkpoint, depth branch copied from its last M blocks.

        `path_or_hub_id`: a pipeline folder with `transformer/`, the transformer folder itself, or a hub id
        (`Wan-AI/Wan2.2-TI2V-5B-Diffusers`). `xwam_kwargs`: the X-WAM arguments (num_views, action_dim, ...).
        Returns (model, report); the report lists every new parameter.
        """
        unknown = sorted(set(xwam_kwargs) - set(cls._get_init_keys(cls)))
        if unknown:
            raise XWAMError(f"from_wan_pretrained: unknown XWAMTransformer setting(s) {unknown}")
        wan_keys = set(WAN_CONFIG_KEYS) & set(xwam_kwargs)
        if wan_keys:
            raise XWAMError(
                f"from_wan_pretrained: {sorted(wan_keys)} come from the checkpoint and cannot be set"
            )
        pretrained, subfolder = _resolve_wan_source(path_or_hub_id)
        try:
            wan = WanTransformer3DModel.from_pretrained(
                pretrained, subfolder=subfolder, torch_dtype=torch_dtype
            )
        except (OSError, ValueError) as err:
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise XWAMError(f"cannot load a Wan transformer from '{path_or_hub_id}': {first_line}") from err
        if wan.config.image_dim is not None or wan.config.added_kv_proj_dim is not None:
            raise XWAMError(
                f"{path_or_hub_id}: Wan I2V checkpoints with image cross-attention are not supported"
            )

        config = {k: wan.config[k] for k in WAN_CONFIG_KEYS} | xwam_kwargs
        with torch.device("meta"):
            model = cls(**config)
        model.wan = wan
        num_layers, num_depth = model.cfg.num_layers, model.cfg.num_depth_blocks
        first = num_layers - num_depth
        model.depth_blocks = nn.ModuleList(copy.deepcopy(wan.blocks[i]) for i in range(first, num_layers))
        model._materialize_new_parameters(device=wan.device, dtype=torch_dtype or torch.float32)
        model._init_new_parameters()
        model._install_processors()

        report = WanInitReport(
            source=str(path_or_hub_id),
            loaded_parameters=sum(p.numel() for p in wan.parameters()),
            copied_blocks={f"depth_blocks.{j}": f"wan.blocks.{first + j}" for j in range(num_depth)},
            copied_parameters=sum(p.numel() for p in model.depth_blocks.parameters()),
            new_parameters={
                n: p.numel() for n, p in model.named_parameters() if n in model._new_parameter_names()
            },
        )
        return model, report

    def _materialize_new_parameters(self, device: torch.device, dtype: torch.dtype) -> None:
        """Give the new (meta) parameters real storage; fp32-kept names stay float32 like Wan's."""
        for name in self._new_parameter_names():
            module_name, _, param_name = name.rpartition(".")
            module = self.get_submodule(module_name) if module_name else self
            keep_fp32 = any(pattern in name for pattern in self._keep_in_fp32_modules)
            old = getattr(module, param_name)
            new = torch.empty(old.shape, device=device, dtype=torch.float32 if keep_fp32 else dtype)
            setattr(module, param_name, nn.Parameter(new, requires_grad=old.requires_grad))

    # ---- per-call tables -------------------------------------------------------------------------

    def _layout(
        self,
        video: torch.Tensor,
        actions: torch.Tensor | None,
        states: torch.Tensor | None,
    ) -> _Layout:
        cfg = self.cfg
        if video.ndim != 6:
            raise XWAMError(f"video must be latents (B, V, C, F, h, w), got shape {tuple(video.shape)}")
        batch, views, channels, frames, height, width = video.shape
        patch = tuple(cfg.patch_size)
        if channels != cfg.in_channels:
            raise XWAMError(
                f"video has {channels} latent channels, the model expects in_channels={cfg.in_channels}"
            )
        if not 1 <= views <= cfg.num_views:
            raise XWAMError(f"video has {views} views, the model has {cfg.num_views} view slots")
        if frames % patch[0] or height % patch[1] or width % patch[2]:
            raise XWAMError(
                f"video latents (F, h, w)={(frames, height, width)} not divisible by patch {patch}"
            )
        counts = []
        for name, x, dim in (("actions", actions, cfg.action_dim), ("states", states, cfg.state_dim)):
            if x is None:
                counts.append(0)
                continue
            if x.ndim != 3 or x.shape[0] != batch or x.shape[2] != dim:
                raise XWAMError(f"{name} must be ({batch}, N, {dim}), got shape {tuple(x.shape)}")
            counts.append(x.shape[1])
        return _Layout(batch, views, channels, frames, height, width, counts[0], counts[1], patch)

    def _rope_tables(self, layout: _Layout, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE (cos, sin), each (1, N, 1, head_dim): Wan's 3-D table per view, time-only positions for the rest."""
        rope = self.wan.rope
        f, h, w = layout.grid
        if max(f, h, w) > rope.max_seq_len:  # Wan's tables stop there (a bare reshape error otherwise)
            raise XWAMError(
                f"a latent grid of {f} x {h} x {w} patches (frames x height x width) exceeds the model's "
                f"rope_max_seq_len={rope.max_seq_len}; expected smaller inputs or a larger rope_max_seq_len"
            )
        cos_v, sin_v = rope(torch.empty(1, 0, layout.frames, layout.height, layout.width, device="meta"))
        # Same positions for every view; tokens are (frame, view, h, w).
        cos_v, sin_v = (
            x.view(1, f, 1, h * w, 1, -1)
            .expand(1, f, layout.views, h * w, 1, -1)
            .reshape(1, -1, 1, x.shape[-1])
            for x in (cos_v, sin_v)
        )
        # Actions and states sit on the time axis of the latent frames they cover: the future spans
        # f - 1 latent frames, so action i is at i (f-1)/K and state j at j (f-1)/(S-1)
        # (32 actions, 9 states, 3 latent frames: i/16 and j/4, docs/method.md section 2).
        span = max(f - 1, 1)
        k, s = layout.num_actions, layout.num_states
        positions = torch.cat(
            [
                torch.arange(k, dtype=torch.float64) * (span / max(k, 1)),
                torch.arange(s, dtype=torch.float64) * (span / max(s - 1, 1)),
            ]
        )
        cos_t, sin_t = self.time_rope(positions)
        cos = torch.cat([cos_v.to(device), cos_t.to(device)[None, :, None]], dim=1)
        sin = torch.cat([sin_v.to(device), sin_t.to(device)[None, :, None]], dim=1)
        return cos, sin

    def time_rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each (n, head_dim), for tokens at fractional time `positions` and spatial position 0.

        Uses Wan's own frequencies (its t/h/w split of the head dimension and theta); at integer positions
        this equals Wan's table rows.
        """
        rope = self.wan.rope
        freqs_dtype = torch.float32 if torch.backends.mps.is_available() else torch.float64
        cos_t, sin_t = get_1d_rotary_pos_embed(
            rope.t_dim,
            positions.to(freqs_dtype),  # type: ignore[arg-type]  # tensors are accepted
            _ROPE_THETA,
            use_real=True,
            repeat_interleave_real=True,
            freqs_dtype=freqs_dtype,
        )  # (n, t_dim)
        n = positions.shape[0]
        cos_hw = rope.freqs_cos[:1, rope.t_dim :].expand(n, -1).to(cos_t.device)  # position 0: cos 1, sin 0
        sin_hw = rope.freqs_sin[:1, rope.t_dim :].expand(n, -1).to(sin_t.device)
        return torch.cat([cos_t, cos_hw], dim=1), torch.cat([sin_t, sin_hw], dim=1)

    @staticmethod
    def _timestep_class(layout: _Layout, device: torch.device) -> torch.Tensor:
        """(N,) which timestep each token takes: clean (frame 0, state 0), t_video, or t_action."""
        f, h, w = layout.grid
        per_frame = layout.views * h * w
        video = torch.full((f * per_frame,), _T_VIDEO, dtype=torch.long)
        video[:per_frame] = _T_CLEAN  # the current frame's latents are the condition
        actions = torch.full((layout.num_actions,), _T_ACTION, dtype=torch.long)
        states = torch.full((layout.num_states,), _T_ACTION, dtype=torch.long)
        states[:1] = _T_CLEAN  # the current state is the condition
        return torch.cat([video, actions, states]).to(device)

    def _embed_text(self, text: torch.Tensor) -> torch.Tensor:
        if text.ndim != 3 or text.shape[-1] != self.cfg.text_dim:
            raise XWAMError(
                f"text must be (B, L, {self.cfg.text_dim}) embeddings, got shape {tuple(text.shape)}"
            )
        return self.wan.condition_embedder.text_embedder(text)  # (B, L, D)

    def _embed_timesteps(
        self,
        t_video: torch.Tensor,
        t_action: torch.Tensor,
        timestep_class: torch.Tensor,
        dtype: torch.dtype,
        state_embedding: torch.Tensor | None = None,
        video_state_embedding: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token (temb (B, N, D), AdaLN projection (B, N, 6, D)) via Wan's condition embedder.

        Embeds the three distinct timesteps per sample, then gathers per token: what Wan2.2 computes
        for a (B, N) timestep, at 3/N of the cost. `state_embedding` (B, D) (`state_modulation`) is added
        to the action timestep's embedding (class 2: action and future-state tokens) before the projection,
        `video_state_embedding` (B, D) (`video_state_modulation`) to the future video tokens' (class 1).
        """
        embedder = self.wan.condition_embedder
        batch = t_video.shape[0]
        timesteps = torch.stack([torch.zeros_like(t_video), t_video, t_action], dim=1)  # (B, 3)
        emb = embedder.timesteps_proj(timesteps.flatten())  # (B*3, freq_dim)
        time_dtype = next(iter(embedder.time_embedder.parameters())).dtype
        if emb.dtype != time_dtype and time_dtype != torch.int8:
            emb = emb.to(time_dtype)
        temb = embedder.time_embedder(emb).to(dtype)  # (B*3, D)
        if state_embedding is not None or video_state_embedding is not None:
            offset = torch.zeros_like(temb).unflatten(0, (batch, 3))  # (B, 3, D)
            if video_state_embedding is not None:
                offset[:, 1] = video_state_embedding.to(temb.dtype)
            if state_embedding is not None:
                offset[:, 2] = state_embedding.to(temb.dtype)
            temb = temb + offset.flatten(0, 1)
        proj = embedder.time_proj(embedder.act_fn(temb))  # (B*3, 6D)
        temb = temb.unflatten(0, (batch, 3))[:, timestep_class]  # (B, N, D)
        proj = proj.unflatten(0, (batch, 3)).unflatten(2, (6, -1))[:, timestep_class]  # (B, N, 6, D)
        return temb, proj

    @torch.no_grad()
    def build_step_cache(
        self,
        text: torch.Tensor,
        video_shape: tuple[int, ...] | torch.Size,
        num_actions: int | None = None,
        num_states: int | None = None,
    ) -> XWAMStepCache:
        """Precompute the step-invariant work of a denoising loop (inference only, no gradients).

        `video_shape`: (B, V, C, F, h, w) or (V, C, F, h, w); num_actions/num_states default to the config.
        Pass the result as `forward(..., cache=cache)`; text may then be None.
        """
        shape = tuple(video_shape)
        if len(shape) == 5:
            shape = (1, *shape)
        cfg = self.cfg
        k = cfg.num_actions if num_actions is None else num_actions
        s = cfg.num_states if num_states is None else num_states
        dummy = torch.empty(shape, device="meta")
        layout = self._layout(
            dummy,
            torch.empty(shape[0], k, cfg.action_dim, device="meta") if k else None,
            torch.empty(shape[0], s, cfg.state_dim, device="meta") if s else None,
        )
        device = self.wan.patch_embedding.weight.device
        cos, sin = self._rope_tables(layout, device)
        text_hidden = self._embed_text(text.to(device))
        return XWAMStepCache(
            layout=layout.key,
            freqs_cos=cos,
            freqs_sin=sin,
            timestep_class=self._timestep_class(layout, device),
            text_hidden=text_hidden,
            cross_kv=[text_kv(cast(WanAttention, block.attn2), text_hidden) for block in self.wan.blocks],
            depth_cross_kv=[
                text_kv(cast(WanAttention, block.attn2), text_hidden) for block in self.depth_blocks
            ],
        )

    # ---- forward ---------------------------------------------------------------------------------

    def _block(self, block: nn.Module, hidden: torch.Tensor, context: Any, proj: torch.Tensor, attn_in: Any):
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(block, hidden, context, proj, attn_in)
        return block(hidden, context, proj, attn_in)

    def _final_norm(self, hidden: torch.Tensor, temb: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """Wan's output AdaLN: norm_out with a per-token shift/scale from temb (B, N, D) and a (1, 2, D) table."""
        shift, scale = (table.unsqueeze(0) + temb.unsqueeze(2)).chunk(2, dim=2)  # (B, N, 1, D) each
        return (self.wan.norm_out(hidden.float()) * (1 + scale.squeeze(2)) + shift.squeeze(2)).type_as(hidden)

    @staticmethod
    def _unpatchify(tokens: torch.Tensor, layout: _Layout) -> torch.Tensor:
        """(B, F'*V*h'*w', C*pt*ph*pw) -> (B, V, C, F, h, w)."""
        f, h, w = layout.grid
        pt, ph, pw = layout.patch
        x = tokens.reshape(layout.batch, f, layout.views, h, w, pt, ph, pw, -1)
        x = x.permute(0, 2, 8, 1, 5, 3, 6, 4, 7)  # (B, V, C, F', pt, h', ph, w', pw)
        return x.reshape(layout.batch, layout.views, -1, layout.frames, layout.height, layout.width)

    def forward(
        self,
        video: torch.Tensor,
        actions: torch.Tensor | None,
        states: torch.Tensor | None,
        t_video: torch.Tensor,
        t_action: torch.Tensor | None,
        text: torch.Tensor | None,
        run_depth: bool = True,
        cache: XWAMStepCache | None = None,
        depth_context: torch.Tensor | None = None,
    ) -> XWAMOutput:
        """One denoising step over [video | actions | states].

        video (B, V, C, F, h, w) latents, latent frame 0 clean; actions (B, K, action_dim) noisy or None;
        states (B, S, state_dim), state 0 clean, or None; t_video, t_action (B,) model timesteps in [0, 1000];
        text (B or 1, L, text_dim), ignored when `cache` is given. `run_depth=False` skips the depth branch.
        depth_context (B, V, C, 1, h, w): the observed current depth latent, required by a depth_condition
        model when it runs the depth branch.
        """
        layout = self._layout(video, actions, states)
        batch, n_video = layout.batch, layout.num_video_tokens
        device = video.device
        dtype = self.wan.patch_embedding.weight.dtype

        t_video = _per_sample(t_video, batch, device, "t_video")
        if t_action is None:
            if layout.num_actions or layout.num_states > 1:
                raise XWAMError("t_action is required when actions or future states are given")
            t_action = torch.zeros_like(t_video)
        t_action = _per_sample(t_action, batch, device, "t_action")

        if cache is not None:
            if cache.layout != layout.key:
                raise XWAMError(
                    f"step cache built for layout (V, C, F, h, w, K, S)={cache.layout}, called with {layout.key}"
                )
            cos, sin, timestep_class = cache.freqs_cos, cache.freqs_sin, cache.timestep_class
            text_hidden = cache.text_hidden
            contexts: list[Any] = list(cache.cross_kv)
            depth_contexts: list[Any] = list(cache.depth_cross_kv)
        else:
            if text is None:
                raise XWAMError("text embeddings are required when no step cache is given")
            cos, sin = self._rope_tables(layout, device)
            timestep_class = self._timestep_class(layout, device)
            text_hidden = self._embed_text(text.to(device=device, dtype=dtype))
            contexts = [text_hidden] * len(self.wan.blocks)
            depth_contexts = [text_hidden] * len(self.depth_blocks)
        if text_hidden.shape[0] not in (1, batch):
            raise XWAMError(f"text has batch {text_hidden.shape[0]}, expected 1 or {batch} like the video")

        state_embedding = video_state_embedding = None
        if states is not None:  # the current state, clean
            current_state = states[:, 0].to(text_hidden.dtype)
            if self.state_modulator is not None:
                state_embedding = self.state_modulator(current_state)
            if self.video_state_modulator is not None:
                video_state_embedding = self.video_state_modulator(current_state)
        temb, proj = self._embed_timesteps(
            t_video, t_action, timestep_class, text_hidden.dtype, state_embedding, video_state_embedding
        )

        # Tokens: each view patchified alone, plus its view embedding; frame-major order.
        x = self.wan.patch_embedding(video.flatten(0, 1).to(dtype))  # (B*V, D, F', h', w')
        x = x.unflatten(0, (batch, layout.views)).permute(0, 3, 1, 4, 5, 2)  # (B, F', V, h', w', D)
        x = x + self.view_embedding[: layout.views].view(1, 1, layout.views, 1, 1, -1).to(x.dtype)
        if self.frame_broadcast is not None:
            x = self.frame_broadcast(x)  # (B, F', V, h', w', D)
        action_tokens = self.action_encoder(actions.to(dtype)) if actions is not None else None  # (B, K, D)
        state_tokens = self.state_encoder(states.to(dtype)) if states is not None else None  # (B, S, D)
        if self.state_broadcaster is not None and state_tokens is not None:
            action_tokens, state_tokens = self.state_broadcaster(action_tokens, state_tokens)
        tokens = [x.flatten(1, 4)]  # (B, N_video, D)
        tokens += [t for t in (action_tokens, state_tokens) if t is not None]
        hidden = torch.cat(tokens, dim=1)  # (B, N, D)

        num_layers = len(self.wan.blocks)
        num_depth = len(self.depth_blocks) if run_depth else 0
        first_depth = num_layers - num_depth
        sinks = [KVSink(detach=not self.cfg.depth_main_kv_grad) for _ in range(num_depth)]
        depth_hidden = None
        for i, block in enumerate(self.wan.blocks):
            if num_depth and i == first_depth:
                depth_hidden = hidden[:, :n_video]  # the depth stream starts from the video tokens here
            attn_in = SelfAttnInputs(cos, sin, kv_sink=sinks[i - first_depth] if i >= first_depth else None)
            hidden = self._block(block, hidden, contexts[i], proj, attn_in)

        # Readout. The release: only the video tokens pass the final norm and the timestep shift/scale;
        # actions and states are decoded from the last block's raw hidden state ("last_hidden").
        if self.cfg.action_state_readout == "final_norm":
            out = self._final_norm(hidden, temb, self.wan.scale_shift_table)  # (B, N, D)
            video_tokens, rest = out[:, :n_video], out[:, n_video:]
        else:
            video_tokens = self._final_norm(
                hidden[:, :n_video], temb[:, :n_video], self.wan.scale_shift_table
            )
            rest = hidden[:, n_video:]  # (B, K + S, D)
        unpatchify = functools.partial(self._unpatchify, layout=layout)
        wan_video = unpatchify(self.wan.proj_out(video_tokens))  # (B, V, C, F, h, w)
        video_out = self.video_head(wan_video, video_tokens, video, t_video, unpatchify)  # velocity
        k = layout.num_actions
        actions_out = self.action_decoder(rest[:, :k]) if actions is not None else None
        states_out = self.state_decoder(rest[:, k:]) if states is not None else None

        depth_out = None
        if depth_hidden is not None:
            observed = None
            if self.depth_conditioner is not None:  # RGB-D: the observed depth enters the depth stream
                observed = self.depth_conditioner.checked(depth_context, tuple(video.shape))
                depth_hidden = self.depth_conditioner.embed(depth_hidden, observed)  # (B, N_video, D)
            cos_v, sin_v = cos[:, :n_video], sin[:, :n_video]
            proj_v, temb_v = proj[:, :n_video], temb[:, :n_video]  # depth uses the video tokens' timesteps
            for j, block in enumerate(self.depth_blocks):
                attn_in = SelfAttnInputs(cos_v, sin_v, kv_extra=sinks[j].kv)
                depth_hidden = self._block(block, depth_hidden, depth_contexts[j], proj_v, attn_in)
            depth_hidden = self._final_norm(depth_hidden, temb_v, self.depth_scale_shift_table)
            depth_out = unpatchify(self.depth_proj_out(depth_hidden))  # (B, V, C, F, h, w)
            if self.depth_conditioner is not None and observed is not None:
                depth_out = self.depth_conditioner.gate_head(depth_out, depth_hidden, observed, unpatchify)

        return XWAMOutput(video=video_out, actions=actions_out, states=states_out, depth=depth_out)


def upgrade_legacy_state_dict(state_dict: Mapping[str, _Value]) -> dict[str, _Value]:
    """An XWAMTransformer state dict with the plug-ins' old top-level names (gate_proj, condition_proj,
    depth_condition_embedding, depth_gate_proj) renamed to their modules' (video_head.gate, ...).

    Every other name, and a state dict already in the new names, passes through unchanged (order kept).
    """
    upgraded = {}
    for name, value in state_dict.items():
        for old, new in _LEGACY_PREFIXES.items():
            if name.startswith(old):
                name = new + name[len(old) :]
                break
        upgraded[name] = value
    return upgraded


def _per_sample(t: torch.Tensor | float, batch: int, device: torch.device, name: str) -> torch.Tensor:
    """A timestep as (B,) float32: accepts (B,), (1,) or a scalar."""
    t = torch.as_tensor(t, device=device, dtype=torch.float32)
    if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, batch)):
        raise XWAMError(f"{name} must be ({batch},) model timesteps in [0, 1000], got shape {tuple(t.shape)}")
    return t.reshape(-1).expand(batch)


def _resolve_wan_source(path_or_hub_id: str | Path) -> tuple[str, str | None]:
    """(pretrained path or id, subfolder) for WanTransformer3DModel.from_pretrained."""
    text = str(path_or_hub_id)
    path = Path(text).expanduser()
    if path.is_dir():
        for folder, subfolder in ((path / "transformer", "transformer"), (path, None)):
            config = folder / "config.json"
            if config.is_file():
                class_name = json.loads(config.read_text()).get("_class_name")
                if class_name not in (None, "WanTransformer3DModel"):
                    raise XWAMError(f"{config}: is a {class_name} config, expected WanTransformer3DModel")
                return str(path), subfolder
        raise XWAMError(
            f"{path}: no config.json here or in transformer/; expected a diffusers Wan2.2 checkpoint"
        )
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise XWAMError(f"{text}: no such checkpoint folder (or hub id 'owner/name')")
    return text, "transformer"

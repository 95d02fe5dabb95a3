"""The diffusers internals xwam relies on, each checked by name.

xwam_core/models/transformer.py reuses WanTransformer3DModel's parts one by one (patch embedding, RoPE,
condition embedder, blocks, output head) and passes its own objects through WanTransformerBlock's argument
slots to its attention processor; codecs.py reads AutoencoderKLWan's config; train.py and
schedule/inference.py drive EMAModel and UniPCMultistepScheduler. None of this is diffusers' public API.
When a diffusers release moves one of them, a test here fails with one line naming the internal and the
installed version, instead of a shape error deep inside a forward pass. pyproject.toml bounds diffusers
above the newest version these tests passed on: raise the bound only after they pass.
"""

from __future__ import annotations

import copy
import importlib
import inspect
from typing import Any

import diffusers
import pytest
import torch
import torch.nn as nn

VERSION = diffusers.__version__

# A tiny Wan2.2 TI2V-layout transformer (the 5B's layout at toy width): built here, never downloaded.
WAN_CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=24,
    in_channels=8,
    out_channels=8,
    text_dim=16,
    freq_dim=32,
    ffn_dim=64,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=64,
)
INNER = 2 * 24


def moved(internal: str, detail: str) -> None:
    """Fail with one line: which internal, what changed, which diffusers."""
    pytest.fail(f"diffusers {VERSION}: {internal} {detail} (xwam relies on it)", pytrace=False)


def require(condition: bool, internal: str, detail: str) -> None:
    if not condition:
        moved(internal, detail)


def attr(obj: Any, dotted: str, owner: str) -> Any:
    """obj.a.b.c, failing with the full name of the first missing attribute."""
    for i, name in enumerate(dotted.split(".")):
        if not hasattr(obj, name):
            moved(f"{owner}.{'.'.join(dotted.split('.')[: i + 1])}", "is gone")
        obj = getattr(obj, name)
    return obj


def parameters(fn: Any, internal: str, names: list[str], positional: bool = False) -> None:
    """fn takes these keyword arguments (positional=True: as its first parameters after self, in order)."""
    params = [p for p in inspect.signature(fn).parameters if p != "self"]
    if positional:
        require(params[: len(names)] == names, internal, f"takes {params}, expected {names} first, in order")
    else:
        missing = [n for n in names if n not in params]
        require(not missing, internal, f"has no argument(s) {missing}; it takes {params}")


def load(module: str, name: str) -> Any:
    try:
        return getattr(importlib.import_module(module), name)
    except Exception as e:  # diffusers' lazy modules wrap import errors in RuntimeError
        moved(f"{module}.{name}", f"cannot be imported ({type(e).__name__}: {str(e).splitlines()[0]})")


@pytest.fixture(scope="module")
def wan() -> nn.Module:
    wan_cls = load("diffusers.models.transformers.transformer_wan", "WanTransformer3DModel")
    torch.manual_seed(0)
    return wan_cls(**WAN_CONFIG).eval()


class Recorder:
    """An attention processor that records what it was handed and returns zeros."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self) -> None:
        self.calls: list[tuple[Any, Any, Any]] = []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        self.calls.append((encoder_hidden_states, attention_mask, rotary_emb))
        return torch.zeros_like(hidden_states)


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("diffusers.configuration_utils", "ConfigMixin"),
        ("diffusers.configuration_utils", "register_to_config"),
        ("diffusers.models.attention_dispatch", "dispatch_attention_fn"),
        ("diffusers.models.embeddings", "get_1d_rotary_pos_embed"),
        ("diffusers.models.modeling_utils", "ModelMixin"),
        ("diffusers.models.transformers.transformer_wan", "WanAttention"),
        ("diffusers.models.transformers.transformer_wan", "WanAttnProcessor"),
        ("diffusers.models.transformers.transformer_wan", "WanTransformer3DModel"),
        ("diffusers.models.transformers.transformer_wan", "WanTransformerBlock"),
        ("diffusers.utils", "BaseOutput"),
        ("diffusers", "AutoencoderKLWan"),
        ("diffusers.schedulers.scheduling_unipc_multistep", "UniPCMultistepScheduler"),
        ("diffusers.training_utils", "EMAModel"),
    ],
)
def test_import_paths(module, name):
    load(module, name)


def test_wan_model_parts_and_config(wan):
    from xwam_core.models.transformer import WAN_CONFIG_KEYS

    owner = "WanTransformer3DModel"
    require(
        isinstance(attr(wan, "patch_embedding", owner), nn.Conv3d), f"{owner}.patch_embedding", "not a Conv3d"
    )
    embedder = attr(wan, "condition_embedder", owner)
    for part in ("text_embedder", "time_embedder", "time_proj", "timesteps_proj", "act_fn"):
        attr(embedder, part, f"{owner}.condition_embedder")
    require(
        embedder.time_proj.out_features == 6 * INNER,
        f"{owner}.condition_embedder.time_proj",
        f"gives {embedder.time_proj.out_features} features, expected 6 x inner_dim (the block's AdaLN)",
    )
    blocks = attr(wan, "blocks", owner)
    require(len(blocks) == WAN_CONFIG["num_layers"], f"{owner}.blocks", "is not one module per layer")
    block_cls = load("diffusers.models.transformers.transformer_wan", "WanTransformerBlock")
    require(isinstance(blocks[0], block_cls), f"{owner}.blocks[0]", "is not a WanTransformerBlock")
    require(isinstance(attr(wan, "norm_out", owner), nn.Module), f"{owner}.norm_out", "is not a module")
    proj_out = attr(wan, "proj_out", owner)
    require(
        isinstance(proj_out, nn.Linear) and proj_out.out_features == 8 * 1 * 2 * 2,
        f"{owner}.proj_out",
        "is not a Linear to out_channels x patch volume",
    )
    table = attr(wan, "scale_shift_table", owner)
    require(
        tuple(table.shape) == (1, 2, INNER), f"{owner}.scale_shift_table", f"has shape {tuple(table.shape)}"
    )
    missing = [k for k in (*WAN_CONFIG_KEYS, "image_dim", "added_kv_proj_dim") if k not in wan.config]
    require(not missing, f"{owner}.config", f"has no key(s) {missing}")
    require(wan.config.image_dim is None, f"{owner}.config.image_dim", "is not None for a T2V/TI2V model")


def test_rope_table_layout_and_call(wan):
    owner = "WanTransformer3DModel.rope"
    rope = attr(wan, "rope", "WanTransformer3DModel")
    t_dim = attr(rope, "t_dim", owner)
    head_dim = WAN_CONFIG["attention_head_dim"]
    for name in ("freqs_cos", "freqs_sin"):
        table = attr(rope, name, owner)
        require(
            tuple(table.shape) == (WAN_CONFIG["rope_max_seq_len"], head_dim),
            f"{owner}.{name}",
            f"has shape {tuple(table.shape)}, expected (rope_max_seq_len, head_dim)",
        )
    parameters(rope.forward, f"{owner}.forward", ["hidden_states"], positional=True)
    # called on a meta tensor: only the shape is read; out come (cos, sin) per token, frame-major
    out = rope(torch.empty(1, 0, 3, 4, 6, device="meta"))
    require(
        isinstance(out, tuple) and len(out) == 2 and tuple(out[0].shape) == (1, 3 * 2 * 3, 1, head_dim),
        f"{owner}(hidden_states)",
        "no longer returns (freqs_cos, freqs_sin), each (1, N, 1, head_dim)",
    )
    # X-WAM's fractional action/state positions recompute the time columns with get_1d_rotary_pos_embed
    rotary = load("diffusers.models.embeddings", "get_1d_rotary_pos_embed")
    parameters(
        rotary,
        "get_1d_rotary_pos_embed",
        ["dim", "pos", "theta", "use_real", "repeat_interleave_real", "freqs_dtype"],
    )
    cos_t, sin_t = rotary(
        t_dim,
        torch.arange(5, dtype=torch.float64),
        10000.0,
        use_real=True,
        repeat_interleave_real=True,
        freqs_dtype=torch.float64,
    )
    require(
        torch.allclose(cos_t, rope.freqs_cos[:5, :t_dim].to(cos_t))
        and torch.allclose(sin_t, rope.freqs_sin[:5, :t_dim].to(sin_t)),
        f"{owner}.freqs_cos/freqs_sin",
        "first t_dim columns are not get_1d_rotary_pos_embed(t_dim, positions, theta=10000)",
    )
    # The h/w columns at position 0 are cos 1, sin 0: time_rope relies on it for action and state tokens.
    require(
        bool((rope.freqs_cos[0, t_dim:] == 1).all() and (rope.freqs_sin[0, t_dim:] == 0).all()),
        f"{owner}.freqs_cos/freqs_sin",
        "h/w columns at position 0 are not (cos 1, sin 0)",
    )


def test_block_passes_its_slots_through_untouched(wan):
    """X-WAM hands its own objects to the block where Wan passes text and RoPE: they must arrive as is."""
    owner = "WanTransformerBlock"
    block = wan.blocks[0]
    parameters(
        type(block).forward,
        f"{owner}.forward",
        ["hidden_states", "encoder_hidden_states", "temb", "rotary_emb"],
        positional=True,
    )
    for name in ("scale_shift_table", "norm1", "norm2", "norm3", "attn1", "attn2", "ffn"):
        attr(block, name, owner)  # attribute names: also X-WAM's fp32 and layerwise-casting patterns
    require(
        tuple(block.scale_shift_table.shape) == (1, 6, INNER), f"{owner}.scale_shift_table", "changed shape"
    )
    self_attn, cross_attn = Recorder(), Recorder()
    original = (block.attn1.processor, block.attn2.processor)
    block.attn1.set_processor(self_attn)
    block.attn2.set_processor(cross_attn)
    try:
        hidden = torch.randn(2, 5, INNER)
        text_slot, rope_slot = object(), object()
        temb = torch.randn(2, 5, 6, INNER)  # per-token AdaLN (Wan2.2 TI2V): (B, N, 6, D)
        block(hidden, text_slot, temb, rope_slot)
    except Exception as e:
        moved(
            f"{owner}.forward", f"no longer passes its text and RoPE slots on as is: {type(e).__name__}: {e}"
        )
    finally:
        block.attn1.set_processor(original[0])
        block.attn2.set_processor(original[1])
    require(
        len(self_attn.calls) == 1 and self_attn.calls[0][0] is None and self_attn.calls[0][2] is rope_slot,
        f"{owner}.forward",
        "no longer hands rotary_emb to attn1 untouched (X-WAM's SelfAttnInputs travel there)",
    )
    require(
        len(cross_attn.calls) == 1 and cross_attn.calls[0][0] is text_slot,
        f"{owner}.forward",
        "no longer hands encoder_hidden_states to attn2 untouched (X-WAM's cached CrossKV travel there)",
    )


def test_block_takes_per_token_timestep_embeddings(wan):
    """Per-token temb (B, N, 6, D) with equal rows must equal the per-sample form (B, 6, D)."""
    block = wan.blocks[0]
    g = torch.Generator().manual_seed(0)
    hidden, text = torch.randn(2, 5, INNER, generator=g), torch.randn(2, 3, INNER, generator=g)
    rope = wan.rope(torch.empty(1, 0, 5, 2, 2, device="meta"))  # 5 tokens with patch (1, 2, 2)
    temb = torch.randn(2, 6, INNER, generator=g)
    with torch.no_grad():
        per_sample = block(hidden, text, temb, rope)
        try:
            per_token = block(hidden, text, temb[:, None].expand(-1, 5, -1, -1), rope)
        except Exception as e:
            moved(
                "WanTransformerBlock.forward",
                f"refuses a per-token temb (B, N, 6, D): {type(e).__name__}: {e}",
            )
    require(
        torch.allclose(per_sample, per_token, atol=1e-6),
        "WanTransformerBlock.forward",
        "treats a (B, N, 6, D) temb differently from (B, 6, D) (X-WAM's per-token timesteps need it)",
    )


def test_attention_module_and_processor_contract(wan):
    from xwam_core.finetune import LORA_TARGETS
    from xwam_core.models.transformer import XWAMAttnProcessor

    owner = "WanAttention"
    attention_cls = load("diffusers.models.transformers.transformer_wan", "WanAttention")
    processor_cls = load("diffusers.models.transformers.transformer_wan", "WanAttnProcessor")
    block = wan.blocks[0]
    for name in ("attn1", "attn2"):
        require(
            isinstance(getattr(block, name), attention_cls),
            f"WanTransformerBlock.{name}",
            "is no WanAttention",
        )
    parameters(
        attention_cls.forward,
        f"{owner}.forward",
        ["hidden_states", "encoder_hidden_states", "attention_mask", "rotary_emb"],
        positional=True,
    )
    for name in (
        "to_q",
        "to_k",
        "to_v",
        "to_out",
        "norm_q",
        "norm_k",
        "heads",
        "add_k_proj",
        "set_processor",
    ):
        attr(block.attn1, name, owner)
    require(block.attn1.heads == WAN_CONFIG["num_attention_heads"], f"{owner}.heads", "is not the head count")
    require(block.attn2.add_k_proj is None, f"{owner}.add_k_proj", "is set on a model without image branch")
    require(
        isinstance(block.attn1.to_out[0], nn.Linear) and len(block.attn1.to_out) == 2,
        f"{owner}.to_out",
        "is not [Linear, Dropout]",
    )
    for target in LORA_TARGETS:  # peft finds the LoRA targets by these names
        require(
            isinstance(block.attn1.get_submodule(target), nn.Linear), f"{owner}.{target}", "is not a Linear"
        )

    # XWAMAttnProcessor computes what Wan's own processor computes, unfused and fused
    g = torch.Generator().manual_seed(0)
    hidden, text = torch.randn(2, 6, INNER, generator=g), torch.randn(2, 3, INNER, generator=g)
    rope = wan.rope(torch.empty(1, 0, 6, 2, 2, device="meta"))
    for fused in (False, True):
        self_attn, cross_attn = block.attn1, block.attn2
        if fused:
            self_attn, cross_attn = copy.deepcopy(self_attn), copy.deepcopy(cross_attn)
            for module in (self_attn, cross_attn):
                attr(module, "fuse_projections", owner)()
                require(
                    getattr(module, "fused_projections", False), f"{owner}.fused_projections", "stays False"
                )
            attr(self_attn, "to_qkv", f"{owner} (fused self-attention)")
            attr(cross_attn, "to_kv", f"{owner} (fused cross-attention)")
        with torch.no_grad():
            for module, args in (
                (self_attn, (hidden, None, None, rope)),
                (cross_attn, (hidden, text, None, None)),
            ):
                module.set_processor(processor_cls())
                reference = module(*args)
                module.set_processor(XWAMAttnProcessor())
                ours = module(*args)
                require(
                    torch.allclose(ours, reference, atol=1e-5),
                    f"WanAttnProcessor ({'fused' if fused else 'unfused'})",
                    "computes something XWAMAttnProcessor no longer reproduces",
                )
        block.attn1.set_processor(processor_cls())
        block.attn2.set_processor(processor_cls())


def test_attention_backend_reaches_our_processor(wan):
    """diffusers sets the attention backend by writing `processor._attention_backend` (XWAMAttnProcessor's)."""
    from xwam_core.models.transformer import XWAMAttnProcessor

    model = copy.deepcopy(wan)
    for module in model.modules():
        if hasattr(module, "set_processor"):
            module.set_processor(XWAMAttnProcessor())
    attr(model, "set_attention_backend", "ModelMixin")("native")
    backends = {m.processor._attention_backend for m in model.modules() if hasattr(m, "set_processor")}
    require(
        backends != {None}, "ModelMixin.set_attention_backend", "no longer sets processor._attention_backend"
    )


def test_dispatch_attention_fn_layout_and_arguments():
    dispatch = load("diffusers.models.attention_dispatch", "dispatch_attention_fn")
    parameters(
        dispatch,
        "dispatch_attention_fn",
        ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "backend", "parallel_config"],
    )
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 5, 3, 8, generator=g) for _ in range(3))  # (B, N, heads, head_dim)
    out = dispatch(
        q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, backend=None, parallel_config=None
    )
    reference = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)))
    require(
        torch.allclose(out, reference.transpose(1, 2), atol=1e-6),
        "dispatch_attention_fn",
        "no longer takes and returns (B, N, heads, head_dim)",
    )


def test_model_mixin_hooks():
    model_mixin = load("diffusers.models.modeling_utils", "ModelMixin")
    config_mixin = load("diffusers.configuration_utils", "ConfigMixin")
    register = load("diffusers.configuration_utils", "register_to_config")
    for name in (
        "_no_split_modules",
        "_keep_in_fp32_modules",
        "_skip_layerwise_casting_patterns",
        "_repeated_blocks",
    ):
        require(hasattr(model_mixin, name), f"ModelMixin.{name}", "is gone (X-WAM sets it on its class)")

    class Tiny(model_mixin, config_mixin):  # type: ignore[misc, valid-type]
        _supports_gradient_checkpointing = True

        @register
        def __init__(self, width: int = 4, depth: int = 1):
            super().__init__()
            self.layer = nn.Linear(width, width)
            self.gradient_checkpointing = False

    require(
        config_mixin._get_init_keys(Tiny) >= {"width", "depth"},
        "ConfigMixin._get_init_keys",
        "no longer lists the __init__ arguments (presets and from_wan_pretrained check settings with it)",
    )
    tiny = Tiny()
    attr(tiny, "enable_gradient_checkpointing", "ModelMixin")()
    require(
        tiny.gradient_checkpointing is True,
        "ModelMixin.enable_gradient_checkpointing",
        "no longer sets gradient_checkpointing",
    )
    func = attr(tiny, "_gradient_checkpointing_func", "ModelMixin")
    x = torch.randn(3, 4, requires_grad=True)
    tiny.train()
    out = func(tiny.layer, x)  # X-WAM calls it as func(block, *block_args)
    require(
        torch.allclose(out, tiny.layer(x)),
        "ModelMixin._gradient_checkpointing_func",
        "is not func(module, *args)",
    )


def test_wan_vae_config_and_outputs():
    vae_cls = load("diffusers", "AutoencoderKLWan")
    torch.manual_seed(0)
    vae = vae_cls(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        is_residual=True,
        patch_size=2,
        in_channels=12,
        out_channels=12,
        scale_factor_spatial=16,
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    ).eval()
    for key in ("z_dim", "scale_factor_spatial", "scale_factor_temporal", "latents_mean", "latents_std"):
        require(key in vae.config, f"AutoencoderKLWan.config.{key}", "is gone")
    with torch.no_grad():
        z = attr(vae.encode(torch.zeros(1, 3, 1, 32, 32)), "latent_dist", "AutoencoderKLWan.encode()").mode()
        require(
            tuple(z.shape) == (1, 4, 1, 2, 2),
            "AutoencoderKLWan.encode().latent_dist.mode()",
            f"has shape {tuple(z.shape)}",
        )
        frames = attr(vae.decode(z), "sample", "AutoencoderKLWan.decode()")
    require(
        tuple(frames.shape) == (1, 3, 1, 32, 32),
        "AutoencoderKLWan.decode().sample",
        f"has shape {tuple(frames.shape)}",
    )


def test_unipc_flow_scheduler_arguments():
    from xwam_core.schedule.inference import make_flow_unipc

    scheduler_cls = load("diffusers.schedulers.scheduling_unipc_multistep", "UniPCMultistepScheduler")
    parameters(
        scheduler_cls.__init__,
        "UniPCMultistepScheduler",
        [
            "num_train_timesteps",
            "solver_order",
            "prediction_type",
            "use_flow_sigmas",
            "flow_shift",
            "final_sigmas_type",
        ],
    )
    parameters(
        scheduler_cls.step,
        "UniPCMultistepScheduler.step",
        ["model_output", "timestep", "sample", "return_dict"],
    )
    scheduler = make_flow_unipc(4, shift=5.0)
    sigmas = attr(scheduler, "sigmas", "UniPCMultistepScheduler")
    require(
        len(sigmas) == 5 and float(sigmas[-1]) == 0.0 and bool((sigmas[:-1] > sigmas[1:]).all()),
        "UniPCMultistepScheduler(use_flow_sigmas=True, final_sigmas_type='zero').sigmas",
        f"are not num_steps + 1 decreasing to 0: {sigmas.tolist()}",
    )
    # denoising starts from pure noise: the first sigma must be 1 (diffusers 0.36 started at 0.9998)
    require(
        abs(float(sigmas[0]) - 1.0) < 1e-5,
        "UniPCMultistepScheduler(use_flow_sigmas=True).sigmas[0]",
        f"is {float(sigmas[0])!r}, not 1",
    )
    attr(scheduler, "set_begin_index", "UniPCMultistepScheduler")(0)


def test_ema_model_interface():
    ema_cls = load("diffusers.training_utils", "EMAModel")
    layer = nn.Linear(2, 2)
    ema = ema_cls(layer.parameters(), decay=0.5)
    attr(ema, "step", "EMAModel")(layer.parameters())
    for name in ("shadow_params", "optimization_step", "state_dict"):
        attr(ema, name, "EMAModel")  # train.py saves and restores these
    require(len(ema.shadow_params) == 2, "EMAModel.shadow_params", "is not one tensor per parameter")

"""Recipes: typed TOML, clear errors naming file and key, --set overrides, round trip."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from xwam_core.errors import RecipeError
from xwam_core.recipe import Recipe, load_recipe, parse_override, recipe_to_toml

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.toml"
    p.write_text(text)
    return p


def test_defaults_and_file_values(tmp_path):
    r = load_recipe(write(tmp_path, "seed = 3\n[prepare.metaworld]\nsize = 96\ntasks = ['push-v3']\n"))
    assert r.seed == 3 and r.prepare.metaworld.size == 96 and r.prepare.metaworld.tasks == ["push-v3"]
    assert r.prepare.metaworld.episodes == Recipe().prepare.metaworld.episodes


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("sed = 1\n", "unknown key 'sed'"),
        ("[prepare]\nsorce = 'x'\n", "unknown key 'prepare.sorce'"),
        (
            "[prepare.metaworld]\nsize = 'big'\n",
            "key 'prepare.metaworld.size' expects an integer, got string 'big'",
        ),
        ("[prepare.metaworld]\ntasks = 'reach-v3'\n", "key 'prepare.metaworld.tasks' expects list"),
        ("[prepare.metaworld]\ntasks = [1]\n", r"key 'prepare.metaworld.tasks\[0\]' expects a string"),
        ("[data]\nnum_workers = true\n", "expects an integer, got boolean"),
        ("prepare = 3\n", "key 'prepare' expects a table"),
        ("seed = \n", "not valid TOML"),
    ],
)
def test_errors_name_file_and_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(RecipeError, match=message) as info:
        load_recipe(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_file():
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe("nope/never.toml")


def test_overrides(tmp_path):
    r = load_recipe(
        write(tmp_path, "[prepare.metaworld]\nsize = 96\n"),
        ["prepare.metaworld.size=128", "prepare.metaworld.views=['a','b']", "name=run one"],
    )
    assert r.prepare.metaworld.size == 128 and r.prepare.metaworld.views == ["a", "b"]
    assert r.name == "run one"
    with pytest.raises(RecipeError, match=re.escape("expected section.key=value")):
        parse_override("prepare.metaworld.size")
    with pytest.raises(RecipeError, match=re.escape("unknown key 'prepare.metaworld.colour'")):
        load_recipe(None, ["prepare.metaworld.colour=1"])
    assert load_recipe(None, ["data.val_episodes=2"]).data.val_episodes == 2


def test_int_accepted_where_float_expected():
    r = load_recipe(None, ["prepare.lerobot.depth_scale=1"])
    assert isinstance(r.prepare.lerobot.depth_scale, float)


def test_toml_round_trip(tmp_path):
    r = load_recipe(None, ["prepare.lerobot.views={'observation.images.front' = 'front'}", "seed=7"])
    path = write(tmp_path, recipe_to_toml(r))
    assert load_recipe(path) == r


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.toml")), ids=lambda p: p.name)
def test_shipped_recipes_load(path):
    load_recipe(path)


# Every range the recipe checks when it is loaded: (--set override, the key and the value the line names).
OUT_OF_RANGE = [
    ("seed=-1", "seed", "-1"),
    ("seed=4294967296", "seed", "4294967296"),
    ("prepare.metaworld.episodes=0", "prepare.metaworld.episodes", "0"),
    ("prepare.metaworld.size=32", "prepare.metaworld.size", "32"),
    ("prepare.metaworld.size=300", "prepare.metaworld.size", "300"),
    ("prepare.metaworld.seed=-2", "prepare.metaworld.seed", "-2"),
    ("prepare.metaworld.max_steps=0", "prepare.metaworld.max_steps", "0"),
    ("prepare.metaworld.max_steps=501", "prepare.metaworld.max_steps", "501"),
    ("prepare.metaworld.render_quality='best'", "prepare.metaworld.render_quality", "'best'"),
    ("prepare.metaworld.tasks=[]", "prepare.metaworld.tasks", "[]"),
    ("prepare.metaworld.views=[]", "prepare.metaworld.views", "[]"),
    ("prepare.lerobot.depth_scale=-0.001", "prepare.lerobot.depth_scale", "-0.001"),
    ("prepare.lerobot.episodes=[0, -1]", "prepare.lerobot.episodes", "[0, -1]"),
    ("prepare.lerobot.state_key=''", "prepare.lerobot.state_key", "''"),
    ("prepare.lerobot.action_key=''", "prepare.lerobot.action_key", "''"),
    ("data.future_frames=0", "data.future_frames", "0"),
    ("data.frame_stride=0", "data.frame_stride", "0"),
    ("data.views=['a', 'a']", "data.views", "['a', 'a']"),
    ("data.val_episodes=-1", "data.val_episodes", "-1"),
    ("data.num_workers=-1", "data.num_workers", "-1"),
    ("data.batch_size=0", "data.batch_size", "0"),
    ("model.preset='huge'", "model.preset", "'huge'"),
    ("model.text='clip'", "model.text", "'clip'"),
    ("model.text_seq_len=0", "model.text_seq_len", "0"),
    ("model.action_dim=-1", "model.action_dim", "-1"),
    ("model.state_dim=-1", "model.state_dim", "-1"),
    ("model.depth_near=0", "model.depth_near", "0.0"),
    ("model.depth_far=0.01", "model.depth_far", "0.01"),
    ("model.depth_ranges={a = [2.0, 1.0]}", "model.depth_ranges.a", "[2.0, 1.0]"),
    ("model.depth_ranges={a = [1.0]}", "model.depth_ranges.a", "[1.0]"),
    ("model.overrides={num_layers = 'two'}", "model.overrides.num_layers", "'two'"),
    ("model.overrides={depth_condition = 1}", "model.overrides.depth_condition", "1"),
    ("noise.mode='async'", "noise.mode", "'async'"),
    ("noise.p_clean_action=1.5", "noise.p_clean_action", "1.5"),
    ("noise.p_drop_text=-0.1", "noise.p_drop_text", "-0.1"),
    ("noise.lag_beta_a=0", "noise.lag_beta_a", "0.0"),
    ("noise.lag_beta_b=-1", "noise.lag_beta_b", "-1.0"),
    ("noise.shift=0", "noise.shift", "0.0"),
    ("train.out=''", "train.out", "''"),
    ("train.max_steps=0", "train.max_steps", "0"),
    ("train.lr=0", "train.lr", "0.0"),
    ("train.lr=-1e-4", "train.lr", "-0.0001"),
    ("train.weight_decay=-0.1", "train.weight_decay", "-0.1"),
    ("train.betas=[0.9]", "train.betas", "[0.9]"),
    ("train.betas=[0.9, 1.0]", "train.betas", "[0.9, 1.0]"),
    ("train.betas=[-0.1, 0.999]", "train.betas", "[-0.1, 0.999]"),
    ("train.warmup_steps=-1", "train.warmup_steps", "-1"),
    ("train.min_lr_ratio=1.5", "train.min_lr_ratio", "1.5"),
    ("train.action_lr_scale=0", "train.action_lr_scale", "0.0"),
    ("train.grad_clip=-1", "train.grad_clip", "-1.0"),
    ("train.mixed_precision='fp8'", "train.mixed_precision", "'fp8'"),
    ("train.ema_decay=1.0", "train.ema_decay", "1.0"),
    ("train.val_every=-1", "train.val_every", "-1"),
    ("train.val_batches=0", "train.val_batches", "0"),
    ("train.checkpoint_every=-5", "train.checkpoint_every", "-5"),
    ("train.keep_last=-1", "train.keep_last", "-1"),
    ("train.log_every=-1", "train.log_every", "-1"),
    ("train.lora_rank=-4", "train.lora_rank", "-4"),
    ("train.augment.crop_scale=0", "train.augment.crop_scale", "0.0"),
    ("train.augment.crop_scale=1.2", "train.augment.crop_scale", "1.2"),
    ("train.augment.brightness=-0.2", "train.augment.brightness", "-0.2"),
    ("train.augment.contrast=2", "train.augment.contrast", "2.0"),
    ("train.augment.saturation=-1", "train.augment.saturation", "-1.0"),
    ("train.augment.hue=0.7", "train.augment.hue", "0.7"),
    ("inference.schedule='parallel'", "inference.schedule", "'parallel'"),
    ("inference.num_steps_video=0", "inference.num_steps_video", "0"),
    ("inference.num_steps_action=60", "inference.num_steps_action", "60"),
    ("inference.shift=-1", "inference.shift", "-1.0"),
    ("inference.solver_order=4", "inference.solver_order", "4"),
    ("inference.unipc_impl='euler'", "inference.unipc_impl", "'euler'"),
    ("inference.guidance_scale=0.5", "inference.guidance_scale", "0.5"),
    ("inference.action_noise_scale=-1", "inference.action_noise_scale", "-1.0"),
    ("train.executed_action_weight=0", "train.executed_action_weight", "0.0"),
    ("train.executed_action_weight=inf", "train.executed_action_weight", "inf"),
    # NaN and infinity are refused wherever a number goes, in sections and in free-form tables
    ("train.lr=nan", "train.lr", "nan"),
    ("train.grad_clip=inf", "train.grad_clip", "inf"),
    ("model.depth_far=-inf", "model.depth_far", "-inf"),
    ("model.overrides={gate_init_logit = nan}", "model.overrides.gate_init_logit", "nan"),
    ("model.depth_ranges={a = [0.1, inf]}", "model.depth_ranges.a[1]", "inf"),
]


@pytest.mark.parametrize(("override", "key", "value"), OUT_OF_RANGE, ids=[row[0] for row in OUT_OF_RANGE])
def test_out_of_range_settings_are_one_line_naming_file_key_value_and_range(tmp_path, override, key, value):
    path = write(tmp_path, "name = 'ranges'\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path, [override])
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path} (with --set overrides): "), message
    assert f"{key}: expected " in message or f"key '{key}' expects " in message, message
    assert message.endswith(f", got {value}"), message


def test_range_edges_are_accepted():
    """The edge of every range is a valid setting (0 workers, 0 = keep every checkpoint, betas at 0, ...)."""
    load_recipe(
        None,
        [
            "data.num_workers=0",
            "data.val_episodes=0",
            "train.keep_last=0",
            "train.val_every=0",
            "train.checkpoint_every=0",
            "train.warmup_steps=0",
            "train.grad_clip=0",
            "train.ema_decay=0",
            "train.min_lr_ratio=1",
            "train.betas=[0, 0.5]",
            "train.augment.crop_scale=1",
            "train.augment.hue=0.5",
            "prepare.metaworld.size=256",
            "prepare.metaworld.max_steps=500",
            "inference.num_steps_action=50",
            "inference.action_noise_scale=0",
        ],
    )


def test_inference_actions_per_query_is_checked():
    from xwam_core.errors import RecipeError
    from xwam_core.recipe import load_recipe

    assert (
        load_recipe(RECIPES / "tiny_cpu.toml", ["inference.actions_per_query=4"]).inference.actions_per_query
        == 4
    )
    with pytest.raises(RecipeError, match=r"inference\.actions_per_query: expected an integer >= 0"):
        load_recipe(RECIPES / "tiny_cpu.toml", ["inference.actions_per_query=-1"])
    with pytest.raises(
        RecipeError, match=r"inference\.actions_per_query: expected 0 \(the whole chunk\) to the chunk's 4"
    ):
        load_recipe(RECIPES / "tiny_cpu.toml", ["data.future_frames=2", "data.frame_stride=2"])

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

"""Recipe files and model overrides that used to end in a traceback or be silently ignored are one line."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.run_fixtures import TINY
from xwam_core.errors import RecipeError
from xwam_core.recipe import LAYOUT_DECIDES, load_recipe


def test_a_byte_order_mark_is_read_past(tmp_path):
    recipe = tmp_path / "bom.toml"
    recipe.write_bytes(b"\xef\xbb\xbf" + TINY.read_bytes())
    assert load_recipe(recipe) == load_recipe(TINY)


def test_a_path_that_is_not_a_regular_file_says_so(tmp_path):
    fifo = tmp_path / "pipe.toml"
    os.mkfifo(fifo)
    for path in (fifo, Path(os.devnull)):
        with pytest.raises(RecipeError, match="not a regular file; expected a recipe TOML file"):
            load_recipe(path)
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.toml")


def test_a_recipe_nested_too_deeply_is_one_line(tmp_path):
    recipe = tmp_path / "deep.toml"
    recipe.write_text("a = " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(RecipeError, match="nested too deeply"):
        load_recipe(recipe)


@pytest.mark.parametrize("name", sorted(LAYOUT_DECIDES))
def test_overrides_the_data_layout_would_replace_are_refused(name):
    with pytest.raises(RecipeError, match=rf"model\.overrides\.{name}: set by the data layout"):
        load_recipe(TINY, [f"model.overrides={{{name} = 1}}"])


def test_a_tuple_setting_is_not_an_override():
    with pytest.raises(
        RecipeError, match=r"model\.overrides\.patch_size: the preset fixes it \(\[1, 2, 2\]\)"
    ):
        load_recipe(TINY, ["model.overrides={patch_size = 2}"])


def test_a_rope_table_shorter_than_the_grid_is_one_line(tmp_path):
    """rope_max_seq_len below the latent grid: one line naming it (was a bare reshape error in the forward)."""
    from tests.conftest import SyntheticSource, write_store
    from tests.run_fixtures import tiny_overrides
    from xwam_core.errors import XWAMError
    from xwam_core.train import train

    store = tmp_path / "store"
    write_store(store, SyntheticSource(episodes=2, length=10, size=(32, 32), views=("a",)))
    overrides = [o for o in tiny_overrides(store, tmp_path / "run") if not o.startswith("model.overrides")]
    recipe = load_recipe(
        TINY, [*overrides, "model.overrides={num_layers = 1, num_depth_blocks = 1, rope_max_seq_len = 1}"]
    )
    with pytest.raises(XWAMError, match="exceeds the model's rope_max_seq_len=1"):
        train(recipe)

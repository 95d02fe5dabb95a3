"""`xwam convert` on bad input: one `error:` line naming the file, the key and the value, a non-zero exit,
and nothing written at --out (no folder, no half-written temporary). Never the "this is a bug in xwam" line.

xwam-v0 cases damage a copy of a v0 checkpoint rebuilt from the tiny trained checkpoint
(tests.test_checkpoint_policy.make_v0_checkpoint); xwam-release cases damage the tiny release experiment of
tests.test_convert_release. Everything is built here; nothing is downloaded.
"""

from __future__ import annotations

import json
import pickle
import shutil
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest
import tomli_w
import torch

from tests.run_fixtures import app, one_line_error, runner, tiny_checkpoint
from tests.test_checkpoint_policy import make_v0_checkpoint
from tests.test_convert_release import (
    PROMPTS,
    SPATIAL,
    TEMPORAL,
    TEXT_DIM,
    make_experiment,
    nothing_written,
    release_config,
    release_tensors,
    wan_original,
)
from tests.umt5_fixtures import make_umt5_dir

BUG_LINE = "this is a bug in xwam"


def refused(result, out: Path, *needles: str) -> None:
    """One error line holding every needle, no bug-line, a non-zero exit, nothing at `out`."""
    one_line_error(result, *needles)
    assert BUG_LINE not in result.output, result.output
    assert nothing_written(out.parent, out), sorted(p.name for p in out.parent.iterdir())


# ------------------------------------------------------------------------------------ xwam-v0
@pytest.fixture(scope="module")
def v0_pristine(tmp_path_factory) -> Path:
    store, ckpt = tiny_checkpoint(tmp_path_factory)
    return make_v0_checkpoint(ckpt, store, tmp_path_factory.mktemp("v0") / "v0")


def set_json(name: str, key: str, value: object = None, delete: bool = False) -> Callable[[Path], None]:
    def damage(v0: Path) -> None:
        table = json.loads((v0 / name).read_text())
        if delete:
            del table[key]
        else:
            table[key] = value
        (v0 / name).write_text(json.dumps(table))

    return damage


def set_recipe(section: str, key: str, value: object) -> Callable[[Path], None]:
    def damage(v0: Path) -> None:
        recipe = tomllib.loads((v0 / "recipe.toml").read_text())
        recipe.setdefault(section, {})[key] = value
        (v0 / "recipe.toml").write_text(tomli_w.dumps(recipe))

    return damage


V0_CASES = {
    # [inference] settings are type-checked and validated (findings: convert wrote an unloadable checkpoint)
    "inference-str": (
        set_recipe("inference", "num_steps_action", "x"),
        ["inference.num_steps_action", "'x'"],
    ),
    "inference-zero": (
        set_recipe("inference", "num_steps_action", 0),
        ["inference.num_steps_action", "got 0"],
    ),
    "inference-beyond-chunk": (
        set_recipe("inference", "actions_per_query", 999),
        ["inference.actions_per_query", "[0, 8]", "got 999"],
    ),
    "inference-not-a-table": (
        lambda v0: (v0 / "recipe.toml").write_text("inference = 3\n"),
        ["recipe.toml", "'inference'", "expects a table"],
    ),
    "val-episodes-str": (set_recipe("data", "val_episodes", "x"), ["data.val_episodes", "'x'"]),
    "val-episodes-negative": (set_recipe("data", "val_episodes", -1), ["data.val_episodes", "got -1"]),
    "preset-int": (set_recipe("model", "preset", 3), ["model.preset", "integer 3"]),
    "preset-unknown": (set_recipe("model", "preset", "huge"), ["model.preset", "'huge'"]),
    "recipe-binary": (
        lambda v0: (v0 / "recipe.toml").write_bytes(b"\xff\xfe\x00"),
        ["recipe.toml", "not UTF-8"],
    ),
    # layout.json
    "layout-no-tasks": (set_json("layout.json", "tasks", delete=True), ["layout.json", "lacks 'tasks'"]),
    "layout-no-views": (set_json("layout.json", "views", delete=True), ["layout.json", "lacks 'views'"]),
    "layout-views-str": (
        set_json("layout.json", "views", "corner2"),
        ["layout.json", "'views' is 'corner2'"],
    ),
    "layout-image-size-str": (
        set_json("layout.json", "image_size", "x"),
        ["layout.json", "'image_size' is 'x'", "[height, width]"],
    ),
    "layout-action-dim-str": (
        set_json("layout.json", "action_dim", "x"),
        ["layout.json", "'action_dim' is 'x'", "integer >= 1"],
    ),
    "layout-store-int": (set_json("layout.json", "store", 3), ["layout.json", "'store' is 3"]),
    "layout-list": (
        lambda v0: (v0 / "layout.json").write_text("[]"),
        ["layout.json", "holds [], expected a JSON object"],
    ),
    # text.json and text.safetensors
    "text-no-kind": (set_json("text.json", "kind", delete=True), ["text.json", "lacks 'kind'"]),
    "text-kind-unknown": (set_json("text.json", "kind", "foo"), ["text.json", "'kind' is 'foo'"]),
    "text-umt5-no-cache": (set_json("text.json", "kind", "umt5"), ["text.json", "'cache' is ''"]),
    "text-seq-len-str": (set_json("text.json", "seq_len", "x"), ["text.json", "'seq_len' is 'x'"]),
    "text-seq-len-mismatch": (
        set_json("text.json", "seq_len", 99),
        ["text.safetensors", "'embedding' has shape (3, 8, 64)", "seq_len 99"],
    ),
    "text-tensors-zero-bytes": (
        lambda v0: (v0 / "text.safetensors").write_bytes(b""),
        ["text.safetensors: unreadable", "SafetensorError"],
    ),
    "text-tensors-missing": (lambda v0: (v0 / "text.safetensors").unlink(), ["lacks text.safetensors"]),
    # stats.json, trainer.json
    "stats-list": (
        lambda v0: (v0 / "stats.json").write_text("[1]"),
        ["stats.json", "expected a JSON object"],
    ),
    "stats-strings": (
        lambda v0: (v0 / "stats.json").write_text(json.dumps({"action": {"q01": ["a"] * 4}})),
        ["stats.json", "'action.q01'", "list of numbers"],
    ),
    "stats-wrong-width": (
        set_json("layout.json", "action_dim", 5),
        ["stats.json", "action statistics", "action_dim 5"],
    ),
    "trainer-step-str": (set_json("trainer.json", "step", "x"), ["trainer.json", "'step' is 'x'"]),
}


@pytest.mark.parametrize("case", list(V0_CASES))
def test_a_bad_v0_checkpoint_is_one_line_naming_the_file_and_key(case, v0_pristine, tmp_path):
    damage, needles = V0_CASES[case]
    v0 = tmp_path / "V0"
    shutil.copytree(v0_pristine, v0)
    damage(v0)
    out = tmp_path / "out"
    result = runner.invoke(app(), ["convert", "xwam-v0", str(v0), "--out", str(out)])
    refused(result, out, *needles)
    # the file named is this folder's (recipe/layout/text/... of V0), not another
    assert str(v0) in result.output.replace("\n", ""), result.output


def test_the_pristine_v0_copy_converts(v0_pristine, tmp_path):
    """The damage above is all that makes those cases fail."""
    out = tmp_path / "out"
    result = runner.invoke(app(), ["convert", "xwam-v0", str(v0_pristine), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "inference.json").read_text())["num_steps_action"] >= 1


# ------------------------------------------------------------------------------------ xwam-release
@pytest.fixture(scope="module")
def release_env(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("release-env")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return {
        "wan": wan_original(root),
        "umt5": make_umt5_dir(root / "umt5", d_model=TEXT_DIM),
        "prompts": prompts,
    }


def convert_release(exp: Path, out: Path, env: dict[str, Path], *extra: str):
    args = ["convert", "xwam-release", str(exp), "--wan", str(env["wan"]), "--prompts", str(env["prompts"]),
            "--text-encoder", str(env["umt5"]), "--codec", f"pixel:{SPATIAL}:{TEMPORAL}", "--out", str(out),
            *extra]  # fmt: skip
    return runner.invoke(app(), args)


def model_states(exp: Path) -> Path:
    return exp / "checkpoints" / "last.ckpt" / "checkpoint" / "mp_rank_00_model_states.pt"


class Marker:
    """A class of this module: torch's restricted loader refuses to build it."""


def text_file(exp: Path) -> None:
    model_states(exp).write_text("hello, not a checkpoint\n")


def int_key(exp: Path) -> None:
    torch.save({"module": {1: torch.zeros(1)}}, model_states(exp))


RELEASE_STATES_CASES = {
    "text-file": (text_file, ["mp_rank_00_model_states.pt", "not a readable torch checkpoint", "KeyError"]),
    "int-key": (int_key, ["mp_rank_00_model_states.pt", "'module' has the key 1 (int)"]),
}


@pytest.mark.parametrize("case", list(RELEASE_STATES_CASES))
def test_a_bad_release_model_states_file_is_one_line(case, release_env, tmp_path):
    damage, needles = RELEASE_STATES_CASES[case]
    exp = make_experiment(tmp_path)
    damage(exp)
    out = tmp_path / "out"
    refused(convert_release(exp, out, release_env), out, *needles)
    # no offer of the unsafe loader for bytes that are no pickle at all
    assert "--allow-unsafe-pickle" not in convert_release(exp, out, release_env).output


@pytest.mark.parametrize(
    ("key", "needle"),
    [
        ("text_len", "'text_len' is 'xx', expected a number"),
        ("use_depth", "'use_depth' is 'xx', expected true or false"),
        ("use_decoupled_inference", "'use_decoupled_inference' is 'xx', expected true or false"),
        ("inverse_gripper", "'dataset.inverse_gripper' is 'xx', expected true or false"),
    ],
)
def test_a_bad_release_config_value_is_one_line(key, needle, release_env, tmp_path):
    config = release_config()
    if key == "inverse_gripper":
        config["dataset"] = {**config["dataset"], key: "xx"}
    else:
        config[key] = "xx"
    exp = make_experiment(tmp_path, config=config)
    out = tmp_path / "out"
    refused(convert_release(exp, out, release_env), out, "config.yaml", needle)


def test_a_zero_text_len_is_refused(release_env, tmp_path):
    exp = make_experiment(tmp_path, config=release_config(text_len=0))
    out = tmp_path / "out"
    refused(
        convert_release(exp, out, release_env),
        out,
        "config.yaml",
        "'text_len' is 0, expected an integer >= 1",
    )


def test_the_unsafe_pickle_opt_in_is_unchanged(release_env, tmp_path):
    """A global the restricted loader refuses still names --allow-unsafe-pickle (and loads nothing unsafely
    without it); with the opt-in, a file the full unpickler cannot read either is one line, not a bug-line."""
    exp = make_experiment(tmp_path, extra={"hyper_parameters": Marker()})
    out = tmp_path / "out"
    refused(
        convert_release(exp, out, release_env),
        out,
        "safe loader refuses it",
        "Marker",
        "--allow-unsafe-pickle",
    )
    # a plain pickle the restricted loader refuses, truncated: the full unpickler fails on it too
    model_states(exp).write_bytes(pickle.dumps({"module": {"model.x": 1}})[:-6])
    refused(convert_release(exp, out, release_env), out, "--allow-unsafe-pickle")
    refused(
        convert_release(exp, out, release_env, "--allow-unsafe-pickle"),
        out,
        "mp_rank_00_model_states.pt: not a readable torch checkpoint",
    )


def test_the_pristine_release_experiment_converts(release_env, tmp_path):
    """The damage above is all that makes those cases fail."""
    exp = make_experiment(tmp_path, tensors=release_tensors())
    result = convert_release(exp, tmp_path / "out", release_env)
    assert result.exit_code == 0, result.output

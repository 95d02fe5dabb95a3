"""A damaged or inconsistent checkpoint is refused in one line when it is loaded (not on every request, and
never by running on with wrong embeddings), a pickled weights file is never read, and the Policy refuses
observations it cannot act on instead of returning NaN actions."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.run_fixtures import app, one_line_error, runner, tiny_checkpoint
from xwam_core.checkpoint import MARKER, load_policy_parts
from xwam_core.errors import XWAMError
from xwam_core.policy import Policy

WEIGHTS = "model/diffusion_pytorch_model.safetensors"


def _edit_json(name: str, change: Callable[[Any], Any]) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        (folder / name).write_text(json.dumps(change(json.loads((folder / name).read_text()))))

    return damage


def _set(name: str, key: str, value: Any) -> Callable[[Path], None]:
    return _edit_json(name, lambda d: {**d, key: value})


def _pickled_weights(folder: Path) -> None:
    """The model's weights as a torch pickle (.bin) in place of its safetensors: what diffusers would fall
    back to unpickling."""
    weights = load_file(folder / WEIGHTS)
    (folder / WEIGHTS).unlink()
    torch.save(weights, folder / "model" / "diffusion_pytorch_model.bin")


def _drop_one_weight(folder: Path) -> None:
    weights = load_file(folder / WEIGHTS)
    weights.pop(sorted(weights)[0])
    save_file(weights, folder / WEIGHTS)


def _text_for_three_tasks(folder: Path) -> None:
    tensors = load_file(folder / "text.safetensors")
    save_file({k: torch.cat([v, v[:1]]) for k, v in tensors.items()}, folder / "text.safetensors")


DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    # case: (damage, what the one line must say)
    "pickled weights": (_pickled_weights, "no diffusion_pytorch_model.safetensors"),
    "no model folder": (lambda f: shutil.rmtree(f / "model"), "checkpoint lacks model/"),
    "model config a list": (
        lambda f: (f / "model" / "config.json").write_text("[1, 2]"),
        "expected a JSON object",
    ),
    "a weight missing": (_drop_one_weight, "the weights lack"),
    "tasks in another order": (
        _edit_json("data_spec.json", lambda d: {**d, "tasks": d["tasks"][::-1]}),
        "differ from data_spec.json's",
    ),
    "text.json without tasks": (
        _edit_json("text.json", lambda d: {k: v for k, v in d.items() if k != "tasks"}),
        "'tasks' is null",
    ),
    "text.json of an unknown kind": (_set("text.json", "kind", "foo"), "'kind' is 'foo'"),
    "seq_len a string": (_set("text.json", "seq_len", "x"), "'seq_len' is 'x'"),
    "text tensors for another task count": (_text_for_three_tasks, "text.safetensors: tensors"),
    "image_size a string": (_set("data_spec.json", "image_size", "32"), "'image_size' is '32'"),
    "image_size zero": (_set("data_spec.json", "image_size", [0, 0]), "both > 0"),
    "views a string": (_set("data_spec.json", "views", "a"), "'views' is 'a'"),
    "views empty": (_set("data_spec.json", "views", []), "'views' is []"),
    "a chunk the model does not predict": (_set("data_spec.json", "future_frames", 2), "num_actions=8"),
    "more views than the model has": (
        _set("data_spec.json", "views", ["a", "b", "c", "d", "e"]),
        "num_views=",
    ),
    "action steps a float": (
        _set("inference.json", "num_steps_action", 2.5),
        "'num_steps_action' expects an integer",
    ),
    "action steps a string": (_set("inference.json", "num_steps_action", "2"), "got string '2'"),
    "action steps zero": (
        _set("inference.json", "num_steps_action", 0),
        "inference.json: inference.num_steps_action",
    ),
    "actions per query a float": (_set("inference.json", "actions_per_query", 2.5), "'actions_per_query'"),
    "step a string": (_set(MARKER, "step", "abc"), "'step' is 'abc'"),
    "codec factor missing": (
        _edit_json("codec.json", lambda d: {k: v for k, v in d.items() if k != "spatial_factor"}),
        "'spatial_factor' is None",
    ),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_damaged_checkpoint_is_refused_when_loaded(case, tmp_path_factory, tmp_path):
    _, ckpt = tiny_checkpoint(tmp_path_factory)
    damage, needle = DAMAGE[case]
    broken = tmp_path / "ckpt"
    shutil.copytree(ckpt, broken)
    damage(broken)
    with pytest.raises(XWAMError) as caught:
        Policy.from_checkpoint(broken)
    message = str(caught.value)
    assert needle in message and "\n" not in message, message


def test_a_pickled_weights_file_is_never_unpickled(tmp_path_factory, tmp_path, monkeypatch):
    """diffusers falls back to torch.load for a .bin; loading must refuse before any unpickling happens."""
    store, ckpt = tiny_checkpoint(tmp_path_factory)
    broken = tmp_path / "ckpt"
    shutil.copytree(ckpt, broken)
    _pickled_weights(broken)

    def no_unpickling(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("torch.load was called on a checkpoint's weights")

    monkeypatch.setattr(torch, "load", no_unpickling)
    result = runner.invoke(
        app(), ["infer", "--ckpt", str(broken), "--data", str(store), "--out", str(tmp_path / "out")]
    )
    one_line_error(result, "no diffusion_pytorch_model.safetensors", "never loaded")
    assert not (tmp_path / "out").exists()


def test_an_undecodable_recipe_record_does_not_stop_loading(tmp_path_factory, tmp_path):
    """recipe.toml is a record of the training, never parsed: its bytes do not decide whether the model loads."""
    _, ckpt = tiny_checkpoint(tmp_path_factory)
    copy = tmp_path / "ckpt"
    shutil.copytree(ckpt, copy)
    (copy / "recipe.toml").write_bytes(b"\xff\xfe[train]\n")
    assert "[train]" in load_policy_parts(copy).recipe_toml


@pytest.fixture
def policy_and_observation(tmp_path_factory) -> tuple[Policy, dict[str, Any]]:
    _, ckpt = tiny_checkpoint(tmp_path_factory)
    policy = Policy.from_checkpoint(ckpt)
    h, w = policy.spec.image_size
    obs = {
        "images": {v: np.zeros((h, w, 3), np.uint8) for v in policy.spec.views},
        "state": np.zeros(policy.normalizer.state_dim, np.float32),
        "task": policy.spec.tasks[0],
    }
    return policy, obs


def test_a_state_that_overflows_the_model_gets_an_error_not_nan_actions(policy_and_observation):
    policy, obs = policy_and_observation
    assert np.isfinite(policy.predict_chunk(obs)).all()
    with pytest.raises(XWAMError, match="prediction holds NaN or infinite values"):
        policy.predict_chunk({**obs, "state": np.full_like(obs["state"], 1e30)})


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"state": "nan"}, "'state' holds NaN or infinite values"),
        ({"state": "inf"}, "'state' holds NaN or infinite values"),
        ({"state": "beyond float32"}, "beyond float32's range"),
        ({"state": "words"}, "'state' has dtype <U"),
        ({"state": "complex"}, "'state' has dtype complex"),
        ({"state": "empty batch"}, "empty batch"),
        ({"task": 3}, "'task' is 3"),
        ({"task": None}, "'task' is None"),
        ({"task": b"t0"}, "'task' is b't0'"),
    ],
)
def test_observations_the_policy_cannot_act_on_are_one_line(policy_and_observation, change, needle):
    policy, obs = policy_and_observation
    d = obs["state"].shape[0]
    states = {
        "nan": np.full(d, np.nan),
        "inf": np.full(d, np.inf),
        "beyond float32": np.full(d, 1e300),
        "words": ["a"] * d,
        "complex": np.zeros(d, np.complex64),
        "empty batch": np.zeros((0, d)),
    }
    bad = {**obs, **{k: states[v] if k == "state" else v for k, v in change.items()}}
    with pytest.raises(XWAMError) as caught:
        policy.predict_chunk(bad)
    assert needle in str(caught.value), str(caught.value)


def test_the_policy_refuses_a_non_mapping_and_bad_seeds(policy_and_observation):
    policy, _ = policy_and_observation
    with pytest.raises(XWAMError, match="observation is NoneType"):
        policy.predict_chunk(None)  # type: ignore[arg-type]
    for seed in ("abc", 1.5, -1, True):
        with pytest.raises(XWAMError, match="seed"):
            policy.reset(seed=seed)  # type: ignore[arg-type]
    policy.reset(seed=np.int64(3))


def test_actions_per_query_must_be_an_integer(tmp_path_factory):
    _, ckpt = tiny_checkpoint(tmp_path_factory)
    with pytest.raises(XWAMError, match=r"actions per query 2\.5"):
        Policy.from_checkpoint(ckpt, actions_per_query=2.5)  # type: ignore[arg-type]
    with pytest.raises(XWAMError, match=r"inference\.num_steps_action: expected an integer, got 1\.5"):
        Policy.from_checkpoint(ckpt, num_steps_action=1.5)  # type: ignore[arg-type]

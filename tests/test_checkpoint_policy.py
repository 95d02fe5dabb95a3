"""The checkpoint folder is self-describing, the Policy is the one way observations become actions, LoRA
fine-tuning ends in a checkpoint everything loads, and older checkpoints convert."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import SyntheticSource, write_store
from tests.run_fixtures import ROOT, app, one_line_error, runner, tiny_checkpoint, tiny_overrides
from xwam_core.checkpoint import MARKER, checkpoint_dirs, load_policy_parts
from xwam_core.data.reader import EpisodeStore
from xwam_core.data.windows import WindowDataset
from xwam_core.errors import XWAMError
from xwam_core.policy import Policy

TINY = ROOT / "recipes" / "tiny_cpu.toml"


def observation(store: EpisodeStore, views: list[str], window: dict) -> dict:
    return {
        "images": {v: window["rgb"][j, 0] for j, v in enumerate(views)},
        "state": window["states"][0],
        "task": store.episodes[int(window["episode_index"])].task,
    }


def test_a_checkpoint_copied_alone_loads_and_acts_the_same(tmp_path_factory, tmp_path):
    store_path, ckpt = tiny_checkpoint(tmp_path_factory)
    alone = tmp_path / "elsewhere" / "ckpt"
    shutil.copytree(ckpt, alone)
    # nothing outside the folder is read: the training store is gone for this load
    moved_store = tmp_path / "store-moved"
    shutil.copytree(store_path, moved_store)
    parts = load_policy_parts(alone)
    assert parts.data.views == ["a", "b"] and parts.normalizer.action_dim == 4 and parts.step == 2
    assert json.loads((alone / MARKER).read_text())["format"] == 1
    store = EpisodeStore(moved_store)
    window = WindowDataset(store, parts.data.window, episodes=[2], normalize=False)[0]
    obs = observation(store, parts.data.views, window)
    a = Policy.from_checkpoint(ckpt).predict(obs, generator=torch.Generator().manual_seed(3)).actions
    b = Policy.from_checkpoint(alone).predict(obs, generator=torch.Generator().manual_seed(3)).actions
    np.testing.assert_array_equal(a, b)
    assert a.shape == (1, 8, 4)


def test_the_policy_normalizes_with_the_checkpoint_statistics(tmp_path_factory):
    """One normalizer: the state the model sees is 2 (x - q01) / (q99 - q01) - 1 with the TRAINING store's
    quantiles, and predicted actions come back through the inverse map."""
    store_path, ckpt = tiny_checkpoint(tmp_path_factory)
    policy = Policy.from_checkpoint(ckpt)
    stats = json.loads((store_path / "meta" / "stats.json").read_text())
    q01, q99 = np.asarray(stats["observation.state"]["q01"]), np.asarray(stats["observation.state"]["q99"])
    store = EpisodeStore(store_path)
    window = WindowDataset(store, policy.spec.window, episodes=[2], normalize=False)[0]
    obs = observation(store, policy.spec.views, window)
    _, state0, _, _ = policy._inputs(obs, with_depth=False)
    expected = 2 * (window["states"][0] - q01) / (q99 - q01) - 1
    np.testing.assert_allclose(state0[0].numpy(), expected, rtol=1e-5, atol=1e-5)
    a01, a99 = np.asarray(stats["action"]["q01"]), np.asarray(stats["action"]["q99"])
    ones = policy.normalizer.action.denormalize(np.ones((1, 4), np.float32))
    np.testing.assert_allclose(ones[0], a99, rtol=1e-5)  # +1 is the 99th percentile
    np.testing.assert_allclose(policy.normalizer.action.denormalize(-np.ones(4, np.float32)), a01, rtol=1e-5)
    # the training windows use the same normalizer on the store's statistics
    normalized = WindowDataset(store, policy.spec.window, episodes=[2])[0]
    np.testing.assert_allclose(normalized["states"][0], expected, rtol=1e-5, atol=1e-5)


def test_select_action_queues_the_chunk_and_reset_clears_it(tmp_path_factory):
    store_path, ckpt = tiny_checkpoint(tmp_path_factory)
    policy = Policy.from_checkpoint(ckpt, actions_per_query=3)
    store = EpisodeStore(store_path)
    obs = observation(
        store, policy.spec.views, WindowDataset(store, policy.spec.window, episodes=[2], normalize=False)[0]
    )
    policy.reset(seed=1)
    chunk = Policy.from_checkpoint(ckpt)
    chunk.reset(seed=1)
    expected = chunk.predict_chunk(obs)
    got = [policy.select_action(obs) for _ in range(3)]
    np.testing.assert_array_equal(np.stack(got), expected[:3])
    assert len(policy.query_latencies_s) == 1 and policy.wants_observation  # 3 executed, then query again
    policy.select_action(obs)
    assert len(policy.query_latencies_s) == 2
    policy.reset()
    assert policy.wants_observation and policy.query_latencies_s == []


def test_actions_per_query_defaults_to_the_checkpoints_inference_setting(tmp_path_factory):
    """inference.actions_per_query (0: the whole chunk, what older checkpoints mean) is the Policy's
    default; an explicit argument wins; out of range is one error."""
    from dataclasses import replace

    _, ckpt = tiny_checkpoint(tmp_path_factory)
    parts = load_policy_parts(ckpt)
    k = parts.data.window.num_actions
    parts.inference = replace(parts.inference, actions_per_query=0)
    assert Policy(parts).actions_per_query == k
    parts.inference = replace(parts.inference, actions_per_query=4)
    assert Policy(parts).actions_per_query == 4 and Policy(parts, actions_per_query=2).actions_per_query == 2
    parts.inference = replace(parts.inference, actions_per_query=k + 1)
    with pytest.raises(XWAMError, match="actions per query"):
        Policy(parts)


def test_bad_observations_are_one_clear_error(tmp_path_factory):
    store_path, ckpt = tiny_checkpoint(tmp_path_factory)
    policy = Policy.from_checkpoint(ckpt)
    store = EpisodeStore(store_path)
    good = observation(
        store, policy.spec.views, WindowDataset(store, policy.spec.window, episodes=[2], normalize=False)[0]
    )
    cases = {
        "lacks 'state'": {k: v for k, v in good.items() if k != "state"},
        "lacks view 'b'": {**good, "images": {"a": good["images"]["a"]}},
        "expected uint8 (32, 32, 3)": {
            **good,
            "images": {**good["images"], "a": good["images"]["a"].astype(np.float32)},
        },
        "'state' has shape (3,)": {**good, "state": np.zeros(3)},
        "was not seen in training": {**good, "task": "fly"},
    }
    for message, obs in cases.items():
        with pytest.raises(XWAMError, match=message.replace("(", r"\(").replace(")", r"\)")):
            policy.predict(obs)


def test_lora_finetune_infers_evaluates_resumes_and_finetunes_again(tmp_path_factory, tmp_path):
    """LoRA fine-tuning -> policy and world inference -> closed loop -> resume -> fine-tune again."""
    pytest.importorskip("peft")
    from tests.run_fixtures import MW_HAND_STATE, metaworld_checkpoint
    from xwam_core.recipe import load_recipe
    from xwam_core.train import Trainer, train

    base = metaworld_checkpoint(tmp_path_factory)
    store = tmp_path / "store"
    write_store(
        store,
        SyntheticSource(
            episodes=2,
            length=12,
            size=(64, 64),
            views=("corner2", "gripperPOV"),
            tasks=("reach-v3",),
            state_names=MW_HAND_STATE,
        ),
    )
    out = tmp_path / "lora"
    overrides = [*tiny_overrides(store, out, steps=4), "train.lora_rank=4", "train.checkpoint_every=2"]
    full = train(load_recipe(TINY, overrides), init=base)
    ckpt = full.checkpoint
    weights = load_file(ckpt / "model" / "diffusion_pytorch_model.safetensors")
    assert not [k for k in weights if "lora" in k or "base_layer" in k]  # a plain model: adapters merged
    trainable = load_file(ckpt / "training" / "trainable.safetensors")
    assert any("lora_A" in k for k in trainable) and not any("to_q.base_layer" in k for k in trainable)
    base_weights = load_file(base / "model" / "diffusion_pytorch_model.safetensors")
    key = "wan.blocks.0.attn1.to_q.weight"
    assert not torch.equal(weights[key], base_weights[key])  # the adapted projection moved
    assert torch.equal(
        weights["wan.blocks.0.ffn.net.2.weight"], base_weights["wan.blocks.0.ffn.net.2.weight"]
    )

    # infer in both modes and evaluate closed loop through the CLI
    for mode in ("policy", "world"):
        result = runner.invoke(
            app(),
            [
                "infer",
                "--ckpt",
                str(out),
                "--data",
                str(store),
                "--mode",
                mode,
                "--windows-per-episode",
                "1",
                "--out",
                str(tmp_path / f"infer-{mode}"),
            ],
        )
        assert result.exit_code == 0, result.output
    pytest.importorskip("metaworld")
    result = runner.invoke(
        app(),
        [
            "evaluate",
            "--sim",
            "metaworld",
            "--ckpt",
            str(out),
            "--tasks",
            "reach-v3",
            "--episodes",
            "1",
            "--max-steps",
            "3",
            "--no-baselines",
        ],
    )
    assert result.exit_code == 0, result.output

    # resume: a run stopped after step 2 (same recipe) and resumed equals the uninterrupted one, bit for bit
    half = tmp_path / "half"
    halves = [o if not o.startswith("train.out") else f"train.out={half}" for o in overrides]
    stopped = Trainer(load_recipe(TINY, halves), init=base)
    data = iter(stopped.loader)
    for _ in range(2):
        stopped.train_step(next(data))
    stopped.save()
    resumed = train(load_recipe(TINY, halves), init=base, resume="latest")
    a = load_file(resumed.checkpoint / "model" / "diffusion_pytorch_model.safetensors")
    for name, tensor in weights.items():
        assert torch.equal(tensor, a[name]), name
    assert [p.name for p in checkpoint_dirs(half)] == ["step-00000002", "step-00000004"]

    # and the LoRA checkpoint is a starting point like any other
    again = train(load_recipe(TINY, tiny_overrides(store, tmp_path / "again", steps=1)), init=ckpt)
    assert "tensors loaded" in again.init_report


def test_older_checkpoints_are_refused_with_the_command_that_converts_them(tmp_path_factory, tmp_path):
    store_path, ckpt = tiny_checkpoint(tmp_path_factory)
    old = make_v0_checkpoint(ckpt, store_path, tmp_path / "old")
    for command in (
        ["infer", "--ckpt", str(old), "--data", str(store_path), "--out", str(tmp_path / "run")],
        ["evaluate", "--sim", "metaworld", "--ckpt", str(old), "--tasks", "reach"],
    ):
        one_line_error(runner.invoke(app(), command), "older xwam", "xwam convert xwam-v0")
    new = tmp_path / "new"
    result = runner.invoke(app(), ["convert", "xwam-v0", str(old), "--out", str(new)])
    assert result.exit_code == 0, result.output
    converted, original = load_policy_parts(new), load_policy_parts(ckpt)
    assert converted.data.to_json() == original.data.to_json()
    assert converted.normalizer.to_json() == original.normalizer.to_json()
    store = EpisodeStore(store_path)
    obs = observation(
        store,
        original.data.views,
        WindowDataset(store, original.data.window, episodes=[2], normalize=False)[0],
    )
    a = Policy(original).predict(obs, mode="world", generator=torch.Generator().manual_seed(0))
    b = Policy(converted).predict(obs, mode="world", generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(a.actions, b.actions)
    np.testing.assert_array_equal(a.rgb, b.rgb)
    one_line_error(
        runner.invoke(app(), ["convert", "xwam-v0", str(tmp_path / "none"), "--out", str(new)]), "not found"
    )
    one_line_error(
        runner.invoke(app(), ["convert", "robomimic", str(old), "--out", str(new)]), "expected one of"
    )


def make_v0_checkpoint(ckpt: Path, store: Path, out: Path) -> Path:
    """The folder layout xwam wrote before checkpoint format 1, rebuilt from a format-1 checkpoint."""
    parts = load_policy_parts(ckpt)
    out.mkdir(parents=True)
    shutil.copytree(ckpt / "model", out / "model")
    save_file(load_file(ckpt / "text.safetensors"), out / "text.safetensors")
    (out / "text.json").write_text(
        json.dumps({"kind": "task", "tasks": parts.data.tasks, "seq_len": 8, "cache": ""})
    )
    layout = {**parts.data.to_json(), "action_dim": 4, "state_dim": 8, "store": str(store)}
    (out / "layout.json").write_text(json.dumps(layout))
    shutil.copy(store / "meta" / "stats.json", out / "stats.json")
    shutil.copy(ckpt / "recipe.toml", out / "recipe.toml")
    (out / "trainer.json").write_text(json.dumps({"step": parts.step}))
    return out


def test_damaged_checkpoints_are_one_line(tmp_path_factory, tmp_path):
    store_path, ckpt = tiny_checkpoint(tmp_path_factory)
    for name, damage in (
        ("normalizer.json", "{not json"),
        ("data_spec.json", json.dumps({"views": ["a"]})),
        (MARKER, json.dumps({"format": 99})),
    ):
        broken = tmp_path / name
        shutil.copytree(ckpt, broken)
        (broken / name).write_text(damage)
        one_line_error(
            runner.invoke(
                app(),
                ["infer", "--ckpt", str(broken), "--data", str(store_path), "--out", str(tmp_path / "r")],
            ),
            name if name != MARKER else "format 99",
        )

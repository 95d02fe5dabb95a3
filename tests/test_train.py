"""The training loop: it learns, splits over processes exactly, and refuses bad input with one line and
nothing written. Resuming after kills: test_train_kill.py; interrupts: test_train_interrupts.py; run folder
ownership: test_train_ownership.py; damaged checkpoints: test_train_damaged.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.conftest import SyntheticSource, free_port, write_store
from xwam_cli.main import app
from xwam_core.checkpoint import checkpoint_dirs
from xwam_core.models.transformer import XWAMTransformer
from xwam_core.recipe import load_recipe
from xwam_core.train import GlobalBatchSampler, train

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny_cpu.toml"
runner = CliRunner()


def tiny_overrides(store: Path, out: Path, steps: int = 6) -> list[str]:
    return [
        f"data.store={store}",
        "data.future_frames=4",
        "data.frame_stride=2",
        "data.batch_size=4",
        "data.num_workers=0",
        "data.val_episodes=1",
        "model.overrides={num_layers = 2, num_depth_blocks = 1}",
        f"train.max_steps={steps}",
        "train.checkpoint_every=2",
        "train.val_every=3",
        "train.warmup_steps=2",
        f"train.out={out}",
    ]


@pytest.fixture(scope="module")
def small_store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("train") / "store"
    write_store(path, SyntheticSource(episodes=3, length=20, size=(32, 32), views=("a", "b")))
    return path


def sets(overrides: list[str]) -> list[str]:
    """['a=1', 'b=2'] -> ['--set', 'a=1', '--set', 'b=2']"""
    return [arg for o in overrides for arg in ("--set", o)]


def test_global_batch_sampler_is_split_and_resumable():
    one = GlobalBatchSampler(20, 4, 0, 1, seed=3)
    r0, r1 = GlobalBatchSampler(20, 4, 0, 2, seed=3), GlobalBatchSampler(20, 4, 1, 2, seed=3)
    it1, it_r0, it_r1 = iter(one), iter(r0), iter(r1)
    batches = [next(it1) for _ in range(12)]  # crosses epochs (5 batches per epoch)
    for b in batches:
        assert b == next(it_r0) + next(it_r1)
    assert sorted(i for b in batches[:5] for i in b) == list(range(20))  # an epoch is a permutation
    resumed = iter(GlobalBatchSampler(20, 4, 0, 1, seed=3, start_step=7))
    assert [next(resumed) for _ in range(5)] == batches[7:12]


def test_training_reduces_loss_and_writes_a_run(small_store, tmp_path):
    out = tmp_path / "run"
    recipe = load_recipe(
        TINY,
        [
            *tiny_overrides(small_store, out, steps=30),
            "train.lr=3e-3",
            "train.val_every=10",
            "train.checkpoint_every=10",
            "train.keep_last=2",
        ],
    )
    result = train(recipe)
    first = sum(h["loss"] for h in result.history[:5]) / 5
    last = sum(h["loss"] for h in result.history[-5:]) / 5
    assert last < 0.85 * first, (first, last)
    assert [p.name for p in checkpoint_dirs(out)] == ["step-00000020", "step-00000030"]  # keep_last=2
    ckpt = result.checkpoint
    model = XWAMTransformer.from_pretrained(ckpt / "model")  # loadable with from_pretrained alone
    assert model.config.num_layers == 2 and model.config.action_dim == 4
    assert (out / "loss_curve.png").stat().st_size > 1000
    assert list((out / "logs").glob("events.out.tfevents.*"))
    assert load_recipe(ckpt / "recipe.toml") == recipe  # the resolved recipe rides with the checkpoint
    assert not list(ckpt.glob("*.pt")) and not list(ckpt.glob("*.bin")) and not list(ckpt.glob("*.pkl"))
    assert all("val_loss" in h for h in result.history if h["step"] % 10 == 0)


@pytest.mark.slow
def test_two_processes_match_one(small_store, tmp_path):
    """gloo, 2 CPU processes, same global batch: the same loss curve to float tolerance."""
    steps = 4
    one = tmp_path / "one"
    train(load_recipe(TINY, tiny_overrides(small_store, one, steps)))
    two = tmp_path / "two"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        "-m",
        "xwam_cli.main",
        "pretrain",
        str(TINY),
        *sets(tiny_overrides(small_store, two, steps)),
    ]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    h1 = json.loads((one / "checkpoints" / "step-00000004" / "training" / "trainer.json").read_text())[
        "history"
    ]
    h2 = json.loads((two / "checkpoints" / "step-00000004" / "training" / "trainer.json").read_text())[
        "history"
    ]
    assert (
        json.loads((two / "checkpoints" / "step-00000004" / "training" / "trainer.json").read_text())[
            "processes"
        ]
        == 2
    )
    for a, b in zip(h1, h2, strict=True):
        for key in ("loss", "video", "action", "state", "depth"):
            assert abs(a[key] - b[key]) <= 1e-4 * max(1.0, abs(a[key])), (a["step"], key, a[key], b[key])
    if "val_loss" in h1[-1]:
        assert abs(h1[-1]["val_loss"] - h2[-1]["val_loss"]) < 1e-4 * max(1.0, h1[-1]["val_loss"])


def _one_line_error(result, *needles):
    assert result.exit_code != 0
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    for n in needles:
        assert n in result.output.replace("\n", " "), result.output


def test_bad_input_one_line_nothing_written(small_store, tmp_path):
    out = tmp_path / "run"
    cli_sets = sets(tiny_overrides(small_store, out))
    bad_recipe = tmp_path / "bad.toml"
    bad_recipe.write_text("[train]\nlr = 'fast'\n")
    _one_line_error(runner.invoke(app, ["pretrain", str(bad_recipe)]), "train.lr", "number")
    bad_recipe.write_text("[train]\nlearning_rate = 1e-4\n")
    _one_line_error(runner.invoke(app, ["pretrain", str(bad_recipe)]), "train.learning_rate")
    _one_line_error(
        runner.invoke(app, ["pretrain", str(TINY), *cli_sets, "--set", f"data.store={tmp_path / 'none'}"]),
        "store not found",
    )
    _one_line_error(
        runner.invoke(app, ["pretrain", str(TINY), *cli_sets, "--set", "data.views=['top']"]),
        "has no view(s) ['top']",
    )
    _one_line_error(
        runner.invoke(app, ["pretrain", str(TINY), *cli_sets, "--set", "model.action_dim=2"]), "action_dim=2"
    )
    _one_line_error(
        runner.invoke(app, ["finetune", str(TINY), *cli_sets, "--init", str(tmp_path / "nope")]),
        "checkpoint not found",
    )
    assert not out.exists()


def test_finetune_new_embodiment_and_incompatible_init(small_store, tmp_path):
    base = tmp_path / "base"
    result = train(load_recipe(TINY, tiny_overrides(small_store, base, steps=2)))
    # a new embodiment: 6-D actions padded from the store's 4, a new view count (1)
    out = tmp_path / "ft"
    ft = runner.invoke(
        app,
        [
            "finetune",
            str(TINY),
            "--init",
            str(result.checkpoint),
            *sets(tiny_overrides(small_store, out, steps=2)),
            "--set",
            "model.action_dim=6",
            "--set",
            "data.views=['b']",
        ],
    )
    assert ft.exit_code == 0, ft.output
    assert "re-initialised" in ft.output and "action_encoder" in ft.output and "view_embedding" in ft.output
    # a checkpoint of another width cannot be fine-tuned into this trunk
    wide = runner.invoke(
        app,
        [
            "finetune",
            str(TINY),
            "--init",
            str(result.checkpoint),
            *sets(tiny_overrides(small_store, tmp_path / "w", 2)),
            "--set",
            "model.overrides={num_layers = 3, num_depth_blocks = 1}",
        ],
    )
    _one_line_error(wide, "incompatible checkpoint", "num_layers")
    assert not (tmp_path / "w").exists()


def test_finetune_keeps_the_init_checkpoints_maths_unless_the_recipe_names_them(small_store, tmp_path):
    """An older checkpoint (every token through the final norm, detached depth K/V) fine-tunes with its own
    maths; model.overrides can switch it to the release's."""
    from xwam_core.data.reader import EpisodeStore
    from xwam_core.data.windows import WindowLayout
    from xwam_core.factory import layout_for
    from xwam_core.finetune import init_from_checkpoint

    old = load_recipe(
        TINY,
        [
            *tiny_overrides(small_store, tmp_path / "old", steps=1),
            "model.overrides={num_layers = 2, num_depth_blocks = 1, "
            "action_state_readout = 'final_norm', depth_main_kv_grad = false}",
        ],
    )
    ckpt = train(old).checkpoint
    recipe = load_recipe(TINY, tiny_overrides(small_store, tmp_path / "ft", steps=1))
    window = WindowLayout(recipe.data.future_frames, recipe.data.frame_stride)
    layout = layout_for(EpisodeStore(recipe.data.store), window, recipe.model, None)
    model, _, _ = init_from_checkpoint(ckpt, recipe.model, layout)
    assert model.config.action_state_readout == "final_norm" and model.config.depth_main_kv_grad is False
    recipe.model.overrides = {**recipe.model.overrides, "action_state_readout": "last_hidden"}
    model, _, _ = init_from_checkpoint(ckpt, recipe.model, layout)
    assert model.config.action_state_readout == "last_hidden" and model.config.depth_main_kv_grad is False


def test_fit_ends_its_loader_workers_so_the_process_can_exit(small_store, tmp_path):
    """DataLoader workers ignore SIGTERM (Ctrl-C and SIGTERM are the trainer's); left alive after fit,
    the interpreter's exit (SIGTERM, then join) would wait for them forever. fit ends them itself, and a
    second fit starts new ones; `xwam pretrain` with workers exits."""
    import multiprocessing

    from xwam_core.train import Trainer

    overrides = [*tiny_overrides(small_store, tmp_path / "run", steps=2), "data.num_workers=2"]
    trainer = Trainer(load_recipe(TINY, overrides))
    trainer.fit()
    assert multiprocessing.active_children() == []
    trainer.cfg.max_steps = 3
    trainer.fit()  # fresh workers, ended again
    assert trainer.step == 3 and multiprocessing.active_children() == []
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "xwam_cli.main",
            "pretrain",
            str(TINY),
            *sets([*tiny_overrides(small_store, tmp_path / "cli", steps=2), "data.num_workers=2"]),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert cli.returncode == 0, cli.stderr[-2000:]


def test_the_trainer_weights_the_executed_actions_as_the_recipe_says(small_store, tmp_path):
    """train.executed_action_weight reaches the objective: the first inference.actions_per_query of the K
    actions weigh it; a query that executes the whole chunk leaves the loss the plain mean."""
    from xwam_core.train import Trainer

    base = tiny_overrides(small_store, tmp_path / "run", steps=1)  # K = 4 frames x stride 2 = 8 actions
    trainer = Trainer(
        load_recipe(TINY, [*base, "inference.actions_per_query=3", "train.executed_action_weight=5"])
    )
    weights = trainer.objective.action_step_weights
    assert weights is not None and weights.tolist() == [5.0] * 3 + [1.0] * 5
    whole = Trainer(
        load_recipe(TINY, [*base, "inference.actions_per_query=0", "train.executed_action_weight=5"])
    )
    assert whole.objective.action_step_weights is None

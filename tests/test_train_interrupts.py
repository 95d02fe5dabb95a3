"""Ctrl-C and SIGTERM end training after the current step with a checkpoint and a message that tells the
truth; a resumed run draws from every global RNG exactly as the uninterrupted one; runs with nothing to do
write nothing."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import SyntheticSource, write_store
from tests.run_fixtures import ROOT, TINY, app, one_line_error, runner, tiny_overrides
from xwam_core.checkpoint import RngState, checkpoint_dirs, load_policy_parts, load_training_state
from xwam_core.errors import XWAMError
from xwam_core.recipe import load_recipe
from xwam_core.runlock import LOCK_NAME
from xwam_core.train import Trainer, TrainingInterrupted, train


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("interrupts") / "store"
    write_store(path, SyntheticSource(episodes=3, length=14, size=(32, 32), views=("a", "b")))
    return path


def recipe(store: Path, out: Path, steps: int, every: int = 1):
    return load_recipe(TINY, [*tiny_overrides(store, out, steps), f"train.checkpoint_every={every}"])


def sets(store: Path, out: Path, steps: int, every: int = 1) -> list[str]:
    overrides = [*tiny_overrides(store, out, steps), f"train.checkpoint_every={every}"]
    return [arg for o in overrides for arg in ("--set", o)]


def start(module: str, *args: str, delay: float = 0.3) -> subprocess.Popen:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "COLUMNS": "400",
        "XWAM_TEST_WRITE_DELAY": str(delay),
    }
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


class DrawingTrainer(Trainer):
    """A Trainer whose steps also draw from the global torch, numpy and python RNGs (as dropout or a
    user's own augmentation would), and that can send itself Ctrl-C after a given step."""

    interrupt_after: int | None = None

    def train_step(self, batch):
        logs = super().train_step(batch)
        logs["draws"] = float(torch.rand(())) + float(np.random.rand()) + random.random()
        if self.step == self.interrupt_after:
            os.kill(os.getpid(), signal.SIGINT)
        return logs


def test_a_resumed_run_draws_from_every_rng_as_the_uninterrupted_one(store, tmp_path):
    steps = 4
    whole = DrawingTrainer(recipe(store, tmp_path / "whole", steps, every=2)).fit()

    stopped = DrawingTrainer(recipe(store, tmp_path / "stopped", steps, every=3))
    stopped.interrupt_after = 2
    before = signal.getsignal(signal.SIGINT)  # Python's default handler; SIG_IGN under nohup / `cmd &`
    with pytest.raises(TrainingInterrupted) as info:
        stopped.fit()
    ckpt = tmp_path / "stopped" / "checkpoints" / "step-00000002"
    assert info.value.step == 2 and info.value.checkpoint == ckpt and info.value.exit_code == 130
    assert str(info.value) == (
        f"interrupted (SIGINT) at step 2: checkpoint {ckpt} written; continue with --resume latest"
    )
    assert signal.getsignal(signal.SIGINT) is before  # fit put the handlers back
    assert not (tmp_path / "stopped" / LOCK_NAME).exists()

    resumed = DrawingTrainer(recipe(store, tmp_path / "stopped", steps, every=3), resume="latest")
    iter(resumed.loader)  # making the loader's iterator draws nothing from the global RNGs
    now, saved = RngState.capture(), load_training_state(whole.run_dir / "checkpoints" / "step-00000002").rng
    assert saved is not None and torch.equal(now.tensors["torch_cpu"], saved.tensors["torch_cpu"])
    assert now.meta == saved.meta  # numpy and python: the uninterrupted run's states at step 2
    result = resumed.fit()
    assert [h["draws"] for h in result.history] == [h["draws"] for h in whole.history]
    assert [h["loss"] for h in result.history] == [h["loss"] for h in whole.history]
    a, b = whole.checkpoint / "training", result.checkpoint / "training"
    assert torch.equal(
        load_file(a / "rng.safetensors")["torch_cpu"], load_file(b / "rng.safetensors")["torch_cpu"]
    )
    assert load_training_state(whole.checkpoint).rng.meta == load_training_state(result.checkpoint).rng.meta  # type: ignore[union-attr]
    for name, tensor in load_file(a / "trainable.safetensors").items():
        assert torch.equal(tensor, load_file(b / "trainable.safetensors")[name]), name


def test_sigint_then_sigterm_stop_after_the_step_with_a_checkpoint(store, tmp_path):
    out = tmp_path / "run"
    args = ["pretrain", str(TINY), *sets(store, out, steps=1000, every=2)]
    proc = start("xwam_cli.main", *args)
    wait_for(out / "checkpoints" / "step-00000002", proc)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output
    assert "Traceback" not in output, output
    line = next(line for line in output.splitlines() if line.startswith("interrupted"))
    step = int(line.split("at step ")[1].split(":")[0])
    ckpt = out / "checkpoints" / f"step-{step:08d}"
    assert (
        line
        == f"interrupted (SIGINT) at step {step}: checkpoint {ckpt} written; continue with --resume latest"
    )
    assert step >= 2 and checkpoint_dirs(out)[-1] == ckpt
    load_training_state(ckpt)
    load_policy_parts(ckpt)
    assert not (out / LOCK_NAME).exists() and not (out / "summary.json").exists()

    proc = start("xwam_cli.main", *args, "--resume", "latest")
    wait_for(out / "checkpoints" / f"step-{step + 2 + step % 2:08d}", proc)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, output
    line = next(line for line in output.splitlines() if line.startswith("interrupted"))
    assert line.startswith("interrupted (SIGTERM) at step ") and line.endswith(
        "continue with --resume latest"
    )
    later = int(line.split("at step ")[1].split(":")[0])
    assert later > step and checkpoint_dirs(out)[-1].name == f"step-{later:08d}"
    assert load_training_state(checkpoint_dirs(out)[-1]).extra["step"] == later


def test_a_second_ctrl_c_while_saving_leaves_no_broken_checkpoint(store, tmp_path):
    out = tmp_path / "run"
    proc = start("tests.slow_checkpoints", "pretrain", str(TINY), *sets(store, out, steps=100), delay=4.0)
    assert proc.stdout is not None
    for line in proc.stdout:  # Ctrl-C while step 3 is being written (>= 4 s here), and again 1.5 s later
        if line.startswith("@@ write step-00000003"):
            proc.send_signal(signal.SIGINT)  # stop after this step: its checkpoint is already under way
            time.sleep(1.5)  # past the launcher-forwarding window: a second, deliberate Ctrl-C
            proc.send_signal(signal.SIGINT)
            break
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output
    assert "Traceback" not in output, output
    newest = out / "checkpoints" / "step-00000002"
    assert (
        "interrupted again (SIGINT) while checkpoint step-00000003 was being written: that checkpoint was not "
        f"written (it is written under a temporary name and renamed only when complete); the newest complete "
        f"checkpoint is {newest}; continue with --resume latest"
    ) in output, output
    assert [p.name for p in (out / "checkpoints").iterdir()] == [p.name for p in checkpoint_dirs(out)]
    assert checkpoint_dirs(out)[-1] == newest
    load_training_state(newest)
    assert not (out / LOCK_NAME).exists()


def test_runs_with_nothing_to_do_write_nothing(store, tmp_path):
    out = tmp_path / "none"
    empty = recipe(store, out, steps=1)
    empty.train.max_steps = 0
    with pytest.raises(XWAMError, match=r"train.max_steps: expected an integer >= 1, got 0"):
        train(empty)
    assert not out.exists()

    done = tmp_path / "done"
    result = train(recipe(store, done, steps=2, every=2))
    before = {p: p.stat().st_mtime_ns for p in done.rglob("*")}
    again = runner.invoke(
        app(), ["pretrain", str(TINY), *sets(store, done, steps=2, every=2), "--resume", "latest"]
    )
    assert again.exit_code == 0, again.output
    assert "nothing to train" in again.output and str(result.checkpoint) in again.output.replace("\n", "")
    assert {
        p: p.stat().st_mtime_ns for p in done.rglob("*")
    } == before  # not a file added, removed or rewritten

    # the recipe's own range checks may refuse it first; either way one line and nothing written
    zero = runner.invoke(
        app(), ["pretrain", str(TINY), *sets(store, out, steps=1), "--set", "train.max_steps=0"]
    )
    one_line_error(zero, "train.max_steps: expected an integer >= 1, got 0")
    assert not out.exists()

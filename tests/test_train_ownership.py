"""One process owns a run folder: a second `xwam pretrain` into it is refused, a killed owner's lock is taken
over, a folder holding a run needs --resume or --overwrite, and what interrupted runs left is removed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import SyntheticSource, write_store
from tests.run_fixtures import ROOT, TINY, app, one_line_error, runner, tiny_overrides
from xwam_core.checkpoint import checkpoint_dirs, load_training_state
from xwam_core.recipe import load_recipe
from xwam_core.runlock import LOCK_NAME
from xwam_core.train import train


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ownership") / "store"
    write_store(path, SyntheticSource(episodes=3, length=14, size=(32, 32), views=("a", "b")))
    return path


def sets(store: Path, out: Path, steps: int, *more: str) -> list[str]:
    overrides = [*tiny_overrides(store, out, steps), *more]
    return [arg for o in overrides for arg in ("--set", o)]


def pretrain(*args: str):
    return runner.invoke(app(), ["pretrain", str(TINY), *args])


def test_a_second_run_is_refused_and_a_killed_owners_lock_is_taken_over(store, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(  # with a DataLoader worker: forked children must not keep the lock alive
        [
            sys.executable,
            "-m",
            "xwam_cli.main",
            "pretrain",
            str(TINY),
            *sets(store, out, 1000, "train.checkpoint_every=2", "data.num_workers=1"),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while not (out / "checkpoints" / "step-00000002").exists():
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.05)
        owner = json.loads((out / LOCK_NAME).read_text())
        assert owner["pid"] == first.pid and owner["host"] == socket.gethostname()
        second = pretrain(*sets(store, out, 1000, "train.checkpoint_every=2"), "--resume", "latest")
        one_line_error(second, str(out), f"in use by pid {first.pid} on host {socket.gethostname()}")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == first.pid  # left behind by the kill
    newest = int(checkpoint_dirs(out)[-1].name[5:])
    third = pretrain(*sets(store, out, newest + 1, "train.checkpoint_every=2"), "--resume", "latest")
    assert third.exit_code == 0, third.output
    flat = third.output.replace("\n", " ")
    assert f"took over the stale lock of pid {first.pid} on host {socket.gethostname()}" in flat, third.output
    assert checkpoint_dirs(out)[-1].name == f"step-{newest + 1:08d}"
    assert not (out / LOCK_NAME).exists()


def test_a_folder_holding_a_run_needs_resume_or_overwrite(store, tmp_path):
    out = tmp_path / "run"
    train(load_recipe(TINY, [*tiny_overrides(store, out, 2), "train.checkpoint_every=1"]))
    old = sorted(p.name for p in out.rglob("*"))
    one_line_error(
        pretrain(*sets(store, out, 1)), str(out), "already holds a run", "--resume latest", "--overwrite"
    )
    one_line_error(pretrain(*sets(store, out, 1), "--resume", "latest", "--overwrite"), "contradict")
    # an --overwrite that fails before its first step leaves the old run whole
    one_line_error(pretrain(*sets(store, out, 1), "--set", "data.views=['top']", "--overwrite"), "['top']")
    assert sorted(p.name for p in out.rglob("*")) == old

    replaced = pretrain(*sets(store, out, 1), "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert [p.name for p in checkpoint_dirs(out)] == ["step-00000001"]
    assert "max_steps = 1" in (out / "recipe.toml").read_text()
    assert len(list((out / "logs").glob("events.out.tfevents.*"))) == 1  # the old run's logs went with it
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoints",
        "logs",
        "loss_curve.png",
        "recipe.toml",
        "summary.json",
    ]


def test_leftovers_of_interrupted_runs_are_removed_by_the_next_owner(store, tmp_path):
    out = tmp_path / "run"
    train(
        load_recipe(TINY, [*tiny_overrides(store, out, 3), "train.checkpoint_every=1", "train.keep_last=3"])
    )
    ckpts = out / "checkpoints"
    # killed between the two renames that replace step 3: its complete old folder is all there is
    os.replace(ckpts / "step-00000003", ckpts / ".step-00000003.old-0000aaaa")
    # killed while writing step 4, while pruning step 1, while replacing step 2 (after the swap)
    shutil.copytree(ckpts / "step-00000002", ckpts / ".step-00000004.tmp-1111bbbb")
    (ckpts / ".step-00000004.tmp-1111bbbb" / "xwam_checkpoint.json").unlink()
    os.replace(ckpts / "step-00000001", ckpts / ".step-00000001.pruned-2222cccc")
    shutil.copytree(ckpts / "step-00000002", ckpts / ".step-00000002.old-3333dddd")
    # killed while writing recipe.toml, and during an --overwrite
    (out / ".recipe.tmp-4444eeee.toml").write_text("[train]\n")
    (out / ".logs.old-5555ffff").mkdir()
    # not ours: left alone
    (ckpts / ".notes").write_text("mine")
    (out / ".step-00000009.tmp-zzzz").mkdir()
    # and the lock of a process that is gone
    dead = subprocess.Popen(["true"])
    dead.wait()
    (out / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": "h", "started": "s", "command": "c"}))

    again = pretrain(
        *sets(store, out, 3, "train.checkpoint_every=1", "train.keep_last=3"), "--resume", "latest"
    )
    assert again.exit_code == 0, again.output
    flat = again.output.replace("\n", " ")
    assert f"took over the stale lock of pid {dead.pid} on host h" in flat, again.output
    assert "removed 5 unfinished temporaries of an interrupted run (" in flat, again.output
    assert " MB: " in flat and ".step-00000001.pruned-2222cccc" in flat, again.output
    assert "restored step-00000003 (its replacement was never completed)" in flat, again.output
    assert "nothing to train" in flat  # the restored step 3 is the newest checkpoint: the run is complete
    assert [p.name for p in ckpts.iterdir() if p.name.startswith(".step")] == []
    assert [p.name for p in checkpoint_dirs(out)] == ["step-00000002", "step-00000003"]
    assert load_training_state(ckpts / "step-00000003").extra["step"] == 3
    assert (ckpts / ".notes").exists() and (out / ".step-00000009.tmp-zzzz").exists()
    assert not (out / ".recipe.tmp-4444eeee.toml").exists() and not (out / ".logs.old-5555ffff").exists()
    assert not (out / LOCK_NAME).exists()

"""SIGKILL at random points of a training run, many times, resuming after each: the end is bit-identical
(weights, optimiser state, RNG states, history) to a run that was never interrupted, and no checkpoint on
disk is unreadable at any moment."""

from __future__ import annotations

import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import SyntheticSource, write_store
from tests.run_fixtures import ROOT, TINY
from xwam_core.checkpoint import checkpoint_dirs, load_policy_parts, load_training_state
from xwam_core.runlock import LOCK_NAME

STEPS = 14  # checkpoint_every=1, keep_last=2: every step writes one checkpoint and prunes one
KILLS = 8
PHASES = ("write", "prune", "step")  # inside a checkpoint write, inside a pruning, inside a training step
WRITE_DELAY = 0.3


def overrides(store: Path, out: Path) -> list[str]:
    sets = [
        f"data.store={store}",
        "data.future_frames=4",
        "data.frame_stride=2",
        "data.batch_size=2",
        "data.num_workers=0",
        "data.val_episodes=1",
        "model.overrides={num_layers = 2, num_depth_blocks = 1}",
        f"train.max_steps={STEPS}",
        "train.checkpoint_every=1",
        "train.keep_last=2",
        "train.val_every=5",
        "train.warmup_steps=2",
        f"train.out={out}",
    ]
    return [arg for s in sets for arg in ("--set", s)]


def start(module: str, args: list[str]) -> tuple[subprocess.Popen, queue.Queue]:
    """A training process whose output lines arrive on a queue (None at its end)."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "COLUMNS": "400",
        "XWAM_TEST_WRITE_DELAY": str(WRITE_DELAY),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", module, "pretrain", str(TINY), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: queue.Queue = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return proc, lines


class Poller(threading.Thread):
    """Loads every checkpoint that appears under its own name, while the runs are alive: a failure on a
    folder that is still there is a checkpoint that was unreadable on disk."""

    def __init__(self, run: Path) -> None:
        super().__init__(daemon=True)
        self.folder, self.done, self.loaded, self.failures = run, threading.Event(), set(), []

    def run(self) -> None:  # type: ignore[override]
        while not self.done.is_set():
            for ckpt in checkpoint_dirs(self.folder):
                try:
                    key = (ckpt.name, ckpt.stat().st_ino)
                    if key in self.loaded:
                        continue
                    load_training_state(ckpt)
                    load_policy_parts(ckpt)
                    self.loaded.add(key)
                except Exception as e:
                    if ckpt.exists():  # pruned meanwhile is fine; unreadable under its name is not
                        self.failures.append(f"{ckpt}: {type(e).__name__}: {e}")
            time.sleep(0.05)


def final_state(run: Path) -> dict:
    ckpt = run / "checkpoints" / f"step-{STEPS:08d}"
    state = load_training_state(ckpt)
    return {
        "model": load_file(ckpt / "model" / "diffusion_pytorch_model.safetensors"),
        "trainable": state.trainable,
        "optimizer": state.optimizer,
        "torch_rng": load_file(ckpt / "training" / "rng.safetensors"),
        "trainer": json.loads((ckpt / "training" / "trainer.json").read_text()),
    }


@pytest.mark.slow
def test_random_sigkills_with_resume_end_bit_identical(tmp_path):
    t0 = time.time()
    store = tmp_path / "store"
    write_store(store, SyntheticSource(episodes=3, length=14, size=(32, 32), views=("a", "b")))
    ref, run = tmp_path / "ref", tmp_path / "killed"
    reference, _ = start("xwam_cli.main", overrides(store, ref))  # beside the first life (2 cores)
    poller = Poller(run)
    poller.start()
    rng = random.Random(2026)
    phases = [PHASES[i % len(PHASES)] for i in range(KILLS)]
    rng.shuffle(phases)
    kills: list[tuple[str, int]] = []  # (phase, the step being written or trained when killed)
    outputs = []
    for life in range(KILLS + 1):
        dirs = checkpoint_dirs(run)
        resumed = int(dirs[-1].name[5:]) if dirs else 0
        proc, lines = start(
            "tests.slow_checkpoints", overrides(store, run) + (["--resume", "latest"] if life else [])
        )
        phase = phases[life] if life < KILLS else None
        target = min(resumed + rng.randint(1, 2), STEPS - 1)
        writing = resumed
        output: list[str] = []
        while (line := lines.get(timeout=300)) is not None:
            output.append(line)
            if phase is None or not line.startswith("@@ "):
                continue
            event, step = line.split()[1], int(line.split()[2][5:])
            if event == "write":
                writing = step
            hit = (
                (phase == "write" and event == "write" and step >= target)
                or (phase == "prune" and event == "prune" and writing >= target)
                or (phase == "step" and event == "saved" and step >= target)
            )
            if hit:
                time.sleep(rng.uniform(0.0, WRITE_DELAY if phase != "step" else 0.6))
                proc.send_signal(signal.SIGKILL)
                kills.append((phase, writing if phase != "step" else step + 1))
                break
        proc.wait(timeout=120)
        while line is not None and (line := lines.get(timeout=60)) is not None:
            output.append(line)
        outputs.append("".join(output))
        ending = f"killed aiming at {phase}: {kills[-1]}" if phase else "ran to the end"
        print(f"life {life}: from step {resumed}, {ending}, {time.time() - t0:.0f} s")
        if phase is None:
            assert proc.returncode == 0, outputs[-1]
        else:
            assert proc.returncode == -signal.SIGKILL, outputs[-1]
        if life:  # every resumed life found the killed one's lock and took it over
            assert "took over the stale lock" in outputs[-1], outputs[-1]
    assert reference.wait(timeout=300) == 0
    poller.done.set()
    poller.join(timeout=30)

    assert len(kills) == KILLS and {p for p, _ in kills} == set(PHASES), kills
    assert not poller.failures, poller.failures
    assert len(poller.loaded) >= STEPS - 2, poller.loaded  # it did load checkpoints while they were written
    leftovers_removed = sum("unfinished temporar" in out for out in outputs)
    assert leftovers_removed >= 2, outputs  # kills inside writes and prunings left temporaries, removed later
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        f"step-{STEPS - 1:08d}",
        f"step-{STEPS:08d}",
    ]
    assert not (run / LOCK_NAME).exists()

    a, b = final_state(ref), final_state(run)
    for part in ("model", "trainable", "torch_rng"):
        assert a[part].keys() == b[part].keys(), part
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    for pid, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][pid][key]), (pid, key)
    assert a["trainer"] == b["trainer"]  # history (losses), scheduler, numpy and python RNG states, step
    print(
        f"{KILLS} kills {kills}, {len(poller.loaded)} checkpoints loaded while written, {time.time() - t0:.0f} s"
    )

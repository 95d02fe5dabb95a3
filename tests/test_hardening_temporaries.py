"""Interrupted writes: what a killed `prepare` or `infer` leaves beside its target is removed by the next
run that targets the same place (with a line saying so); a temporary whose writer is alive is never
touched; replacing an existing folder never loses it."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import xwam_core.atomic as atomic
from tests.conftest import SyntheticSource
from tests.run_fixtures import app, no_temporaries, runner, tiny_checkpoint
from xwam_core.atomic import (
    STALE_AFTER_S,
    TargetExists,
    atomic_folder,
    find_temporaries,
    remove_stale_temporaries,
    write_json_atomic,
)
from xwam_core.data import sources
from xwam_core.data.reader import EpisodeStore

ROOT = Path(__file__).resolve().parents[1]
SLOW_PREPARE = """
import sys, time
from tests.conftest import SyntheticSource
from xwam_core.data.store import StoreWriter
source = SyntheticSource(episodes=200, length=10, size=(32, 32))
with StoreWriter(sys.argv[1], source.info()) as writer:
    for episode in source.episodes():
        writer.add(episode)
        print("added", flush=True)
        time.sleep(0.05)
"""


@pytest.fixture
def synthetic_source(monkeypatch):
    monkeypatch.setitem(sources.SOURCES, "synthetic", lambda cfg: SyntheticSource(episodes=2, size=(32, 32)))


def _slow_prepare(out: Path) -> subprocess.Popen:
    """A `prepare` in another process, started and seen writing its temporary store."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_PREPARE, str(out)], env=env, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    for _ in range(2):
        assert proc.stdout.readline().strip() == "added"
    return proc


def _temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def test_killed_prepare_is_cleaned_up_by_the_next_prepare(tmp_path, synthetic_source):
    out = tmp_path / "store"
    proc = _slow_prepare(out)
    # while it runs, its temporary is its own: another run targeting the same place leaves it alone
    left = _temporaries(tmp_path)
    assert len(left) == 1 and left[0].startswith(".store.tmp-"), left
    assert remove_stale_temporaries(out) == []
    assert _temporaries(tmp_path) == left
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert _temporaries(tmp_path) == left and any((tmp_path / left[0]).rglob("*.parquet"))
    result = runner.invoke(app(), ["prepare", "synthetic", "--out", str(out)])
    assert result.exit_code == 0, result.output
    flat = "".join(result.output.split())  # the line is wrapped to the terminal's width
    assert f"removed{tmp_path / left[0]}" in flat and "itswriterisgone" in flat, result.output
    no_temporaries(tmp_path)
    assert len(EpisodeStore(out).episodes) == 2


def test_killed_infer_is_cleaned_up_by_the_next_infer(tmp_path, tmp_path_factory, caplog):
    store, checkpoint = tiny_checkpoint(tmp_path_factory)
    out = tmp_path / "run"
    left = tmp_path / ".run.tmp-0badc0de"  # what a SIGKILL during the write leaves
    left.mkdir()
    np.savez(left / "predictions.npz", x=np.zeros(1000))
    with caplog.at_level(logging.WARNING, logger="xwam"):  # the CLI prints the logger's lines on stderr
        result = runner.invoke(
            app(), ["infer", "--ckpt", str(checkpoint), "--data", str(store), "--out", str(out)]
        )
    assert result.exit_code == 0, result.output
    assert any(r.message.startswith(f"removed {left}") for r in caplog.records), caplog.records
    no_temporaries(tmp_path)
    assert (out / "predictions.npz").is_file()


def test_a_live_writers_temporary_is_never_removed(tmp_path):
    final = tmp_path / "run"
    with atomic_folder(final) as tmp:
        (tmp / "a.txt").write_text("being written")
        assert remove_stale_temporaries(final) == []
        [found] = find_temporaries(tmp_path, final)
        assert not found.stale and found.why == "its writer is running"
        # another process sees the same (the lock, not this process's memory, says so)
        code = "import sys; from xwam_core.atomic import remove_stale_temporaries as r; print(r(sys.argv[1]))"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        child = subprocess.run(
            [sys.executable, "-c", code, str(final)], env=env, capture_output=True, text=True
        )
        assert child.stdout.strip() == "[]", child.stderr
        assert tmp.is_dir()
    assert (final / "a.txt").read_text() == "being written"
    no_temporaries(tmp_path)


def test_only_the_same_targets_temporaries_are_touched(tmp_path):
    for name in (".other.tmp-0badc0de", ".runs.tmp-0badc0de", ".run.tmp-0badc0de"):
        (tmp_path / name).mkdir()
    with atomic_folder(tmp_path / "run", notify=lambda line: None):
        pass
    assert _temporaries(tmp_path) == [".other.tmp-0badc0de", ".runs.tmp-0badc0de"]


def test_old_copy_is_removed_once_superseded_and_kept_while_it_is_the_only_one(tmp_path):
    final = tmp_path / "store"
    old = tmp_path / ".store.old-0badc0de"  # a kill between "move the old one aside" and "swap in"
    old.mkdir()
    (old / "info.json").write_text("the previous store")
    lines: list[str] = []
    assert remove_stale_temporaries(final) == [
        f"kept {old} (0.0 MB): the previous store, moved aside by an "
        "interrupted replace; rename it to store to restore it"
    ]
    assert old.is_dir()
    with atomic_folder(final, notify=lines.append) as tmp:
        (tmp / "info.json").write_text("new")
    assert old.is_dir() and "kept" in lines[0]
    lines.clear()
    with atomic_folder(final, overwrite=True, notify=lines.append) as tmp:
        (tmp / "info.json").write_text("newer")
    assert not old.exists() and "superseded" in lines[0], lines
    no_temporaries(tmp_path)


def test_temporary_files_are_judged_by_age(tmp_path):
    fresh = tmp_path / ".metrics.tmp-0badc0de.json"
    aged = tmp_path / ".metrics.tmp-1badc0de.json"
    other = tmp_path / ".summary.tmp-2badc0de.json"
    for path in (fresh, aged, other):
        path.write_text("{")
    past = time.time() - STALE_AFTER_S - 60
    os.utime(aged, (past, past))
    os.utime(other, (past, past))
    write_json_atomic(tmp_path / "metrics.json", {"psnr": 20.0})
    assert fresh.exists() and not aged.exists() and other.exists()


def test_without_locks_folders_are_judged_by_age(tmp_path, monkeypatch):
    """On a file system without flock (some network ones) the writer cannot be checked: age decides."""
    monkeypatch.setattr(atomic, "fcntl", None)
    fresh, aged = tmp_path / ".run.tmp-0badc0de", tmp_path / ".run.tmp-1badc0de"
    for path in (fresh, aged):
        (path / "sub").mkdir(parents=True)
        (path / "sub" / "x").write_text("x")
    past = time.time() - STALE_AFTER_S - 60
    for p in (aged, aged / "sub", aged / "sub" / "x"):
        os.utime(p, (past, past))
    lines = remove_stale_temporaries(tmp_path / "run")
    assert fresh.exists() and not aged.exists()
    assert len(lines) == 1 and "unchanged for" in lines[0]


def test_lines_go_to_the_xwam_logger_by_default(tmp_path, caplog):
    (tmp_path / ".run.tmp-0badc0de").mkdir()
    with caplog.at_level(logging.WARNING, logger="xwam"), atomic_folder(tmp_path / "run"):
        pass
    assert any("removed" in r.message and ".run.tmp-0badc0de" in r.message for r in caplog.records)


def test_a_failed_swap_puts_the_previous_folder_back(tmp_path, monkeypatch):
    final = tmp_path / "run"
    final.mkdir()
    (final / "keep.txt").write_text("previous")
    real_replace = os.replace

    def failing(src, dst):
        if ".tmp-" in str(src):
            raise OSError(5, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="Input/output error"), atomic_folder(final, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert (final / "keep.txt").read_text() == "previous" and not (final / "new.txt").exists()
    no_temporaries(tmp_path)


def test_a_target_that_appears_meanwhile_is_not_replaced(tmp_path):
    final = tmp_path / "store"
    with pytest.raises(TargetExists, match="appeared while"), atomic_folder(final) as tmp:
        (tmp / "mine.txt").write_text("mine")
        final.mkdir()
        (final / "theirs.txt").write_text("theirs")
    assert sorted(p.name for p in final.iterdir()) == ["theirs.txt"]
    no_temporaries(tmp_path)


def test_parent_folders_made_for_a_failed_write_are_removed(tmp_path):
    with pytest.raises(ValueError), atomic_folder(tmp_path / "a" / "b" / "run"):
        raise ValueError("a bug, not the disk")
    assert list(tmp_path.iterdir()) == []

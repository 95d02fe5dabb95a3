"""Disks that refuse writes: read-only outputs, a read-only store that still trains and infers, full disks
(injected ENOSPC in every form the libraries raise it, and real tiny tmpfs mounts where mounting works).
Each ends with one line naming the path (and, for a full disk, what was needed and what is free) and
leaves nothing partial behind."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import SyntheticSource, write_store
from tests.disk_faults import read_only, read_only_bind, remount_read_only, tmpfs
from tests.run_fixtures import (
    app,
    no_temporaries,
    one_line_error,
    runner,
    tiny_checkpoint,
    train_tiny,
    world_run,
)
from xwam_core.atomic import DiskError, atomic_file, atomic_folder, disk_errno, write_json_atomic
from xwam_core.data import sources
from xwam_core.data.reader import EpisodeStore
from xwam_core.data.windows import WindowDataset, WindowLayout

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return world_run(tmp_path_factory)


@pytest.fixture
def synthetic_source(monkeypatch):
    monkeypatch.setitem(sources.SOURCES, "synthetic", lambda cfg: SyntheticSource(episodes=2, size=(32, 32)))


def _copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


def _empty(folder: Path) -> None:
    assert not any(folder.iterdir()), sorted(p.name for p in folder.iterdir())


# ------------------------------------------------------------------------------------ read-only outputs
def test_prepare_into_read_only_folder(tmp_path, synthetic_source):
    (tmp_path / "ro").mkdir()
    with read_only(tmp_path / "ro"):
        result = runner.invoke(
            app(), ["prepare", "synthetic", "--out", str(tmp_path / "ro" / "data" / "store")]
        )
    one_line_error(result, str(tmp_path / "ro" / "data"), "read-only file system")
    _empty(tmp_path / "ro")
    # the target's folder exists: the first write refused is the hidden parts folder; the error names --out
    with read_only(tmp_path / "ro"):
        result = runner.invoke(app(), ["prepare", "synthetic", "--out", str(tmp_path / "ro" / "store")])
    one_line_error(result, f"{tmp_path / 'ro' / 'store'}: cannot write: read-only file system")
    _empty(tmp_path / "ro")


def test_infer_into_read_only_folder(ckpt, tmp_path):
    store, checkpoint = ckpt
    (tmp_path / "ro").mkdir()
    out = tmp_path / "ro" / "run"
    with read_only(tmp_path / "ro"):
        result = runner.invoke(
            app(), ["infer", "--ckpt", str(checkpoint), "--data", str(store), "--out", str(out)]
        )
    one_line_error(result, str(out), "read-only file system")
    _empty(tmp_path / "ro")


def test_reconstruct_and_evaluate_a_read_only_run(run, tmp_path):
    ro_run = _copy_run(run, tmp_path / "ro" / "run")
    before = sorted(p.name for p in ro_run.rglob("*"))
    with read_only(tmp_path / "ro"):
        reconstructed = runner.invoke(app(), ["reconstruct", str(ro_run)])
        evaluated = runner.invoke(app(), ["evaluate", str(ro_run), "--metrics", "psnr,action_l1"])
        evaluated_out = runner.invoke(
            app(), ["evaluate", str(ro_run), "--metrics", "psnr", "--out", str(tmp_path / "ro" / "m.json")]
        )
    one_line_error(reconstructed, str(ro_run / "points"), "read-only file system")
    one_line_error(evaluated, str(ro_run / "metrics.json"), "read-only file system")
    one_line_error(evaluated_out, str(tmp_path / "ro" / "m.json"), "read-only file system")
    assert sorted(p.name for p in ro_run.rglob("*")) == before
    # --out elsewhere works on the same read-only run
    ok = runner.invoke(
        app(), ["evaluate", str(ro_run), "--metrics", "psnr", "--out", str(tmp_path / "m.json")]
    )
    assert ok.exit_code == 0, ok.output


def test_frame_cache_in_read_only_folder(ckpt, tmp_path, monkeypatch):
    store, _ = ckpt
    (tmp_path / "ro").mkdir()
    monkeypatch.setenv("XWAM_CACHE", str(tmp_path / "ro" / "cache"))
    with read_only(tmp_path / "ro"), pytest.raises(DiskError) as caught:
        WindowDataset(EpisodeStore(store), WindowLayout(4, 2))
    message = str(caught.value)
    assert "read-only file system" in message and "XWAM_CACHE" in message and str(tmp_path / "ro") in message
    _empty(tmp_path / "ro")


# ------------------------------------------------------------------------------------ read-only store
def _tree(folder: Path) -> list[tuple[str, int, int]]:
    """Every file and folder under `folder`: relative path, size and modification time (ns)."""
    return sorted(
        (str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")
    )


def test_read_only_store_trains_and_infers(ckpt, tmp_path):
    """Any write inside the store fails (injected EROFS): training and inference never try one."""
    store = tmp_path / "store"
    shutil.copytree(ckpt[0], store)
    before = _tree(store)
    assert {"data", "meta", "videos"} <= {p.name for p in store.iterdir()}  # format 2: RGB in videos/
    with read_only(store) as refused:
        checkpoint = train_tiny(store, tmp_path / "train", steps=2)
        result = runner.invoke(
            app(), ["infer", "--ckpt", str(checkpoint), "--data", str(store), "--out", str(tmp_path / "run")]
        )
    assert result.exit_code == 0, result.output
    assert refused == []
    assert _tree(store) == before  # nothing added, removed or rewritten


def test_read_only_mounted_store_trains_and_infers(ckpt, tmp_path):
    """The same on a real read-only bind mount (native writers included); skipped where mounting fails."""
    source = tmp_path / "source"
    shutil.copytree(ckpt[0], source)
    before = _tree(source)
    with read_only_bind(source, tmp_path / "ro-store") as store:
        with pytest.raises(OSError) as caught:
            (store / "probe").write_text("x")
        assert caught.value.errno == errno.EROFS
        checkpoint = train_tiny(store, tmp_path / "train", steps=2)
        result = runner.invoke(
            app(), ["infer", "--ckpt", str(checkpoint), "--data", str(store), "--out", str(tmp_path / "run")]
        )
        assert result.exit_code == 0, result.output
    assert _tree(source) == before


def test_read_only_mount_outputs(ckpt, run, tmp_path, synthetic_source, monkeypatch):
    """prepare, infer, reconstruct, evaluate and the frame cache on a real read-only file system."""
    store, checkpoint = ckpt
    staging = tmp_path / "staging"
    _copy_run(run, staging / "run")
    with tmpfs(tmp_path / "ro", "8m") as ro:
        shutil.copytree(staging / "run", ro / "run")
        remount_read_only(ro)
        cases = {
            "prepare": (["prepare", "synthetic", "--out", str(ro / "store")], ro / "store"),
            "infer": (
                ["infer", "--ckpt", str(checkpoint), "--data", str(store), "--out", str(ro / "r2")],
                ro / "r2",
            ),
            "reconstruct": (["reconstruct", str(ro / "run")], ro / "run" / "points"),
            "evaluate": (["evaluate", str(ro / "run"), "--metrics", "psnr"], ro / "run" / "metrics.json"),
        }
        for args, path in cases.values():
            result = runner.invoke(app(), args)
            one_line_error(result, str(path), "read-only file system")
        monkeypatch.setenv("XWAM_CACHE", str(ro / "cache"))
        with pytest.raises(DiskError, match=r"read-only file system.*XWAM_CACHE"):
            EpisodeStore(store).frame_cache()
        assert sorted(p.name for p in ro.iterdir()) == ["run"]


# ------------------------------------------------------------------------------------ full disk, injected
def _partial_then(code: int, text: str = "No space left on device"):
    """A writer that writes a little, then fails the way a full disk makes it fail."""

    def fail(path, *args, **kwargs):
        with open(path, "wb") as fh:
            fh.write(b"\x00" * 300_000)
        raise OSError(code, text)

    return fail


@pytest.mark.parametrize(
    ("code", "words"), [(errno.ENOSPC, "no space left on device"), (errno.EDQUOT, "disk quota exceeded")]
)
def test_infer_on_full_disk(ckpt, tmp_path, monkeypatch, code, words):
    store, checkpoint = ckpt
    monkeypatch.setattr(np, "savez", _partial_then(code))
    out = tmp_path / "out" / "run"
    result = runner.invoke(
        app(), ["infer", "--ckpt", str(checkpoint), "--data", str(store), "--out", str(out)]
    )
    one_line_error(result, str(out), words, "(needed about 0.", "MB free)")
    assert not (tmp_path / "out").exists()


def test_prepare_on_full_disk_pyarrow(tmp_path, synthetic_source, monkeypatch):
    import pyarrow.parquet as pq

    def full(self, table, *args, **kwargs):
        raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")

    monkeypatch.setattr(pq.ParquetWriter, "write_table", full)
    out = tmp_path / "data" / "store"
    result = runner.invoke(app(), ["prepare", "synthetic", "--out", str(out)])
    one_line_error(result, str(out), "no space left on device", "MB free")
    _empty(tmp_path)


def test_evaluate_on_full_disk(run, tmp_path, monkeypatch):
    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_text", full)
    out = tmp_path / "x" / "metrics.json"
    result = runner.invoke(app(), ["evaluate", str(run), "--metrics", "psnr", "--out", str(out)])
    one_line_error(result, str(out), "no space left on device")
    _empty(tmp_path)


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), errno.ENOSPC),
        (OSError(errno.EROFS, "Read-only file system"), errno.EROFS),
        (OSError(errno.EACCES, "Permission denied"), errno.EACCES),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), errno.EDQUOT),
        (OSError("[Errno 28] Error writing bytes to file. Detail: [errno 28] No space left on device"), 28),
        (OSError("100000 requested and 32752 written"), errno.ENOSPC),  # numpy's np.save on a full disk
        (RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"), 28),
        (RuntimeError("I/O error: Read-only file system (os error 30)"), errno.EROFS),
        (OSError(errno.ENOENT, "No such file or directory"), None),
        (ValueError("a bug, not the disk"), None),
        (KeyboardInterrupt(), None),
    ],
)
def test_disk_failures_are_recognised_in_every_form(error, code):
    assert disk_errno(error) == code


def test_safetensors_full_disk_in_an_atomic_folder(tmp_path):
    from safetensors import SafetensorError

    final = tmp_path / "ckpt"
    with pytest.raises(DiskError) as caught, atomic_folder(final) as tmp:
        (tmp / "config.json").write_text("{}")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert str(caught.value).startswith(f"{final}: no space left on device (needed more than the")
    assert isinstance(caught.value.__cause__, SafetensorError)
    _empty(tmp_path)


def test_nested_atomic_file_names_the_final_path(tmp_path):
    final = tmp_path / "run"
    with (
        pytest.raises(DiskError) as caught,
        atomic_folder(final) as tmp,
        atomic_file(tmp / "v" / "a.mp4") as video,
    ):
        raise OSError(errno.ENOSPC, "No space left on device", str(video))
    assert str(caught.value).startswith(f"{final / 'v' / 'a.mp4'}: no space left on device")
    _empty(tmp_path)


def test_frame_cache_refused_before_writing_when_it_cannot_fit(ckpt, tmp_path, monkeypatch):
    import xwam_core.atomic

    store, _ = ckpt
    monkeypatch.setenv("XWAM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(xwam_core.atomic, "free_bytes", lambda path: 1000)
    with pytest.raises(DiskError) as caught:
        EpisodeStore(store).frame_cache()
    message = str(caught.value)
    assert "no space left on device (needed about" in message and "0.0 MB free" in message, message
    assert "XWAM_CACHE" in message
    _empty(tmp_path)


# ------------------------------------------------------------------------------------ full disk, tmpfs
def test_full_tmpfs_outputs(ckpt, run, tmp_path, synthetic_source, monkeypatch):
    """prepare, infer, evaluate and the frame cache on a real 64 KiB tmpfs; skipped where mounting fails."""
    store, checkpoint = ckpt
    with tmpfs(tmp_path / "full", "64k") as full:
        result = runner.invoke(app(), ["prepare", "synthetic", "--out", str(full / "store")])
        one_line_error(result, str(full / "store"), "no space left on device", "MB free")
        _empty(full)
        result = runner.invoke(
            app(), ["infer", "--ckpt", str(checkpoint), "--data", str(store), "--out", str(full / "run")]
        )
        one_line_error(result, str(full / "run"), "no space left on device", "MB free")
        _empty(full)
        monkeypatch.setenv("XWAM_CACHE", str(full / "cache"))
        with pytest.raises(
            DiskError, match=r"no space left on device \(needed about .* MB free\); set XWAM_CACHE"
        ):
            EpisodeStore(store).frame_cache()
        _empty(full)
        (full / "filler").write_bytes(b"\x00" * (full.stat().st_blksize * 8))
        while True:  # fill it up
            try:
                with open(full / "filler", "ab") as fh:
                    fh.write(b"\x00" * 4096)
            except OSError:
                break
        result = runner.invoke(
            app(), ["evaluate", str(run), "--metrics", "psnr", "--out", str(full / "m.json")]
        )
        one_line_error(result, str(full / "m.json"), "no space left on device")
        assert sorted(p.name for p in full.iterdir()) == ["filler"]


def test_reconstruct_on_full_tmpfs(run, tmp_path):
    size = sum(p.stat().st_size for p in run.rglob("*") if p.is_file())
    with tmpfs(tmp_path / "full", f"{size // 1024 + 96}k") as full:
        shutil.copytree(run, full / "run")
        result = runner.invoke(app(), ["reconstruct", str(full / "run")])
        one_line_error(result, str(full / "run" / "points"), "no space left on device", "MB free")
        assert sorted(p.name for p in (full / "run").iterdir()) == sorted(p.name for p in run.iterdir())
        no_temporaries(full / "run")


def test_frame_cache_on_full_tmpfs_fails_cleanly_not_with_sigbus(ckpt, tmp_path):
    """Even when the free-space check is fooled (another process fills the disk meanwhile), the memory
    maps are allocated up front: ENOSPC and one line, never a SIGBUS. Run in a child: a SIGBUS would
    kill it, not the test session."""
    store, _ = ckpt
    with tmpfs(tmp_path / "full", "160k") as full:
        code = (
            "import sys, xwam_core.atomic as a\n"
            "a.check_free_space = lambda *args, **kwargs: None\n"
            "from xwam_core.data.reader import EpisodeStore\n"
            "try:\n"
            "    EpisodeStore(sys.argv[1]).frame_cache()\n"
            "except a.DiskError as e:\n"
            "    print('one line:', e)\n"
        )
        env = {**os.environ, "XWAM_CACHE": str(full / "cache"), "PYTHONPATH": str(ROOT)}
        child = subprocess.run(
            [sys.executable, "-c", code, str(store)], env=env, capture_output=True, text=True, timeout=120
        )
        assert child.returncode == 0, (child.returncode, child.stderr[-2000:])
        assert "one line:" in child.stdout and "no space left on device" in child.stdout, child.stdout
        assert "XWAM_CACHE" in child.stdout
        _empty(full)


def test_write_json_atomic_on_read_only_names_the_file(tmp_path):
    (tmp_path / "ro").mkdir()
    with read_only(tmp_path / "ro"), pytest.raises(DiskError) as caught:
        write_json_atomic(tmp_path / "ro" / "sub" / "a.json", {"a": 1})
    assert str(caught.value) == f"{tmp_path / 'ro' / 'sub'}: cannot write: read-only file system"


def test_store_writer_on_read_only(tmp_path):
    """The library route of prepare: StoreWriter on a read-only folder, before any episode is added."""
    (tmp_path / "ro").mkdir()
    with read_only(tmp_path / "ro"), pytest.raises(DiskError, match="read-only file system"):
        write_store(tmp_path / "ro" / "store", SyntheticSource(episodes=1))
    _empty(tmp_path / "ro")

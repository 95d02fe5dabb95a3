"""--overwrite replaces only what the command itself writes: never a folder of something else, never the
working directory or a folder above it, never a file where it writes a folder."""

from __future__ import annotations

import os

import pytest

from tests.run_fixtures import app, one_line_error, runner, tiny_checkpoint
from xwam_core.atomic import atomic_folder
from xwam_core.errors import XWAMError


def test_atomic_folder_replaces_only_its_own_kind(tmp_path, monkeypatch):
    other = tmp_path / "notes"
    other.mkdir()
    (other / "thesis.tex").write_text("years of work")
    with (
        pytest.raises(XWAMError, match=r"holds no manifest\.json"),
        atomic_folder(other, overwrite=True, replaces="manifest.json"),
    ):
        pass
    assert (other / "thesis.tex").read_text() == "years of work"
    a_file = tmp_path / "draft.txt"
    a_file.write_text("not a folder")
    with (
        pytest.raises(XWAMError, match="is a file, and this command writes a folder there"),
        atomic_folder(a_file, overwrite=True, replaces="manifest.json"),
    ):
        pass
    assert a_file.read_text() == "not a folder"
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_folder(empty, overwrite=True, replaces="manifest.json") as tmp:
        (tmp / "manifest.json").write_text("{}")
    with atomic_folder(empty, overwrite=True, replaces="manifest.json") as tmp:  # its own kind: replaced
        (tmp / "manifest.json").write_text("[]")
    assert (empty / "manifest.json").read_text() == "[]"
    monkeypatch.chdir(other)
    for target in (other, tmp_path):
        with (
            pytest.raises(XWAMError, match="working directory or a folder above it"),
            atomic_folder(target, overwrite=True, replaces="x"),
        ):
            pass
    assert os.listdir(other) == ["thesis.tex"]


def test_infer_overwrite_never_deletes_a_foreign_folder(tmp_path_factory, tmp_path):
    store, ckpt = tiny_checkpoint(tmp_path_factory)
    precious = tmp_path / "src"
    precious.mkdir()
    (precious / "main.py").write_text("print('hi')")
    result = runner.invoke(
        app(),
        [
            "infer",
            "--ckpt",
            str(ckpt),
            "--data",
            str(store),
            "--out",
            str(precious),
            "--overwrite",
            "--mode",
            "policy",
        ],
    )
    one_line_error(result, "holds no manifest.json")
    assert (precious / "main.py").read_text() == "print('hi')"

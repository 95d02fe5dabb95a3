"""A run whose loss turns NaN or infinite stops in one line at that step, saves nothing of it, and (when the
first step already diverges) leaves the run it was to --overwrite in place; --overwrite never deletes the
checkpoint a fine-tune starts from; --resume latest on a folder without a checkpoint says it starts anew."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import SyntheticSource, write_store
from tests.run_fixtures import TINY, app, one_line_error, runner, tiny_overrides
from xwam_core import train as train_module
from xwam_core.checkpoint import checkpoint_dirs
from xwam_core.errors import XWAMError
from xwam_core.recipe import load_recipe
from xwam_core.train import train


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("diverged") / "store"
    write_store(path, SyntheticSource(episodes=3, length=14, size=(32, 32), views=("a", "b")))
    return path


def test_a_learning_rate_that_diverges_stops_with_one_line_and_saves_nothing(store, tmp_path):
    out = tmp_path / "run"
    recipe = load_recipe(
        TINY, [*tiny_overrides(store, out, steps=6), "train.lr=1e30", "train.warmup_steps=0"]
    )
    with pytest.raises(XWAMError) as caught:
        train(recipe)
    message = str(caught.value)
    assert message.startswith("training diverged: loss is nan at step ") and "train.lr" in message, message
    assert "no checkpoint was written" in message and "\n" not in message
    assert checkpoint_dirs(out) == []


def test_divergence_at_the_first_step_keeps_the_run_it_would_overwrite(store, tmp_path, monkeypatch):
    out = tmp_path / "run"
    kept = train(load_recipe(TINY, tiny_overrides(store, out, steps=2))).checkpoint
    real = train_module._step_logs

    def nan_loss(*args, **kwargs):
        return {**real(*args, **kwargs), "loss": float("nan")}

    monkeypatch.setattr(train_module, "_step_logs", nan_loss)
    args = ["pretrain", str(TINY), "--overwrite"]
    for override in tiny_overrides(store, out, steps=2):
        args += ["--set", override]
    one_line_error(runner.invoke(app(), args), "training diverged: loss is nan at step 1")
    assert checkpoint_dirs(out) == [kept]


def test_overwrite_refuses_to_replace_the_run_a_finetune_starts_from(store, tmp_path):
    out = tmp_path / "run"
    kept = train(load_recipe(TINY, tiny_overrides(store, out, steps=2))).checkpoint
    args = ["finetune", str(TINY), "--init", str(out), "--overwrite"]
    for override in tiny_overrides(store, out, steps=2):
        args += ["--set", override]
    one_line_error(runner.invoke(app(), args), "lies in train.out", "would be deleted")
    assert checkpoint_dirs(out) == [kept]


def test_resume_latest_without_a_checkpoint_says_it_starts_from_step_0(store, tmp_path):
    """A typo in train.out with --resume latest must not pass unnoticed as a resumed run."""
    args = ["pretrain", str(TINY), "--resume", "latest"]
    for override in tiny_overrides(store, tmp_path / "new-run", steps=1):
        args += ["--set", override]
    result = runner.invoke(app(), args)
    assert result.exit_code == 0, result.output
    assert "holds no checkpoint yet; starting from step 0" in " ".join(result.output.split())

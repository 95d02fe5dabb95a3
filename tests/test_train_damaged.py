"""Resuming from a damaged checkpoint ends with one line naming the file and what is wrong with it (and,
for --resume latest, the older checkpoint to give instead), never a traceback, and writes nothing."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import SyntheticSource, write_store
from tests.run_fixtures import TINY, app, one_line_error, runner, tiny_overrides
from xwam_core.recipe import load_recipe
from xwam_core.runlock import LOCK_NAME
from xwam_core.train import train

NEWEST, OLDER = "step-00000002", "step-00000001"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    """(store, run) with the checkpoints of steps 1 and 2."""
    base = tmp_path_factory.mktemp("damaged")
    store = base / "store"
    write_store(store, SyntheticSource(episodes=3, length=14, size=(32, 32), views=("a", "b")))
    train(load_recipe(TINY, overrides(store, base / "run", steps=2)))
    return store, base / "run"


def overrides(store: Path, out: Path, steps: int = 3) -> list[str]:
    return [*tiny_overrides(store, out, steps), "train.checkpoint_every=1", "train.keep_last=2"]


def truncate(relative: str) -> Callable[[Path], None]:
    def damage(ckpt: Path) -> None:
        file = ckpt / relative
        os.truncate(file, file.stat().st_size // 2)

    return damage


def remove(relative: str) -> Callable[[Path], None]:
    def damage(ckpt: Path) -> None:
        target = ckpt / relative
        shutil.rmtree(target) if target.is_dir() else target.unlink()

    return damage


def edit_json(relative: str, change: Callable[[dict], object]) -> Callable[[Path], None]:
    def damage(ckpt: Path) -> None:
        file = ckpt / relative
        data = json.loads(file.read_text())
        result = change(data)
        file.write_text(json.dumps(data if result is None else result))

    return damage


def edit_tensors(relative: str, change: Callable[[dict], None]) -> Callable[[Path], None]:
    def damage(ckpt: Path) -> None:
        file = ckpt / relative
        tensors = load_file(file)
        change(tensors)
        save_file(tensors, file)

    return damage


def first_trainable(tensors: dict) -> None:
    name = sorted(tensors)[0]
    tensors[name] = torch.zeros(3, 3)


TRAINER, OPTIMIZER = "training/trainer.json", "training/optimizer.json"
CASES: dict[str, tuple[Callable[[Path], None], list[str]]] = {
    "model weights cut short": (
        truncate("model/diffusion_pytorch_model.safetensors"),
        ["model/diffusion_pytorch_model.safetensors", "not a complete safetensors file", "cut short"],
    ),
    "optimizer state cut short": (
        truncate("training/optimizer.safetensors"),
        ["training/optimizer.safetensors", "not a complete safetensors file"],
    ),
    "trainable weights cut short": (
        truncate("training/trainable.safetensors"),
        ["training/trainable.safetensors", "not a complete safetensors file"],
    ),
    "rng state cut short": (
        truncate("training/rng.safetensors"),
        ["training/rng.safetensors", "not a complete"],
    ),
    "text embeddings empty": (
        lambda ckpt: os.truncate(ckpt / "text.safetensors", 0),
        ["text.safetensors", "header too small"],
    ),
    "marker cut short": (truncate("xwam_checkpoint.json"), ["xwam_checkpoint.json", "not valid JSON"]),
    "training state missing": (
        remove("training"),
        ["checkpoint lacks training (listed in xwam_checkpoint.json)"],
    ),
    "optimizer.json missing": (remove(OPTIMIZER), ["training: checkpoint lacks optimizer.json"]),
    "trainer.json missing": (remove(TRAINER), ["training: checkpoint lacks trainer.json"]),
    "rng.safetensors missing": (
        remove("training/rng.safetensors"),
        ["checkpoint lacks training/rng.safetensors"],
    ),
    "trainer.json cut short": (truncate(TRAINER), [TRAINER, "not valid JSON"]),
    "trainer.json a list": (edit_json(TRAINER, lambda d: [d]), [TRAINER, "expected a JSON object"]),
    "trainer.json without scheduler": (
        edit_json(TRAINER, lambda d: d.pop("scheduler") and None),
        [TRAINER, "key 'scheduler' is missing (expected an object)"],
    ),
    "step of the wrong type": (
        edit_json(TRAINER, lambda d: d.update(step="two")),
        [TRAINER, "'step' is 'two', expected a non-negative integer"],
    ),
    "history of the wrong type": (
        edit_json(TRAINER, lambda d: d.update(history=5)),
        [TRAINER, "'history' is 5, expected a list of {name: number} entries"],
    ),
    "scheduler epoch of the wrong type": (
        edit_json(TRAINER, lambda d: d["scheduler"].update(last_epoch="x")),
        [TRAINER, "'scheduler.last_epoch' is 'x', expected an integer"],
    ),
    "numpy rng state malformed": (
        edit_json(TRAINER, lambda d: d["rng"].update(numpy=["MT19937", [1, 2], 0, 0, 0.0])),
        [TRAINER, "'rng.numpy' is", "expected numpy's MT19937 state"],
    ),
    "python rng state missing": (
        edit_json(TRAINER, lambda d: d["rng"].pop("python") and None),
        [TRAINER, "key 'rng.python' is missing"],
    ),
    "optimizer refers to a missing tensor": (
        edit_json(OPTIMIZER, lambda d: d["state"]["0"].update(exp_avg={"tensor": "nowhere"})),
        [OPTIMIZER, "state 0.exp_avg refers to tensor 'nowhere', which", "optimizer.safetensors lacks"],
    ),
    "optimizer groups malformed": (
        edit_json(OPTIMIZER, lambda d: d.update(param_groups={"lr": 1})),
        [OPTIMIZER, "'param_groups' is", "expected a list of parameter groups"],
    ),
    "torch rng state of another size": (
        edit_tensors(
            "training/rng.safetensors", lambda t: t.update(torch_cpu=torch.zeros(10, dtype=torch.uint8))
        ),
        ["training/rng.safetensors", "'torch_cpu' is torch.uint8 of shape (10,), expected a uint8 tensor"],
    ),
}
# well-formed files that do not fit what the recipe builds: the recipe is the likelier culprit, and an older
# checkpoint of the same run would not fit either
MISFITS: dict[str, tuple[Callable[[Path], None], list[str]]] = {
    "optimizer groups of another size": (
        edit_json(OPTIMIZER, lambda d: d["param_groups"][0]["params"].pop() and None),
        [OPTIMIZER, "parameter groups of", "this recipe optimises"],
    ),
    "a trainable tensor of another shape": (
        edit_tensors("training/trainable.safetensors", first_trainable),
        ["training/trainable.safetensors", "has shape (3, 3), this recipe builds"],
    ),
    "an optimizer moment of another shape": (
        edit_tensors("training/optimizer.safetensors", lambda t: t.update({"0.exp_avg": torch.zeros(2)})),
        ["training/optimizer.safetensors", "'0.exp_avg' has shape (2,)"],
    ),
}


def damaged_copy(run: Path, tmp_path: Path, case: str) -> Path:
    """The run with its newest checkpoint copied (then damaged) and the older one hard-linked."""
    copy = tmp_path / "run"
    (copy / "checkpoints").mkdir(parents=True)
    shutil.copy(run / "recipe.toml", copy / "recipe.toml")
    shutil.copytree(run / "checkpoints" / OLDER, copy / "checkpoints" / OLDER, copy_function=os.link)
    shutil.copytree(run / "checkpoints" / NEWEST, copy / "checkpoints" / NEWEST)
    ({**CASES, **MISFITS})[case][0](copy / "checkpoints" / NEWEST)
    return copy


@pytest.mark.parametrize("case", list(CASES))
def test_resume_latest_names_the_damaged_file_and_the_older_checkpoint(run, tmp_path, case):
    store, source = run
    copy = damaged_copy(source, tmp_path, case)
    before = sorted((p.name, p.stat().st_size) for p in copy.rglob("*"))
    args = [arg for o in overrides(store, copy) for arg in ("--set", o)]
    result = runner.invoke(app(), ["pretrain", str(TINY), *args, "--resume", "latest"])
    newest = copy / "checkpoints" / NEWEST
    one_line_error(
        result,
        *[
            str(newest / n) if n.startswith(("training/", "model/", "text.", "xwam_")) else n
            for n in CASES[case][1]
        ],
        f"(--resume latest: the newest checkpoint {NEWEST} is damaged; resume from an older one by path: "
        f"--resume {copy / 'checkpoints' / OLDER})",
    )
    assert sorted((p.name, p.stat().st_size) for p in copy.rglob("*")) == before  # nothing written
    assert not (copy / LOCK_NAME).exists()


@pytest.mark.parametrize("case", list(MISFITS))
def test_resume_names_tensors_that_do_not_fit_the_recipe(run, tmp_path, case):
    store, source = run
    copy = damaged_copy(source, tmp_path, case)
    args = [arg for o in overrides(store, copy) for arg in ("--set", o)]
    result = runner.invoke(app(), ["pretrain", str(TINY), *args, "--resume", "latest"])
    file, *needles = MISFITS[case][1]
    newest = copy / "checkpoints" / NEWEST
    one_line_error(result, str(newest / file), *needles, "resume with the recipe the run used")
    assert not (copy / LOCK_NAME).exists()


def test_resume_by_path_names_the_damaged_file(run, tmp_path):
    store, source = run
    copy = damaged_copy(source, tmp_path, "optimizer state cut short")
    args = [arg for o in overrides(store, copy) for arg in ("--set", o)]
    newest = copy / "checkpoints" / NEWEST
    result = runner.invoke(app(), ["pretrain", str(TINY), *args, "--resume", str(newest)])
    one_line_error(
        result, str(newest / "training" / "optimizer.safetensors"), "not a complete safetensors file"
    )
    assert "--resume latest" not in result.output
    older = runner.invoke(
        app(), ["pretrain", str(TINY), *args, "--resume", str(copy / "checkpoints" / OLDER)]
    )
    assert older.exit_code == 0, older.output  # the older one, given by path, resumes
    # and says so, rather than the build's "random initialisation"
    said = " ".join(older.output.split())
    assert f"model: resumed from {copy / 'checkpoints' / OLDER} at step 1 of " in said, older.output
    assert "random initialisation" not in said

"""FSDP2 (train.strategy=fsdp2) proven on 2 CPU processes with gloo: per-step losses and the global
gradient norm equal those of 1 process on the same global batch (with gradient accumulation and gradient
checkpointing on the sharded side); the sharded checkpoint resumes on 1 process (DCP resharding) and,
after a SIGKILL inside a checkpoint write, on 2, ending where the uninterrupted run ends; the export
infers through the Policy. DDP with accumulation on 2 processes matches too."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import SyntheticSource, free_port, write_store
from xwam_core.checkpoint import checkpoint_dirs, load_policy_parts, load_training_state
from xwam_core.data.reader import EpisodeStore
from xwam_core.data.windows import WindowDataset
from xwam_core.errors import XWAMError
from xwam_core.policy import Policy
from xwam_core.recipe import load_recipe
from xwam_core.train import Trainer, train

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny_cpu.toml"
STEPS = 4
WEIGHTS = "model/diffusion_pytorch_model.safetensors"
# the 2-process runs: 2 micro-batches of 1 per process and step (accumulation), gradient checkpointing
SHARDED = ("train.micro_batch=1", "train.gradient_checkpointing=true")


def overrides(store: Path, out: Path, *more: str) -> list[str]:
    return [
        f"data.store={store}",
        "data.future_frames=4",
        "data.frame_stride=2",
        "data.batch_size=4",
        "data.num_workers=0",
        "data.val_episodes=1",
        "model.overrides={num_layers = 2, num_depth_blocks = 1}",
        f"train.max_steps={STEPS}",
        "train.checkpoint_every=1",
        "train.keep_last=0",
        "train.val_every=2",
        "train.warmup_steps=1",
        "train.grad_clip=0.3",  # below the norms of these steps: the clip acts on every step
        "train.strategy=fsdp2",
        f"train.out={out}",
        *more,
    ]


def launch(store: Path, out: Path, record: Path, resume: str, *more: str, env: dict | None = None):
    """2 gloo processes under torchrun (a session of their own, so a test can kill the whole group)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(ROOT / "tests" / "dist_fsdp.py"), str(TINY), str(record), resume, *overrides(store, out, *more)]  # fmt: skip
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(
        cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def finished(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    return out


def history(record: Path, rank: int = 0) -> list[dict]:
    return json.loads(Path(f"{record}.rank{rank}.json").read_text())["history"]


def assert_same_history(a: list[dict], b: list[dict], rtol: float = 1e-5) -> None:
    assert [h["step"] for h in a] == [h["step"] for h in b]
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys(), (x, y)
        for key in x:
            assert x[key] == pytest.approx(y[key], rel=rtol, abs=1e-7), (x["step"], key, x[key], y[key])


def assert_close_weights(a: Path, b: Path, exact: bool = False) -> None:
    wa, wb = load_file(a / WEIGHTS), load_file(b / WEIGHTS)
    assert wa.keys() == wb.keys()
    for key in wa:
        if exact:
            assert torch.equal(wa[key], wb[key]), key
        else:
            # summation order differs between 1 and 2 processes; Adam's normalisation turns the last-bit
            # gradient differences of near-zero entries into ~1e-5 weight differences (lr 1e-3, 4 steps)
            torch.testing.assert_close(wa[key], wb[key], rtol=1e-3, atol=5e-5, msg=key)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fsdp") / "store"
    write_store(path, SyntheticSource(episodes=3, length=14, size=(32, 32), views=("a", "b")))
    return path


@pytest.fixture(scope="module")
def sharded_run(store, tmp_path_factory) -> Path:
    """The uninterrupted 2-process FSDP2 run (SHARDED), a checkpoint every step, and an export of the
    final model."""
    root = tmp_path_factory.mktemp("fsdp-run")
    proc = launch(
        store, root / "run", root / "record", "-", *SHARDED,
        env={"XWAM_TEST_EXPORT": str(root / "export")},
    )  # fmt: skip
    finished(proc)
    return root


@pytest.mark.slow
def test_two_sharded_processes_match_one_and_their_checkpoint_resumes_on_one(store, sharded_run, tmp_path):
    record = sharded_run / "record"
    sharded = history(record)
    assert history(record, 1) == sharded  # every process logs the global figures
    described = json.loads(Path(f"{record}.rank0.json").read_text())["described"]
    assert (described["strategy"], described["processes"], described["accumulation"]) == ("fsdp2", 2, 2)
    assert all(h["grad_norm"] > 0.3 for h in sharded)  # the clip acted on every step

    # 1 process, the same global batch of 4 at once, today's path (ddp strategy: plain training):
    # the same losses, and the same GLOBAL gradient norm (the sharded one is reduced over the processes)
    single = train(load_recipe(TINY, overrides(store, tmp_path / "single", "train.strategy=ddp")))
    assert_same_history(sharded, single.history)
    final = f"checkpoints/step-{STEPS:08d}"
    assert_close_weights(sharded_run / "run" / final, tmp_path / "single" / final)

    # the export is an inference checkpoint of the final weights: it acts like the 1-process model
    export = sharded_run / "export"
    parts = load_policy_parts(export)
    assert parts.step == STEPS and not (export / "training").exists()
    ds = EpisodeStore(store)
    window = WindowDataset(ds, parts.data.window, episodes=[2], normalize=False)[0]
    obs = {
        "images": {v: window["rgb"][j, 0] for j, v in enumerate(parts.data.views)},
        "state": window["states"][0],
        "task": ds.episodes[int(window["episode_index"])].task,
    }
    a = Policy.from_checkpoint(export).predict(obs, generator=torch.Generator().manual_seed(3)).actions
    b = Policy.from_checkpoint(single.checkpoint).predict(obs, generator=torch.Generator().manual_seed(3))
    assert a.shape == (1, 8, 4) and np.isfinite(a).all()
    np.testing.assert_allclose(a, b.actions, rtol=1e-3, atol=1e-4)

    # written by 2 processes, resumed on 1 (DCP reshards): steps 3 and 4 as the 2 processes trained them
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(
        sharded_run / "run" / "checkpoints" / "step-00000002", resumed / "checkpoints" / "step-00000002"
    )
    trainer = Trainer(load_recipe(TINY, overrides(store, resumed)), resume="latest")
    assert trainer.step == 2 and trainer.world == 1
    result = trainer.fit()
    assert_same_history(result.history, sharded)
    assert_close_weights(resumed / final, sharded_run / "run" / final)

    # a sharded checkpoint is refused by the ddp strategy, with one line
    with pytest.raises(
        XWAMError, match=r"with train.strategy=fsdp2, this recipe trains with train.strategy=ddp"
    ):
        Trainer(load_recipe(TINY, overrides(store, resumed, "train.strategy=ddp")), resume="latest")


@pytest.mark.slow
def test_sigkill_inside_a_sharded_checkpoint_write_resumes_to_the_uninterrupted_end(
    store, sharded_run, tmp_path
):
    run = tmp_path / "killed"
    proc = launch(
        store, run, tmp_path / "first", "-", *SHARDED,
        env={"XWAM_TEST_WRITE_DELAY": "2.0"},
    )  # fmt: skip
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("@@ write step-00000003"):  # the main process writes step 3's state
            time.sleep(0.3)
            for pid in [*descendants(proc.pid), proc.pid]:  # both workers and torchrun, at once
                os.kill(pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert [p.name for p in checkpoint_dirs(run)] == ["step-00000001", "step-00000002"]
    assert list((run / "checkpoints").glob(".step-00000003.tmp-*"))  # the write was cut: a temporary
    load_training_state(checkpoint_dirs(run)[-1])  # every shard listed is whole

    finished(launch(store, run, tmp_path / "again", "latest", *SHARDED))
    again = json.loads(Path(f"{tmp_path / 'again'}.rank0.json").read_text())
    assert again["start"] == 2
    assert not list((run / "checkpoints").glob(".step-*"))  # the leftover temporary was removed
    final = f"checkpoints/step-{STEPS:08d}"
    assert_close_weights(run / final, sharded_run / "run" / final, exact=True)
    ref = json.loads((sharded_run / "run" / final / "training" / "trainer.json").read_text())
    got = json.loads((run / final / "training" / "trainer.json").read_text())
    assert got["history"] == ref["history"] and got["rng"] == ref["rng"]
    assert load_file(run / final / "training" / "rng.safetensors")["torch_cpu"].equal(
        load_file(sharded_run / "run" / final / "training" / "rng.safetensors")["torch_cpu"]
    )


@pytest.mark.slow
def test_ddp_with_accumulation_on_two_processes_matches_too(store, sharded_run, tmp_path):
    """The DDP path accumulates under accelerate's no_sync: the same losses and global gradient norms."""
    finished(launch(store, tmp_path / "ddp", tmp_path / "ddp", "-", *SHARDED, "train.strategy=ddp"))
    assert_same_history(history(tmp_path / "ddp"), history(sharded_run / "record"))


@pytest.mark.slow
def test_bf16_parameters_with_float32_reduction_train_and_save_float32(store, sharded_run, tmp_path):
    """train.mixed_precision=bf16 (what "auto" picks on CUDA): FSDP2 computes with bf16 parameters and
    reduces gradients in float32; the sharded parameters, and so every checkpoint, stay float32. Forced
    here on CPU, where autocast has bf16 too."""
    out = tmp_path / "bf16"
    finished(launch(store, out, tmp_path / "bf16", "-", *SHARDED, "train.mixed_precision=bf16", "train.max_steps=2"))  # fmt: skip
    described = json.loads(Path(f"{tmp_path / 'bf16'}.rank0.json").read_text())["described"]
    assert described["mixed_precision"] == "bf16"
    got, want = history(tmp_path / "bf16"), history(sharded_run / "record")[:2]
    assert got != want  # bf16 did compute
    for a, b in zip(got, want, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-2) and a["grad_norm"] == pytest.approx(
            b["grad_norm"], rel=2e-2
        )
    weights = load_file(out / "checkpoints" / "step-00000002" / WEIGHTS)
    assert {v.dtype for v in weights.values()} == {torch.float32}


@pytest.mark.slow
def test_a_cut_or_lost_shard_is_named_before_anything_is_unpickled(sharded_run, tmp_path):
    ckpt = tmp_path / "step-00000001"
    shutil.copytree(sharded_run / "run" / "checkpoints" / "step-00000001", ckpt)
    assert load_training_state(ckpt).shards is not None
    shard = ckpt / "training" / "sharded" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(
        XWAMError, match=r"__1_0.distcp: \d+ bytes, trainer.json recorded \d+; it was probably cut short"
    ):
        load_training_state(ckpt)
    shard.unlink()
    with pytest.raises(XWAMError, match=r"checkpoint lacks training/sharded/__1_0.distcp"):
        load_training_state(ckpt)


@pytest.mark.slow
def test_dcp_metadata_is_read_with_a_restricted_unpickler(sharded_run, tmp_path):
    """The sharded state's one pickle (DCP's .metadata) resolves only DCP's own classes: a real one loads,
    one that would run code is refused with one line naming the file, and the code never runs."""
    import pickle

    from torch.distributed.checkpoint.metadata import Metadata

    from xwam_core.checkpoint import read_shards
    from xwam_core.dcp_metadata import RestrictedFileSystemReader

    ckpt = tmp_path / "step-00000001"
    shutil.copytree(sharded_run / "run" / "checkpoints" / "step-00000001", ckpt)
    sharded = ckpt / "training" / "sharded"
    assert isinstance(RestrictedFileSystemReader(sharded).read_metadata(), Metadata)

    marker = tmp_path / "ran"

    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (sharded / ".metadata").write_bytes(pickle.dumps(RunsCode()))
    with pytest.raises(
        XWAMError, match=r"sharded/.metadata: not a torch.distributed.checkpoint metadata file"
    ) as e:
        read_shards(ckpt, {})
    assert "\n" not in str(e.value) and ("posix.system" in str(e.value) or "os.system" in str(e.value))
    assert not marker.exists()
    (sharded / ".metadata").write_bytes(pickle.dumps({"not": "metadata"}))
    with pytest.raises(XWAMError, match="holds a dict, expected DCP's Metadata"):
        RestrictedFileSystemReader(sharded).read_metadata()

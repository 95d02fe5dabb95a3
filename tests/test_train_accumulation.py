"""Gradient accumulation (train.micro_batch) and the codec's micro-batches (train.codec_micro_batch): k
micro-batches give the update of one batch k times larger; the recipe keys are checked with one line.
The same under FSDP2 on 2 processes: tests/test_train_fsdp.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import SyntheticSource, write_store
from xwam_core.errors import RecipeError
from xwam_core.recipe import load_recipe
from xwam_core.train import Trainer, train

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny_cpu.toml"
STEPS = 3


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
        f"train.checkpoint_every={STEPS}",
        "train.val_every=0",
        "train.warmup_steps=1",
        "train.grad_clip=0.3",  # acts on every step: the clip sees the whole accumulated gradient
        f"train.out={out}",
        *more,
    ]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("accumulation") / "store"
    write_store(path, SyntheticSource(episodes=3, length=14, size=(32, 32), views=("a", "b")))
    return path


def test_micro_batches_give_the_update_of_the_whole_batch(store, tmp_path):
    runs = {}
    for name, more in (
        ("whole", ()),
        ("halves", ("train.micro_batch=2",)),
        ("singles", ("train.micro_batch=1", "train.codec_micro_batch=1")),
    ):
        runs[name] = train(load_recipe(TINY, overrides(store, tmp_path / name, *more)))
    whole = runs["whole"]
    assert all(h["grad_norm"] > 0.3 for h in whole.history)
    for name in ("halves", "singles"):
        for a, b in zip(runs[name].history, whole.history, strict=True):
            assert a.keys() == b.keys()
            for key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (name, a["step"], key)
        got = load_file(runs[name].checkpoint / "model" / "diffusion_pytorch_model.safetensors")
        want = load_file(whole.checkpoint / "model" / "diffusion_pytorch_model.safetensors")
        for key in want:
            # float summation order differs; Adam's normalisation magnifies it on near-zero gradients
            torch.testing.assert_close(got[key], want[key], rtol=1e-3, atol=5e-5, msg=f"{name} {key}")


def test_accumulation_is_described(store, tmp_path):
    trainer = Trainer(load_recipe(TINY, overrides(store, tmp_path / "run", "train.micro_batch=1")))
    try:
        described = trainer.describe()
        assert (described["micro_batch"], described["accumulation"], described["strategy"]) == (1, 4, "ddp")
    finally:
        trainer.close()


@pytest.mark.parametrize(
    "setting, message",
    [
        (
            "train.micro_batch=3",
            r"train.micro_batch=3: must divide the per-process batch 4 \(data.batch_size=4",
        ),
        ("train.micro_batch=8", "train.micro_batch=8: must divide the per-process batch 4"),
        ("train.micro_batch=-1", "train.micro_batch: expected an integer >= 0"),
        ("train.codec_micro_batch=-2", "train.codec_micro_batch: expected an integer >= 0"),
        ("train.strategy='zero3'", "train.strategy: expected one of ddp, fsdp2, got 'zero3'"),
        ("train.ema_decay=0.99", "train.ema_decay: expected 0 with train.strategy=fsdp2"),
        ("train.lora_rank=4", "train.lora_rank: expected 0 with train.strategy=fsdp2"),
        (
            "train.mixed_precision='fp16'",
            "train.mixed_precision: expected auto, no or bf16 with train.strategy=fsdp2",
        ),
    ],
)
def test_bad_settings_are_refused_with_one_line_and_nothing_written(store, tmp_path, setting, message):
    fsdp2_only = any(key in setting for key in ("ema", "fp16", "lora"))
    more = (setting, "train.strategy=fsdp2") if fsdp2_only else (setting,)
    out = tmp_path / "run"
    with pytest.raises(RecipeError, match=message) as err:
        Trainer(load_recipe(TINY, overrides(store, out, *more)))
    assert "\n" not in str(err.value)
    assert not out.exists()


def test_the_codec_encodes_in_micro_batches(store, tmp_path):
    """train.codec_micro_batch=2 on a batch of 4: the codec never sees more than 2 clips at once, and
    the latents are those of encoding all 4 together."""
    trainer = Trainer(load_recipe(TINY, overrides(store, tmp_path / "run", "train.codec_micro_batch=2")))
    try:
        objective = trainer._plain_objective()
        batch = next(iter(trainer.loader))
        seen: list[int] = []
        encode = objective.codec.encode_views

        def spy(frames):
            seen.append(frames.shape[0])
            return encode(frames)

        objective.codec.encode_views = spy
        chunked = objective.noise(batch, seed=0, step=0, first_index=0)
        assert seen == [2, 2, 2, 2]  # RGB and depth, 2 clips each time
        objective.codec_micro_batch = 0
        whole = objective.noise(batch, seed=0, step=0, first_index=0)
        assert seen[4:] == [4, 4]
        assert torch.equal(chunked.x.video, whole.x.video) and torch.equal(chunked.x.depth, whole.x.depth)
    finally:
        trainer.close()

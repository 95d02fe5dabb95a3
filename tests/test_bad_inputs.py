"""A corpus of bad inputs across every command, run through the CLI as a user would type them.

Each case must end with exactly one `error:` line naming what was wrong, no traceback, a non-zero exit,
and nothing written: no file under the case's folder and no change to the shared store, checkpoint or
run changes. The cases: usage errors, recipe files (missing, empty, binary, not UTF-8, bad TOML, unknown
keys, wrong types, settings out of range), wrong checkpoint and store paths, damaged run folders,
impossible option combinations. Beside them: the bug line, --debug / XWAM_DEBUG, and file-system errors.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.run_fixtures import (
    TINY,
    app,
    metaworld_checkpoint,
    one_line_error,
    other_store,
    runner,
    tiny_checkpoint,
    world_run,
)


@dataclass
class Env:
    """One case's world: its own folder, and the session's tiny store, checkpoint and world-mode run."""

    tmp: Path
    store: Path
    ckpt: Path
    shared_run: Path
    other_store: Path
    mw_ckpt: Path | None = None  # a checkpoint shaped for Meta-World, for the --sim cases

    @property
    def run(self) -> Path:
        """A private copy of the world-mode run (made on first use), free to damage."""
        copy = self.tmp / "run"
        if not copy.exists():
            shutil.copytree(self.shared_run, copy)
        return copy

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.tmp / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        return path

    def infer(self, *extra: str) -> list[str]:
        return [
            "infer",
            "--ckpt",
            str(self.ckpt),
            "--data",
            str(self.store),
            "--out",
            str(self.tmp / "out"),
            *extra,
        ]

    def pretrain_small(self, *sets: str) -> list[str]:
        """pretrain with settings the tiny store fits (a 2-block model, short windows), then `sets`."""
        fits = [
            "data.future_frames=4",
            "data.frame_stride=2",
            "data.num_workers=0",
            "data.batch_size=2",
            "model.overrides={num_layers = 2, num_depth_blocks = 1}",
        ]
        return self.pretrain(*fits, *sets)

    def sim(self, *extra: str) -> list[str]:
        assert self.mw_ckpt is not None
        return ["evaluate", "--sim", "metaworld", "--ckpt", str(self.mw_ckpt), "--tasks", "reach-v3", *extra]

    def lerobot_info(self, content: str) -> list[str]:
        """prepare from a LeRobot folder whose meta/info.json is `content`."""
        (self.tmp / "ds" / "meta").mkdir(parents=True)
        (self.tmp / "ds" / "meta" / "info.json").write_text(content)
        return ["prepare", "lerobot", str(self.tmp / "ds"), "--out", str(self.tmp / "o")]

    def pretrain(self, *sets: str) -> list[str]:
        args = [
            "pretrain",
            str(TINY),
            "--set",
            f"data.store={self.store}",
            "--set",
            f"train.out={self.tmp / 'train'}",
        ]
        for s in sets:
            args += ["--set", s]
        return args


@dataclass
class Case:
    id: str
    args: Callable[[Env], list[str]]
    needles: tuple[str, ...]
    sim: bool = False  # needs the Meta-World simulator (and its checkpoint)


def edit_manifest(run: Path, change: Callable[[dict], object]) -> Path:
    manifest = json.loads((run / "manifest.json").read_text())
    change(manifest)
    (run / "manifest.json").write_text(json.dumps(manifest))
    return run


def edit_arrays(run: Path, change: Callable[[dict], object]) -> Path:
    with np.load(run / "predictions.npz", allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    change(arrays)
    np.savez(run / "predictions.npz", **arrays)
    return run


def truncate(path: Path, keep: float) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def corrupt_middle(path: Path) -> Path:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(64)
    path.write_bytes(bytes(data))
    return path


def damaged(env: Env, damage: Callable[[Path], object]) -> str:
    damage(env.run)
    return str(env.run)


def set_(d: dict, key: str, value: object) -> None:
    d[key] = value


RECIPE_OUT_OF_RANGE = [
    ("train.max_steps=0", "train.max_steps", ">= 1"),
    ("data.batch_size=0", "data.batch_size", ">= 1"),
    ("train.lr=-1e-3", "train.lr", "> 0"),
    ("train.lr=nan", "train.lr", "finite"),
    ("data.num_workers=-1", "data.num_workers", ">= 0"),
    ("train.betas=[0.9, 1.0]", "train.betas", "[0, 1)"),
    ("train.weight_decay=-0.1", "train.weight_decay", ">= 0"),
    ("train.ema_decay=1", "train.ema_decay", "[0, 1)"),
    ("train.keep_last=-1", "train.keep_last", ">= 0"),
    ("train.val_batches=0", "train.val_batches", ">= 1"),
    ("data.future_frames=0", "data.future_frames", ">= 1"),
    ("model.depth_far=0.1", "model.depth_far", "depth_near"),
    ("train.mixed_precision='fp8'", "train.mixed_precision", "bf16"),
    ("model.preset='huge'", "model.preset", "tiny"),
    ("noise.p_clean_action=2", "noise.p_clean_action", "[0, 1]"),
    ("inference.num_steps_action=99", "inference.num_steps_action", "num_steps_video"),
    ("train.augment.crop_scale=0", "train.augment.crop_scale", "(0, 1]"),
    ("train.grad_clip=inf", "train.grad_clip", "finite"),
]

CASES: list[Case] = [
    # ---- the command line itself
    Case("no-such-command", lambda e: ["nope"], ("no such command 'nope'",)),
    Case("misspelt-global-option", lambda e: ["--debgu", "infer"], ("--debgu",)),
    Case("infer-no-options", lambda e: ["infer"], ("missing option '--ckpt'", "infer --help")),
    Case("infer-no-out", lambda e: e.infer()[:5], ("missing option '--out'",)),
    Case(
        "infer-int-option-text", lambda e: e.infer("--windows-per-episode", "q"), ("--windows-per-episode",)
    ),
    Case("infer-int-option-float", lambda e: e.infer("--batch-size", "1.5"), ("--batch-size",)),
    Case("infer-unknown-option", lambda e: e.infer("--steps", "3"), ("no such option: --steps",)),
    Case("evaluate-extra-argument", lambda e: ["evaluate", str(e.run), "more"], ("extra argument", "more")),
    Case("pretrain-no-recipe", lambda e: ["pretrain"], ("missing argument",)),
    Case("finetune-no-init", lambda e: ["finetune", str(TINY)], ("finetune needs --init",)),
    Case(
        "reconstruct-float-option-text",
        lambda e: ["reconstruct", str(e.run), "--voxel-size", "fine"],
        ("--voxel-size",),
    ),
    Case("convert-no-out", lambda e: ["convert", "xwam-v0", str(e.ckpt)], ("missing option '--out'",)),
    # ---- recipe files
    Case(
        "recipe-missing",
        lambda e: ["pretrain", str(e.tmp / "none.toml")],
        ("none.toml", "recipe file not found"),
    ),
    Case("recipe-is-folder", lambda e: ["pretrain", str(e.tmp)], ("is a folder", "TOML file")),
    Case(
        "recipe-empty", lambda e: ["pretrain", str(e.file("empty.toml", "\n  \n"))], ("empty.toml", "empty")
    ),
    Case(
        "recipe-binary",
        lambda e: ["pretrain", str(e.file("bin.toml", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe"))],
        ("bin.toml", "not UTF-8"),
    ),
    Case(
        "recipe-latin1",
        lambda e: ["pretrain", str(e.file("latin.toml", "name = 'caf\xe9'\n".encode("latin-1")))],
        ("latin.toml", "not UTF-8"),
    ),
    Case(
        "recipe-nul-bytes",
        lambda e: ["pretrain", str(e.file("nul.toml", b"seed = 1\n\x00\x00\n"))],
        ("nul.toml", "not valid TOML"),
    ),
    Case(
        "recipe-bad-toml",
        lambda e: ["pretrain", str(e.file("bad.toml", "[train\nlr = 1\n"))],
        ("not valid TOML",),
    ),
    Case(
        "recipe-unknown-key",
        lambda e: ["pretrain", str(e.file("k.toml", "sed = 1\n"))],
        ("unknown key 'sed'",),
    ),
    Case(
        "recipe-unknown-nested-key",
        lambda e: ["pretrain", str(e.file("k.toml", "[train]\nlrr = 1e-4\n"))],
        ("unknown key 'train.lrr'",),
    ),
    Case(
        "recipe-string-for-number",
        lambda e: ["pretrain", str(e.file("t.toml", "[train]\nlr = 'fast'\n"))],
        ("train.lr", "expects a number", "'fast'"),
    ),
    Case(
        "recipe-float-for-int",
        lambda e: ["pretrain", str(e.file("t.toml", "[data]\nbatch_size = 2.5\n"))],
        ("data.batch_size", "expects an integer", "2.5"),
    ),
    Case(
        "recipe-scalar-for-section",
        lambda e: ["pretrain", str(e.file("t.toml", "train = 3\n"))],
        ("'train' expects a table",),
    ),
    Case("set-without-equals", lambda e: e.pretrain("train.max_steps"), ("expected section.key=value",)),
    Case("set-into-a-value", lambda e: e.pretrain("seed.x=1"), ("'seed' is not a section",)),
    Case("set-unknown-key", lambda e: e.pretrain("train.steps=3"), ("unknown key 'train.steps'",)),
    *[
        Case(
            f"pretrain-{o.split('=')[0]}-{o.split('=')[1]}",
            lambda e, o=o: e.pretrain(o),
            (key, expected, "tiny_cpu.toml"),
        )
        for o, key, expected in RECIPE_OUT_OF_RANGE
    ],
    Case(
        "finetune-store-missing",
        lambda e: ["finetune", str(TINY), "--init", str(e.ckpt), "--set", f"data.store={e.tmp / 'gone'}"],
        ("gone", "store not found"),
    ),
    Case(
        "finetune-out-of-range",
        lambda e: ["finetune", str(TINY), "--init", str(e.ckpt), "--set", "data.batch_size=0"],
        ("data.batch_size",),
    ),
    Case(
        "pretrain-store-missing",
        lambda e: e.pretrain(f"data.store={e.tmp / 'nostore'}"),
        ("nostore", "store not found"),
    ),
    Case(
        "finetune-init-missing",
        lambda e: [
            "finetune",
            str(TINY),
            "--init",
            str(e.tmp / "nockpt"),
            *(
                "--set",
                f"data.store={e.store}",
                "--set",
                "data.future_frames=4",
                "--set",
                "data.frame_stride=2",
            ),
        ],
        ("nockpt",),
    ),
    # ---- prepare
    Case(
        "prepare-unknown-source",
        lambda e: ["prepare", "carla", "--out", str(e.tmp / "o")],
        ("unknown source 'carla'",),
    ),
    Case("prepare-no-out", lambda e: ["prepare", "metaworld"], ("--out",)),
    Case(
        "prepare-lerobot-no-path",
        lambda e: ["prepare", "lerobot", "--out", str(e.tmp / "o")],
        ("one dataset folder",),
    ),
    Case(
        "prepare-lerobot-metaworld-option",
        lambda e: ["prepare", "lerobot", str(e.tmp / "ds"), "--out", str(e.tmp / "o"), "--size", "64"],
        ("--size", "metaworld source"),
    ),
    Case(
        "prepare-lerobot-views-not-pairs",
        lambda e: ["prepare", "lerobot", str(e.tmp / "ds"), "--out", str(e.tmp / "o"), "--views", "front"],
        ("--views 'front'", "camera_key=view_name"),
    ),
    Case(
        "prepare-lerobot-missing-folder",
        lambda e: ["prepare", "lerobot", str(e.tmp / "ds"), "--out", str(e.tmp / "o")],
        ("ds",),
    ),
    Case(
        "prepare-metaworld-size",
        lambda e: ["prepare", "metaworld", "--size", "32", "--out", str(e.tmp / "o")],
        ("prepare.metaworld.size", "64 to 256", "32"),
    ),
    Case(
        "prepare-metaworld-episodes",
        lambda e: ["prepare", "metaworld", "--episodes", "0", "--out", str(e.tmp / "o")],
        ("prepare.metaworld.episodes", ">= 1"),
    ),
    Case(
        "prepare-metaworld-render-quality",
        lambda e: ["prepare", "metaworld", "--render-quality", "best", "--out", str(e.tmp / "o")],
        ("render_quality", "'best'"),
    ),
    Case(
        "prepare-metaworld-max-steps",
        lambda e: ["prepare", "metaworld", "--max-steps", "9999", "--out", str(e.tmp / "o")],
        ("max_steps", "9999"),
    ),
    Case(
        "prepare-existing-out",
        lambda e: ["prepare", "metaworld", "--out", str(e.store)],
        ("already exists", "--overwrite"),
    ),
    Case(
        "prepare-out-under-a-file",
        lambda e: ["prepare", "metaworld", "--out", str(e.file("f.txt", "x") / "store")],
        ("--out", "f.txt is a file"),
    ),
    Case(
        "prepare-bad-recipe",
        lambda e: [
            "prepare",
            "--recipe",
            str(e.file("p.toml", "[prepare.metaworld]\nsize = 'big'\n")),
            "--out",
            str(e.tmp / "o"),
        ],
        ("p.toml", "prepare.metaworld.size"),
    ),
    # ---- infer: wrong paths and values
    Case(
        "infer-ckpt-missing",
        lambda e: [*e.infer()[:2], str(e.tmp / "nope"), *e.infer()[3:]],
        ("checkpoint not found",),
    ),
    Case(
        "infer-ckpt-empty-folder",
        lambda e: ["infer", "--ckpt", str(e.tmp), "--data", str(e.store), "--out", str(e.tmp / "out")],
        ("not an xwam checkpoint",),
    ),
    Case(
        "infer-ckpt-is-file",
        lambda e: [
            "infer",
            "--ckpt",
            str(e.file("c.txt", "x")),
            "--data",
            str(e.store),
            "--out",
            str(e.tmp / "out"),
        ],
        ("c.txt",),
    ),
    Case(
        "infer-store-missing",
        lambda e: ["infer", "--ckpt", str(e.ckpt), "--data", str(e.tmp / "ns"), "--out", str(e.tmp / "out")],
        ("store not found",),
    ),
    Case(
        "infer-store-is-file",
        lambda e: [
            "infer",
            "--ckpt",
            str(e.ckpt),
            "--data",
            str(e.file("s.txt", "x")),
            "--out",
            str(e.tmp / "out"),
        ],
        ("s.txt",),
    ),
    Case(
        "infer-store-is-checkpoint",
        lambda e: ["infer", "--ckpt", str(e.ckpt), "--data", str(e.ckpt), "--out", str(e.tmp / "out")],
        ("store",),
    ),
    Case("infer-episodes-text", lambda e: e.infer("--episodes", "x"), ("--episodes",)),
    Case("infer-episodes-reversed", lambda e: e.infer("--episodes", "5-2"), ("--episodes",)),
    Case("infer-episodes-absent", lambda e: e.infer("--episodes", "99"), ("no episode(s) [99]",)),
    Case("infer-mode", lambda e: e.infer("--mode", "dream"), ("--mode",)),
    Case(
        "infer-steps-combination",
        lambda e: e.infer("--num-steps-action", "9", "--num-steps-video", "4"),
        ("num_steps_action",),
    ),
    Case("infer-steps-zero", lambda e: e.infer("--num-steps-video", "0"), ("num_steps_video",)),
    Case("infer-windows-zero", lambda e: e.infer("--windows-per-episode", "0"), ("--windows-per-episode",)),
    Case("infer-batch-zero", lambda e: e.infer("--batch-size", "0"), ("--batch-size",)),
    Case(
        "infer-windows-negative", lambda e: e.infer("--windows-per-episode", "-2"), ("--windows-per-episode",)
    ),
    Case(
        "infer-out-exists",
        lambda e: ["infer", "--ckpt", str(e.ckpt), "--data", str(e.store), "--out", str(e.run)],
        ("already exists", "--overwrite"),
    ),
    Case(
        "infer-other-views-store",
        lambda e: ["infer", "--ckpt", str(e.ckpt), "--data", str(e.other_store), "--out", str(e.tmp / "out")],
        ("incompatible checkpoint",),
    ),
    # ---- reconstruct / evaluate: damaged run folders
    Case(
        "reconstruct-run-missing", lambda e: ["reconstruct", str(e.tmp / "norun")], ("run folder not found",)
    ),
    Case(
        "reconstruct-run-is-file",
        lambda e: ["reconstruct", str(e.file("r.txt", "x"))],
        ("r.txt", "run folder not found"),
    ),
    Case(
        "reconstruct-no-manifest",
        lambda e: ["reconstruct", damaged(e, lambda r: (r / "manifest.json").unlink())],
        ("manifest.json", "missing"),
    ),
    Case(
        "reconstruct-manifest-not-json",
        lambda e: ["reconstruct", damaged(e, lambda r: truncate(r / "manifest.json", 0.5))],
        ("manifest.json", "not valid JSON"),
    ),
    Case(
        "reconstruct-manifest-a-list",
        lambda e: ["reconstruct", damaged(e, lambda r: (r / "manifest.json").write_text("[1, 2]"))],
        ("manifest.json", "a JSON list"),
    ),
    Case(
        "reconstruct-manifest-binary",
        lambda e: [
            "reconstruct",
            damaged(e, lambda r: (r / "manifest.json").write_bytes(b"\xff\xfe\x00garbage")),
        ],
        ("manifest.json",),
    ),
    Case(
        "reconstruct-manifest-format",
        lambda e: ["reconstruct", damaged(e, lambda r: edit_manifest(r, lambda m: set_(m, "xwam_run", 7)))],
        ("run format 7",),
    ),
    Case(
        "reconstruct-manifest-no-store",
        lambda e: ["reconstruct", damaged(e, lambda r: edit_manifest(r, lambda m: m.pop("store")))],
        ("manifest.json", "lacks 'store'"),
    ),
    Case(
        "reconstruct-manifest-no-views",
        lambda e: ["reconstruct", damaged(e, lambda r: edit_manifest(r, lambda m: m.pop("views")))],
        ("lacks 'views'",),
    ),
    Case(
        "reconstruct-manifest-views-string",
        lambda e: ["reconstruct", damaged(e, lambda r: edit_manifest(r, lambda m: set_(m, "views", "a,b")))],
        ("'views' is 'a,b'", "list"),
    ),
    Case(
        "reconstruct-manifest-frames-string",
        lambda e: [
            "reconstruct",
            damaged(e, lambda r: edit_manifest(r, lambda m: set_(m, "future_frames", "4"))),
        ],
        ("'future_frames' is '4'",),
    ),
    Case(
        "reconstruct-manifest-max-depth-negative",
        lambda e: ["reconstruct", damaged(e, lambda r: edit_manifest(r, lambda m: set_(m, "max_depth", -1)))],
        ("'max_depth' is -1", "> 0"),
    ),
    Case(
        "reconstruct-manifest-mode",
        lambda e: ["reconstruct", damaged(e, lambda r: edit_manifest(r, lambda m: set_(m, "mode", "dream")))],
        ("'mode' is 'dream'",),
    ),
    Case(
        "reconstruct-manifest-depth-flag-string",
        lambda e: [
            "reconstruct",
            damaged(e, lambda r: edit_manifest(r, lambda m: set_(m, "store_has_depth", "yes"))),
        ],
        ("'store_has_depth' is 'yes'", "true/false"),
    ),
    Case(
        "reconstruct-manifest-future-frames-mismatch",
        lambda e: [
            "reconstruct",
            damaged(e, lambda r: edit_manifest(r, lambda m: set_(m, "future_frames", 7))),
        ],
        ("predictions.npz", "shape", "T=8"),
    ),
    Case(
        "reconstruct-npz-missing",
        lambda e: ["reconstruct", damaged(e, lambda r: (r / "predictions.npz").unlink())],
        ("predictions.npz", "missing"),
    ),
    Case(
        "reconstruct-npz-truncated",
        lambda e: ["reconstruct", damaged(e, lambda r: truncate(r / "predictions.npz", 0.6))],
        ("predictions.npz", "not a zip archive"),
    ),
    Case(
        "reconstruct-npz-empty",
        lambda e: ["reconstruct", damaged(e, lambda r: truncate(r / "predictions.npz", 0.0))],
        ("predictions.npz", "not a zip archive"),
    ),
    Case(
        "reconstruct-npz-bad-crc",
        lambda e: ["reconstruct", damaged(e, lambda r: corrupt_middle(r / "predictions.npz"))],
        ("predictions.npz",),
    ),
    Case(
        "reconstruct-npz-lacks-array",
        lambda e: ["reconstruct", damaged(e, lambda r: edit_arrays(r, lambda a: a.pop("pred_depth")))],
        ("lacks array(s) ['pred_depth']",),
    ),
    Case(
        "reconstruct-npz-wrong-shape",
        lambda e: [
            "reconstruct",
            damaged(e, lambda r: edit_arrays(r, lambda a: set_(a, "pred_depth", a["pred_depth"][:, :, :2]))),
        ],
        ("array 'pred_depth'", "shape", "T=5"),
    ),
    Case(
        "reconstruct-npz-wrong-windows",
        lambda e: [
            "reconstruct",
            damaged(e, lambda r: edit_arrays(r, lambda a: set_(a, "true_rgb", a["true_rgb"][:1]))),
        ],
        ("array 'true_rgb'", "N=2"),
    ),
    Case(
        "reconstruct-npz-wrong-dtype",
        lambda e: [
            "reconstruct",
            damaged(
                e, lambda r: edit_arrays(r, lambda a: set_(a, "pred_rgb", a["pred_rgb"].astype(np.float32)))
            ),
        ],
        ("array 'pred_rgb'", "float32", "uint8"),
    ),
    Case(
        "reconstruct-npz-object-array",
        lambda e: [
            "reconstruct",
            damaged(e, lambda r: np.savez(r / "predictions.npz", task=np.array([{}], dtype=object))),
        ],
        ("predictions.npz",),
    ),
    Case(
        "reconstruct-policy-run",
        lambda e: [
            "reconstruct",
            damaged(e, lambda r: edit_manifest(r, lambda m: set_(m, "mode", "policy"))),
        ],
        ("policy-mode run",),
    ),
    Case(
        "reconstruct-voxel-negative",
        lambda e: ["reconstruct", str(e.run), "--voxel-size", "-1"],
        ("--voxel-size", "> 0"),
    ),
    Case(
        "reconstruct-max-depth-zero",
        lambda e: ["reconstruct", str(e.run), "--max-depth", "0"],
        ("--max-depth", "> 0"),
    ),
    Case(
        "reconstruct-points-exist",
        lambda e: ["reconstruct", damaged(e, lambda r: (r / "points").mkdir())],
        ("points", "already exists", "--overwrite"),
    ),
    Case("evaluate-no-run", lambda e: ["evaluate"], ("give a run folder",)),
    Case(
        "evaluate-unknown-metric",
        lambda e: ["evaluate", str(e.run), "--metrics", "psnr,psnrr"],
        ("unknown metric 'psnrr'",),
    ),
    Case(
        "evaluate-max-depth-negative",
        lambda e: ["evaluate", str(e.run), "--max-depth", "-1"],
        ("--max-depth",),
    ),
    Case("evaluate-voxel-zero", lambda e: ["evaluate", str(e.run), "--voxel-size", "0"], ("--voxel-size",)),
    Case(
        "evaluate-other-store",
        lambda e: ["evaluate", str(e.run), "--data", str(e.other_store)],
        ("fingerprint",),
    ),
    Case(
        "evaluate-store-moved",
        lambda e: [
            "evaluate",
            damaged(e, lambda r: edit_manifest(r, lambda m: set_(m, "store", str(e.tmp / "gone")))),
        ],
        ("gone", "--data"),
    ),
    Case(
        "evaluate-npz-truncated",
        lambda e: ["evaluate", damaged(e, lambda r: truncate(r / "predictions.npz", 0.3))],
        ("predictions.npz", "not a zip archive"),
    ),
    Case(
        "evaluate-no-fingerprint",
        lambda e: ["evaluate", damaged(e, lambda r: edit_manifest(r, lambda m: m.pop("store_fingerprint")))],
        ("store_fingerprint",),
    ),
    Case(
        "evaluate-mean-frame-info-missing",
        lambda e: ["evaluate", damaged(e, lambda r: edit_manifest(r, lambda m: m.pop("mean_frame", None)))],
        ("mean_frame",),
    ),
    Case(
        "evaluate-lpips-weights-missing",
        lambda e: [
            "evaluate",
            str(e.run),
            "--metrics",
            "lpips",
            "--lpips-weights",
            str(e.tmp / "alex.safetensors"),
        ],
        ("alex.safetensors",),
    ),
    Case(
        "evaluate-out-under-a-file",
        lambda e: [
            "evaluate",
            str(e.run),
            "--metrics",
            "action_mse",
            "--out",
            str(e.file("f.txt", "x") / "m.json"),
        ],
        ("f.txt",),
    ),
    Case(
        "evaluate-out-is-folder",
        lambda e: ["evaluate", str(e.run), "--metrics", "action_mse", "--out", str(e.tmp)],
        ("--out", "is a folder"),
    ),
    Case(
        "evaluate-sim-video-under-file",
        lambda e: [
            "evaluate",
            "--sim",
            "metaworld",
            "--ckpt",
            str(e.ckpt),
            "--video",
            str(e.file("v.txt", "x") / "v"),
        ],
        ("--video", "v.txt is a file"),
    ),
    Case(
        "infer-out-under-a-file",
        lambda e: [
            "infer",
            "--ckpt",
            str(e.ckpt),
            "--data",
            str(e.store),
            "--out",
            str(e.file("f.txt", "x") / "run"),
        ],
        ("--out", "f.txt is a file"),
    ),
    Case(
        "evaluate-sim-with-run",
        lambda e: ["evaluate", str(e.run), "--sim", "metaworld"],
        ("drop the run folder",),
    ),
    Case("evaluate-sim-no-ckpt", lambda e: ["evaluate", "--sim", "metaworld"], ("needs --ckpt",)),
    Case(
        "evaluate-sim-unknown",
        lambda e: ["evaluate", "--sim", "carla", "--ckpt", str(e.ckpt)],
        ("simulators are",),
    ),
    Case(
        "evaluate-sim-option-offline",
        lambda e: ["evaluate", str(e.run), "--tasks", "reach-v3"],
        ("--tasks", "--sim"),
    ),
    Case(
        "evaluate-offline-option-sim",
        lambda e: ["evaluate", "--sim", "metaworld", "--metrics", "psnr"],
        ("--metrics",),
    ),
    Case(
        "evaluate-sim-ckpt-missing",
        lambda e: ["evaluate", "--sim", "metaworld", "--ckpt", str(e.tmp / "nock"), "--tasks", "reach-v3"],
        ("nock",),
    ),
    # ---- convert
    Case(
        "convert-unknown-source",
        lambda e: ["convert", "robomimic", str(e.ckpt), "--out", str(e.tmp / "c")],
        ("expected one of",),
    ),
    Case(
        "convert-missing-path",
        lambda e: ["convert", "xwam-v0", str(e.tmp / "old"), "--out", str(e.tmp / "c")],
        ("old",),
    ),
    Case(
        "convert-current-format",
        lambda e: ["convert", "xwam-v0", str(e.ckpt), "--out", str(e.tmp / "c")],
        ("nothing to convert",),
    ),
    # ---- settings that only the data, the model or the checkpoint can refuse
    Case("pretrain-view-absent", lambda e: e.pretrain_small("data.views=['zz']"), ("has no view(s) ['zz']",)),
    Case(
        "pretrain-val-too-many",
        lambda e: e.pretrain_small("data.val_episodes=5"),
        ("val_episodes=5", "3 episodes"),
    ),
    Case(
        "pretrain-batch-too-big",
        lambda e: e.pretrain_small("data.batch_size=1000"),
        ("global batch of 1000",),
    ),
    Case(
        "pretrain-stride-too-long",
        lambda e: e.pretrain_small("data.frame_stride=100"),
        ("no episode is long enough",),
    ),
    Case("pretrain-umt5-no-cache", lambda e: e.pretrain_small("model.text='umt5'"), ("model.text_cache",)),
    Case(
        "pretrain-umt5-cache-missing",
        lambda e: e.pretrain_small("model.text='umt5'", f"model.text_cache='{e.tmp / 'te.safetensors'}'"),
        ("te.safetensors",),
    ),
    Case(
        "pretrain-override-unknown",
        lambda e: e.pretrain_small("model.overrides={layers = 2}"),
        ("['layers']",),
    ),
    Case(
        "pretrain-override-wrong-type",
        lambda e: e.pretrain_small("model.overrides={num_layers = 'two'}"),
        ("model.overrides.num_layers", "an integer", "'two'"),
    ),
    Case(
        "pretrain-override-depth-blocks",
        lambda e: e.pretrain_small("model.overrides={num_layers = 2, num_depth_blocks = 3}"),
        ("num_depth_blocks=3",),
    ),
    Case("pretrain-init-missing", lambda e: e.pretrain_small(f"model.init='{e.tmp / 'wan'}'"), ("wan",)),
    Case(
        "pretrain-action-dim-small", lambda e: e.pretrain_small("model.action_dim=2"), ("model.action_dim=2",)
    ),
    Case("pretrain-seed-too-big", lambda e: e.pretrain_small("seed=4294967296"), ("seed", "2**32 - 1")),
    Case(
        "pretrain-store-is-file",
        lambda e: e.pretrain_small(f"data.store='{e.file('s.txt', 'x')}'"),
        ("s.txt",),
    ),
    Case(
        "pretrain-resume-missing", lambda e: [*e.pretrain_small(), "--resume", str(e.tmp / "nock")], ("nock",)
    ),
    Case(
        "finetune-init-is-store",
        lambda e: ["finetune", *e.pretrain_small()[1:], "--init", str(e.store)],
        ("not an xwam checkpoint",),
    ),
    Case(
        "infer-ckpt-run-without-checkpoints",
        lambda e: ["infer", "--ckpt", str(e.tmp), "--data", str(e.store), "--out", str(e.tmp / "o")],
        ("not an xwam checkpoint",),
    ),
    Case("infer-steps-video-negative", lambda e: e.infer("--num-steps-video", "-1"), ("num_steps_video",)),
    # ---- more evaluate options and damaged runs
    Case(
        "evaluate-metrics-empty", lambda e: ["evaluate", str(e.run), "--metrics", ""], ("--metrics is empty",)
    ),
    Case(
        "evaluate-metrics-commas",
        lambda e: ["evaluate", str(e.run), "--metrics", ",,"],
        ("--metrics is empty",),
    ),
    Case(
        "evaluate-lpips-weights-garbage",
        lambda e: [
            "evaluate",
            str(e.run),
            "--metrics",
            "lpips",
            "--lpips-weights",
            str(e.file("w.safetensors", b"x" * 64)),
        ],
        ("w.safetensors",),
    ),
    Case(
        "evaluate-policy-run-image-metric",
        lambda e: [
            "evaluate",
            damaged(e, lambda r: edit_manifest(r, lambda m: set_(m, "mode", "policy"))),
            "--metrics",
            "psnr",
        ],
        ("cannot compute psnr", "policy-mode"),
    ),
    Case(
        "evaluate-manifest-views-count",
        lambda e: [
            "evaluate",
            damaged(e, lambda r: edit_manifest(r, lambda m: set_(m, "views", ["a", "b", "c"]))),
        ],
        ("array 'pred_rgb'", "V=3"),
    ),
    Case(
        "evaluate-manifest-episodes-strings",
        lambda e: ["evaluate", damaged(e, lambda r: edit_manifest(r, lambda m: set_(m, "episodes", ["x"])))],
        ("'episodes' is ['x']",),
    ),
    Case(
        "evaluate-manifest-empty",
        lambda e: ["evaluate", damaged(e, lambda r: (r / "manifest.json").write_text(""))],
        ("manifest.json", "not valid JSON"),
    ),
    Case(
        "evaluate-manifest-is-folder",
        lambda e: [
            "evaluate",
            damaged(e, lambda r: ((r / "manifest.json").unlink(), (r / "manifest.json").mkdir())),
        ],
        ("manifest.json", "unreadable"),
    ),
    Case(
        "evaluate-manifest-max-depth-nan",
        lambda e: [
            "evaluate",
            damaged(e, lambda r: edit_manifest(r, lambda m: set_(m, "max_depth", float("nan")))),
        ],
        ("'max_depth' is nan",),
    ),
    Case(
        "evaluate-npz-is-folder",
        lambda e: [
            "evaluate",
            damaged(e, lambda r: ((r / "predictions.npz").unlink(), (r / "predictions.npz").mkdir())),
        ],
        ("predictions.npz", "is a folder"),
    ),
    Case(
        "evaluate-npz-task-numbers",
        lambda e: ["evaluate", damaged(e, lambda r: edit_arrays(r, lambda a: set_(a, "task", np.zeros(2))))],
        ("array 'task'", "float64", "str"),
    ),
    Case(
        "evaluate-npz-mean-rgb-shape",
        lambda e: [
            "evaluate",
            damaged(e, lambda r: edit_arrays(r, lambda a: set_(a, "mean_rgb", a["mean_rgb"][:, :2]))),
        ],
        ("array 'mean_rgb'", "T=5"),
    ),
    Case(
        "evaluate-npz-no-windows",
        lambda e: [
            "evaluate",
            damaged(
                e,
                lambda r: edit_arrays(
                    r, lambda a: a.update({k: v[:0] for k, v in a.items() if k[:4] != "mean"})
                ),
            ),
        ],
        ("no windows",),
    ),
    Case(
        "evaluate-npz-actions-shape",
        lambda e: [
            "evaluate",
            damaged(e, lambda r: edit_arrays(r, lambda a: set_(a, "mean_action", np.zeros(7)))),
        ],
        ("array 'mean_action'", "A=4"),
    ),
    # ---- more prepare sources
    Case(
        "prepare-lerobot-by-set-without-path",
        lambda e: ["prepare", "--set", "prepare.source='lerobot'", "--out", str(e.tmp / "o")],
        ("needs a dataset folder",),
    ),
    Case(
        "prepare-lerobot-path-is-file",
        lambda e: ["prepare", "lerobot", str(e.file("ds.txt", "x")), "--out", str(e.tmp / "o")],
        ("ds.txt",),
    ),
    Case(
        "prepare-lerobot-empty-folder",
        lambda e: (
            (e.tmp / "ds").mkdir() or ["prepare", "lerobot", str(e.tmp / "ds"), "--out", str(e.tmp / "o")]
        ),
        ("meta/info.json",),
    ),
    Case("prepare-lerobot-info-a-list", lambda e: e.lerobot_info("[]"), ("info.json", "JSON object")),
    Case("prepare-lerobot-info-lacks-keys", lambda e: e.lerobot_info('{"fps": "x"}'), ("info.json",)),
    Case("prepare-lerobot-info-not-json", lambda e: e.lerobot_info("{ nope"), ("info.json",)),
    Case(
        "prepare-metaworld-unknown-task",
        lambda e: ["prepare", "metaworld", "--tasks", "fly-v3", "--out", str(e.tmp / "o")],
        ("unknown task 'fly-v3'",),
        sim=True,
    ),
    Case(
        "prepare-metaworld-unknown-view",
        lambda e: ["prepare", "metaworld", "--views", "ceiling", "--out", str(e.tmp / "o")],
        ("unknown view 'ceiling'",),
        sim=True,
    ),
    Case(
        "prepare-metaworld-seed-negative",
        lambda e: ["prepare", "metaworld", "--seed", "-1", "--out", str(e.tmp / "o")],
        ("prepare.metaworld.seed",),
    ),
    # ---- convert
    Case(
        "convert-not-a-v0-checkpoint",
        lambda e: ["convert", "xwam-v0", str(e.tmp), "--out", str(e.tmp / "c")],
        ("not an xwam-v0 checkpoint",),
    ),
    # ---- closed loop
    Case("sim-episodes-zero", lambda e: e.sim("--episodes", "0"), ("--episodes 0",), sim=True),
    Case("sim-max-steps-zero", lambda e: e.sim("--max-steps", "0"), ("--max-steps 0",), sim=True),
    Case("sim-seed-negative", lambda e: e.sim("--seed", "-1"), ("--seed -1",), sim=True),
    Case(
        "sim-render-quality",
        lambda e: e.sim("--render-quality", "best"),
        ("--render-quality 'best'",),
        sim=True,
    ),
    Case(
        "sim-unknown-task",
        lambda e: [*e.sim()[:-1], "fly-v3"],
        ("unknown Meta-World task 'fly-v3'",),
        sim=True,
    ),
    Case("sim-no-tasks", lambda e: [*e.sim()[:-1], ","], ("needs --tasks",), sim=True),
    Case(
        "sim-checkpoint-not-metaworld",
        lambda e: ["evaluate", "--sim", "metaworld", "--ckpt", str(e.ckpt), "--tasks", "reach-v3"],
        ("incompatible checkpoint for Meta-World",),
        sim=True,
    ),
]


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> dict[str, Path]:
    store, ckpt = tiny_checkpoint(tmp_path_factory)
    other = other_store(tmp_path_factory, "views-cd", views=("c", "d"))
    return {"store": store, "ckpt": ckpt, "run": world_run(tmp_path_factory), "other": other}


def snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under `roots` with its size and modification time."""
    out = {}
    for root in roots:
        for path in [root, *root.rglob("*")]:
            stat = path.stat()
            out[str(path)] = (stat.st_size if path.is_file() else -1, stat.st_mtime_ns)
    return out


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_and_writes_nothing(case, shared, tmp_path, tmp_path_factory, monkeypatch):
    monkeypatch.delenv("XWAM_DEBUG", raising=False)
    env = Env(tmp_path, shared["store"], shared["ckpt"], shared["run"], shared["other"])
    if case.sim:
        pytest.importorskip("metaworld")
        env.mw_ckpt = metaworld_checkpoint(tmp_path_factory)
    args = case.args(env)  # makes the case's files and damage first
    roots = (tmp_path, shared["store"], shared["ckpt"], shared["run"])
    before = snapshot(*roots)
    result = runner.invoke(app(), args)
    one_line_error(result, *case.needles)
    assert snapshot(*roots) == before, "a failed command wrote or changed files"


def test_the_corpus_is_wide():
    assert len(CASES) >= 60, len(CASES)
    assert len({c.id for c in CASES}) == len(CASES)


# ---- the error boundary itself: bugs, --debug / XWAM_DEBUG, file-system errors, Ctrl-C
def break_reconstruct(monkeypatch, error: BaseException) -> None:
    """Make `xwam reconstruct` raise `error` from inside the core, as a bug or a failing disk would."""

    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr("xwam_core.reconstruct.reconstruct_run", broken)


def test_a_bug_is_one_line_saying_so(monkeypatch, tmp_path):
    monkeypatch.delenv("XWAM_DEBUG", raising=False)
    break_reconstruct(monkeypatch, ZeroDivisionError("division by zero\nsecond line"))
    result = runner.invoke(app(), ["reconstruct", str(tmp_path)])
    one_line_error(
        result,
        "unexpected ZeroDivisionError: division by zero second line",
        "a bug",
        "--debug",
        "XWAM_DEBUG=1",
    )
    assert result.exit_code == 1


@pytest.mark.parametrize(("args", "env"), [(["--debug"], None), ([], "1"), ([], "yes")])
def test_debug_shows_the_traceback_before_the_line(monkeypatch, tmp_path, args, env):
    if env is None:
        monkeypatch.delenv("XWAM_DEBUG", raising=False)
    else:
        monkeypatch.setenv("XWAM_DEBUG", env)
    break_reconstruct(monkeypatch, ZeroDivisionError("division by zero"))
    result = runner.invoke(app(), [*args, "reconstruct", str(tmp_path)])
    assert result.exit_code == 1
    assert "Traceback (most recent call last)" in result.output and "in broken" in result.output
    assert result.output.rstrip().splitlines()[-1].startswith("error: unexpected ZeroDivisionError")
    # an expected error shows its traceback too, so a user can see where it came from
    result = runner.invoke(app(), [*args, "evaluate", str(tmp_path / "none")])
    assert "Traceback" in result.output and "run folder not found" in result.output


def test_debug_off_means_off(monkeypatch, tmp_path):
    monkeypatch.setenv("XWAM_DEBUG", "0")
    break_reconstruct(monkeypatch, ZeroDivisionError("division by zero"))
    one_line_error(runner.invoke(app(), ["reconstruct", str(tmp_path)]), "ZeroDivisionError")
    # --debug of one invocation does not leak into the next
    monkeypatch.delenv("XWAM_DEBUG")
    assert "Traceback" in runner.invoke(app(), ["--debug", "reconstruct", str(tmp_path)]).output
    one_line_error(runner.invoke(app(), ["reconstruct", str(tmp_path)]), "ZeroDivisionError")


@pytest.mark.parametrize(
    ("error", "needles"),
    [
        (
            OSError(30, "Read-only file system", "/media/ro/run/points"),
            ("/media/ro/run/points", "read-only", "EROFS"),
        ),
        (OSError(28, "No space left on device", "/data/run"), ("/data/run", "no space left", "ENOSPC")),
        (PermissionError(13, "Permission denied", "/srv/run"), ("/srv/run", "permission denied", "EACCES")),
        (OSError(28, "No space left on device"), ("the OS named no path", "no space left")),
        (FileNotFoundError(2, "No such file", "a.ply", None, "b.ply"), ("a.ply -> b.ply", "no such file")),
        (MemoryError(), ("out of memory", "data.batch_size")),
        (
            torch.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has 1.00 GiB free."
            ),
            ("out of memory (CUDA out of memory. Tried to allocate 2.00 GiB);", "data.batch_size"),
        ),
    ],
    ids=["read-only", "full-disk", "permission", "no-path", "rename", "memory", "gpu-memory"],
)
def test_file_system_errors_are_one_line_naming_the_path(monkeypatch, tmp_path, error, needles):
    monkeypatch.delenv("XWAM_DEBUG", raising=False)
    break_reconstruct(monkeypatch, error)
    result = runner.invoke(app(), ["reconstruct", str(tmp_path)])
    one_line_error(result, *needles)
    assert "bug" not in result.output


def test_ctrl_c_says_nothing_partial_was_left(monkeypatch, tmp_path):
    break_reconstruct(monkeypatch, KeyboardInterrupt())
    result = runner.invoke(app(), ["reconstruct", str(tmp_path)])
    assert result.exit_code == 130
    assert result.output.strip() == (
        "interrupted: nothing partial was left: outputs are written under a temporary name and renamed only "
        "when complete"
    )


def test_messages_are_printed_as_text_not_markup(monkeypatch, tmp_path):
    """A message with brackets (a list, a range) comes out whole: rich would take '[near, far]' for a style."""
    from xwam_core.errors import XWAMError

    break_reconstruct(
        monkeypatch, XWAMError("depth_ranges.a = [1.0]: expected [near, far] in [bold]metres[/]")
    )
    one_line_error(
        runner.invoke(app(), ["reconstruct", str(tmp_path)]),
        "depth_ranges.a = [1.0]: expected [near, far] in [bold]metres[/]",
    )


def test_every_command_goes_through_the_error_boundary():
    from xwam_cli.common import user_errors

    boundary = user_errors(lambda: None).__code__
    commands = app().registered_commands
    assert len(commands) >= 7
    for command in commands:
        assert command.callback.__code__ is boundary, f"`xwam {command.name}` is not wrapped in user_errors"

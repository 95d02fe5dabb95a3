"""Sessions: tests (what CI runs), lint, demo (the README's main job), ablate (the paper's Table 4), bench."""

from __future__ import annotations

import os

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["tests"]

# Installed first in every environment: this exact CPU-capable build lies on the local disk here;
# any newer torch would be a multi-gigabyte download.
TORCH = ["torch==2.14.1", "torchvision==0.29.1"]
OPENPI_CLIENT = "openpi-client==0.1.2"
ENV = {
    "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl"),
    "PYOPENGL_PLATFORM": "egl",
    "TOKENIZERS_PARALLELISM": "false",
}


def install(session: nox.Session, extras: str) -> None:
    session.install(*TORCH)
    session.install("-e", f".[{extras}]")


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite (tiny data and models built on the spot; no downloads)."""
    install(session, "sim,eval,train,dev,serve")
    # the real openpi client for the serve tests: it declares numpy<2, so without its dependencies, plus
    # the light ones its websocket client imports (dm-tree only serves its action_chunk_broker, unused)
    session.install("--no-deps", OPENPI_CLIENT)
    session.install("typing_extensions", "pillow")
    session.run("pytest", "-q", "-p", "no:cacheprovider", "--durations=10", *session.posargs, env=ENV)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff (lint + format check) on everything, mypy on xwam_core."""
    install(session, "dev")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("mypy", "xwam_core")


# The demo's store: 10 scripted-expert episodes per task; the state holds the object's pose and the goal
# (--state task, as recipes/tiny_cpu.toml).
DEMO_PREPARE = (
    "xwam",
    "prepare",
    "metaworld",
    "--tasks",
    "reach-v3,push-v3",
    "--episodes",
    "10",
    "--views",
    "corner2,topview,gripperPOV",
    "--size",
    "64",
    "--seed",
    "0",
    "--state",
    "task",
    # full-colour video: at 64x64 LeRobot's 4:2:0 AV1 blurs colour more than the model does (docs/data.md)
    "--video",
    "h264-444",
)


@nox.session
def demo(session: nox.Session) -> None:
    """The main job end to end on the built-in default, on this CPU: simulated Meta-World episodes ->
    tiny training -> inference (actions + future RGB-D) -> 4D reconstruction -> metrics with
    baselines -> closed-loop success beside the scripted expert and a random policy.

    Arguments after `--` go to `xwam pretrain` (recipe overrides), e.g. a batch of 32 with the paper's
    clean-action share, which pushed 70% of 100 held-out starts (about an hour of training; docs/demo.md):
    `nox -s demo -- --set data.batch_size=32 --set noise.p_clean_action=0.5`; or the earlier recipe (batch 8
    and the paper's share; push 52%, 11 minutes of training):
    `nox -s demo -- --set data.batch_size=8 --set noise.p_clean_action=0.5`."""
    install(session, "sim,eval,train")
    out = os.environ.get("XWAM_DEMO_OUT", "out/demo")
    # one thread per core: training runs 1.5x faster than with one thread on this 2-core machine (measured);
    # set OMP_NUM_THREADS=1 when other jobs share the machine (oversubscribed threads run several times slower)
    env = {**ENV, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1))}
    session.run(*DEMO_PREPARE, "--out", f"{out}/store", "--overwrite", env=env)
    session.run(
        "xwam",
        "pretrain",
        "recipes/tiny_cpu.toml",
        "--set",
        f"data.store={out}/store",
        "--set",
        f"train.out={out}/run",
        "--overwrite",  # a rerun replaces the previous demo's run (pretrain refuses an existing run otherwise)
        *session.posargs,
        env=env,
    )
    session.run(
        "xwam",
        "infer",
        "--ckpt",
        f"{out}/run",
        "--data",
        f"{out}/store",
        "--mode",
        "world",
        "--windows-per-episode",
        "8",
        "--out",
        f"{out}/infer",
        "--overwrite",
        env=env,
    )
    session.run("xwam", "reconstruct", f"{out}/infer", "--overwrite", env=env)
    session.run(
        "xwam",
        "evaluate",
        f"{out}/infer",
        "--metrics",
        "psnr,ssim,absrel,delta1,chamfer,action_mse,action_l1",
        env=env,
    )
    session.run(
        "xwam",
        "evaluate",
        "--sim",
        "metaworld",
        "--ckpt",
        f"{out}/run",
        "--tasks",
        "reach-v3,push-v3",
        "--episodes",
        "10",  # >= 10 per task: at 5 the 95% interval is about +-40 points
        "--seed",
        "1000",
        "--out",
        f"{out}/sim.json",
        "--video",
        f"{out}/rollouts",
        "--overwrite",  # a rerun replaces the previous demo's sim.json and its rollout videos
        env=env,
    )
    session.log(
        f"Done. Videos: {out}/infer/videos/  point clouds + previews: {out}/infer/points/  "
        f"metrics: {out}/infer/metrics.json  closed loop: {out}/sim.json, {out}/rollouts/  "
        f"loss curve: {out}/run/loss_curve.png"
    )


@nox.session
def ablate(session: nox.Session) -> None:
    """The paper's Table 4 at the tiny recipe's scale: `xwam ablate recipes/tiny_cpu.toml` trains the ans, sync,
    decoupled and no-depth variants on the demo's store (made here if it is missing) and evaluates each
    offline and in closed loop (10 held-out episodes per task, seed 1000, as the demo). Four tiny trainings
    plus their evaluations: about an hour and a half on an idle 2-core CPU. A rerun keeps finished variants; pass
    `-- --overwrite` to retrain, `-- --variants ans,sync` for a subset (docs/ablation.md)."""
    install(session, "sim,eval,train")
    demo_out = os.environ.get("XWAM_DEMO_OUT", "out/demo")
    out = os.environ.get("XWAM_ABLATE_OUT", "out/ablate")
    env = {**ENV, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1))}
    store = f"{demo_out}/store"
    if not os.path.isdir(store):  # the demo's store, made as `nox -s demo` makes it
        session.run(*DEMO_PREPARE, "--out", store, env=env)
    session.run(
        "xwam",
        "ablate",
        "recipes/tiny_cpu.toml",
        "--store",
        store,
        "--out",
        out,
        "--episodes",
        "10",
        "--seed",
        "1000",
        *session.posargs,
        env=env,
    )
    session.log(f"Done. Table: {out}/ablation.md and {out}/ablation.json; runs: {out}/VARIANT/run")


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks: readable tables (pass --json after -- for JSON lines)."""
    install(session, "sim,eval,train,serve")
    for script in sorted(
        p for p in os.listdir("bench") if p.endswith(".py") and p not in ("__init__.py", "report.py")
    ):
        session.run("python", f"bench/{script}", *session.posargs, env=ENV)


# LeRobot's released package (the newest one for Python 3.11) pins torch < 2.11: it is installed with
# --no-deps beside xwam, whose dependencies cover what lerobot.datasets imports. torchcodec is LeRobot's
# video decoder (torchvision 0.29 has none) and loads the system's FFmpeg libraries.
LEROBOT = ["lerobot==0.4.4", "torchcodec==0.17.0"]
FFMPEG_DEBIAN = [
    "libavcodec59",
    "libavformat59",
    "libavdevice59",
    "libavfilter8",
    "libswscale6",
    "libavutil57",
]


@nox.session
def lerobot_interop(session: nox.Session) -> None:
    """LeRobot's own code on xwam's stores (tests/interop): LeRobotDataset reads a store frame by frame,
    delete_episodes and merge_datasets work on it, and a dataset LeRobot writes imports into xwam."""
    import ctypes.util

    if ctypes.util.find_library("avcodec") is None:
        if os.geteuid() != 0 or not os.path.exists("/usr/bin/apt-get"):
            session.error(f"torchcodec needs FFmpeg's shared libraries: install {' '.join(FFMPEG_DEBIAN)}")
        session.run(
            "apt-get", "install", "-y", "-q", "--no-install-recommends", *FFMPEG_DEBIAN, external=True
        )
    install(session, "dev")
    session.install("--no-deps", *LEROBOT)
    session.run("pytest", "-q", "-p", "no:cacheprovider", "tests/interop", *session.posargs, env=ENV)

"""`xwam ablate RECIPE`: the paper's Table 4 at the recipe's scale, one table.

    result = run_ablation("recipes/tiny_cpu.toml", ["ans", "sync"], ["train.max_steps=100"], "out/ablate")

Variants (docs/ablation.md; each is the recipe plus what its name says, and the `--set` overrides go to all):
    ans        noise.mode = ans, async inference (T_video video steps, T_action action/state steps): the
               recipe's own design, the paper's X-WAM
    sync       noise.mode = sync (one shared t), inference.schedule = sync (every stream takes T_video steps)
    decoupled  noise.mode = decoupled (t_video and t_action independent), async inference
    no-depth   ans and async, no depth branch: model.overrides gains num_depth_blocks = 0 (merged with the
               recipe's overrides) and depth_condition = false (the RGB-D input of a branch that is gone)
Each variant trains into OUT/<variant>/run. A finished run (its summary.json, the same resolved recipe) is
not trained again unless `overwrite`; an unfinished one is resumed from its newest checkpoint.

Evaluation of each variant, the same for all:
    offline     `xwam infer` (library call) in world mode on the held-out episodes (data.val_episodes), the
                same windows for every variant -> OUT/<variant>/infer; PSNR and AbsRel over future frames
                (xwam_core.evaluate; AbsRel n/a without a depth branch or without depth in the store), and
                the repeat-frame / mean-frame baselines once, from the first variant's run
    latency     policy mode, ms per query: the closed loop's mean when it ran, else the offline mean over
                the same held-out windows (one at a time, a warm-up call excluded)
    closed loop Meta-World stores only (`evaluate_metaworld`): `episodes` held-out starts per task of the
                store, seed `seed`; success with its 95% Wilson interval; the scripted expert and random
                policy once, beside the first variant. Another store: skipped, with a note in the table.
An evaluation is kept in OUT/<variant>/eval.json and reused while the checkpoint and the settings are the
same (not with `overwrite`). OUT/ablation.json and OUT/ablation.md hold the table (written atomically),
beside the paper's numbers (docs/method.md section 4).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xwam_core.atomic import write_json_atomic, write_text_atomic
from xwam_core.errors import XWAMError
from xwam_core.progress import SILENT, Progress

FORMAT = 1
VARIANTS = ("ans", "sync", "decoupled", "no-depth")
DESCRIPTIONS = {
    "ans": "ANS training + async inference (the recipe's)",
    "sync": "synchronous training + synchronous inference (T_video steps for every stream)",
    "decoupled": "decoupled (independent) training + async inference",
    "no-depth": "ANS + async, no depth branch (num_depth_blocks = 0)",
}
# docs/method.md section 4 [paper, RoboCasa, RTX 3090]: success rate (%) and latency per query (ms)
PAPER: dict[str, dict[str, Any]] = {
    "ans": {
        "success": 67.8,
        "latency_ms": 1033,
        "what": "ANS + async inference (= the copied-block depth branch)",
    },
    "sync": {"success": 66.4, "latency_ms": 4665, "what": "synchronous train + synchronous inference"},
    "decoupled": {"success": 67.2, "latency_ms": 1033, "what": "decoupled train + async inference"},
    "no-depth": {"success": 63.0, "latency_ms": None, "what": "no depth"},
}
PAPER_SOURCE = (
    "the paper's Table 4 (docs/method.md section 4): RoboCasa, RTX 3090; "
    "also there: sequence concat 68.7% at 1888 ms, channel concat 64.2%"
)
# what the variants set: a --set of these would contradict them
VARIANT_KEYS = ("noise.mode", "inference.schedule", "train.out")
EVAL_FILE = "eval.json"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# ------------------------------------------------------------------------------------ variants
def parse_variants(text: str | list[str] | None) -> list[str]:
    """'ans,sync' (or a list) -> the variants in the given order; None/empty: all four. Unknown: one line."""
    if text is None:
        return list(VARIANTS)
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    if not names:
        return list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise XWAMError(f"--variants: unknown variant {unknown[0]!r}; the variants are {', '.join(VARIANTS)}")
    return list(dict.fromkeys(names))


def check_overrides(overrides: list[str]) -> None:
    """Refuse a --set of what the variants themselves set (noise.mode, inference.schedule, train.out)."""
    from xwam_core.recipe import parse_override

    for text in overrides:
        path, _ = parse_override(text)
        key = ".".join(path)
        if key in VARIANT_KEYS:
            what = "--out" if key == "train.out" else "the variant"
            raise XWAMError(
                f"--set {text}: {key} is set by {what} in an ablation; choose variants with --variants"
            )


def variant_recipe(base: Any, variant: str, run_dir: str | Path) -> Any:
    """The recipe of one variant: a copy of `base` (a loaded Recipe) with the variant's settings and
    train.out = run_dir, validated."""
    if variant not in VARIANTS:
        raise XWAMError(f"unknown variant {variant!r}; the variants are {', '.join(VARIANTS)}")
    recipe = copy.deepcopy(base)
    recipe.noise.mode = "sync" if variant == "sync" else "decoupled" if variant == "decoupled" else "ans"
    recipe.inference.schedule = "sync" if variant == "sync" else "async"
    if variant == "no-depth":
        recipe.model.overrides = {**recipe.model.overrides, "num_depth_blocks": 0, "depth_condition": False}
    recipe.train.out = str(run_dir)
    recipe.validate()
    return recipe


def depth_blocks(recipe: Any) -> int:
    """The number of depth blocks the recipe's model gets (its override, else the preset's)."""
    from xwam_core.models.presets import PRESETS

    if "num_depth_blocks" in recipe.model.overrides:
        return int(recipe.model.overrides["num_depth_blocks"])
    return int(PRESETS[recipe.model.preset].get("num_depth_blocks", 10))


# ------------------------------------------------------------------------------------ results
@dataclass
class VariantResult:
    name: str
    description: str
    noise_mode: str
    inference_schedule: str
    num_steps_video: int
    num_steps_action: int
    num_depth_blocks: int
    run: str
    training: str  # "trained", "resumed", "skipped: finished run"
    train_seconds: float | None
    train_steps: int
    final_loss: float | None
    evaluation: dict[str, Any] = field(default_factory=dict)  # eval.json's "result"

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "evaluation"} | self.evaluation


@dataclass
class AblationResult:
    out: Path
    recipe: str
    store: str
    variants: list[VariantResult]
    closed_loop: dict[str, Any]
    offline: dict[str, Any]
    baselines: dict[str, Any]
    scale: dict[str, Any]
    notes: list[str]
    json_path: Path | None = None
    md_path: Path | None = None

    def row(self, name: str) -> VariantResult:
        return next(v for v in self.variants if v.name == name)

    def to_json(self) -> dict[str, Any]:
        return {
            "xwam_ablation": FORMAT,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "recipe": self.recipe,
            "store": self.store,
            "out": str(self.out),
            "scale": self.scale,
            "closed_loop": self.closed_loop,
            "offline": self.offline,
            "variants": [v.to_json() for v in self.variants],
            "baselines": self.baselines,
            "paper": {"source": PAPER_SOURCE, "variants": PAPER},
            "notes": self.notes,
        }


# ------------------------------------------------------------------------------------ the run
def is_metaworld_store(store: Any) -> bool:
    return bool(store.info.get("xwam", {}).get("source") == "metaworld")


def _finished(run_dir: Path) -> bool:
    return (run_dir / "summary.json").is_file()


def _flat(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in table.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _recipe_difference(run_dir: Path, recipe: Any) -> str | None:
    """The first setting where the run's saved recipe.toml differs from `recipe` (None: the same or none)."""
    import tomllib

    from xwam_core.recipe import recipe_from_dict, recipe_to_dict

    path = run_dir / "recipe.toml"
    if not path.is_file():
        return None
    try:
        saved = _flat(recipe_to_dict(recipe_from_dict(tomllib.loads(path.read_text()), str(path))))
    except (OSError, ValueError, XWAMError) as e:
        return f"its recipe.toml is unreadable ({e})"
    wanted = _flat(recipe_to_dict(recipe))
    for key in sorted(set(saved) | set(wanted)):
        if saved.get(key) != wanted.get(key):
            return f"{key} = {saved.get(key)!r} there, {wanted.get(key)!r} now"
    return None


def _train_variant(recipe: Any, overwrite: bool, progress: Progress) -> tuple[str, dict[str, Any]]:
    """Train (or skip, or resume) one variant; returns (what happened, summary.json's content)."""
    from xwam_core import runlock
    from xwam_core.train import train

    run_dir = Path(recipe.train.out)
    if not overwrite:
        diff = _recipe_difference(run_dir, recipe)
        if diff is not None:
            raise XWAMError(
                f"{run_dir}: holds a run of another recipe ({diff}); pass --overwrite to retrain it, or "
                "give another --out"
            )
    trained = None
    if _finished(run_dir) and not overwrite:
        how = "skipped: finished run"
    elif runlock.is_run(run_dir) and not overwrite:
        trained = train(recipe, resume="latest", progress=progress)
        how = "resumed"
    else:
        trained = train(recipe, overwrite=overwrite, progress=progress)
        how = "trained"
    if trained is not None and trained.start_step >= trained.steps:  # its last checkpoint was the end
        return how, {"steps": trained.steps, "seconds": None, "final": {}}
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise XWAMError(f"{run_dir / 'summary.json'}: unreadable ({e}); retrain with --overwrite") from None
    return how, summary


def _checkpoint_id(run_dir: Path) -> str:
    from xwam_core.checkpoint import checkpoint_dirs

    dirs = checkpoint_dirs(run_dir)
    if not dirs:
        raise XWAMError(f"{run_dir}: no checkpoint after training")
    return str(dirs[-1].resolve())


def _evaluate_variant(
    variant_dir: Path,
    run_dir: Path,
    store_path: Path,
    settings: dict[str, Any],
    closed_loop: bool,
    with_sim_baselines: bool,
    overwrite: bool,
    progress: Progress,
) -> dict[str, Any]:
    """Offline (world mode) + policy latency (+ closed loop) of one variant; cached in eval.json."""
    from xwam_core.evaluate import applicable_metrics, evaluate_run
    from xwam_core.infer_options import InferOptions
    from xwam_core.infer_run import InferenceRun
    from xwam_core.runs import load_run

    cache = variant_dir / EVAL_FILE
    settings = {
        **settings,
        "checkpoint": _checkpoint_id(run_dir),
        "closed_loop": closed_loop,
        "sim_baselines": with_sim_baselines,
    }
    if cache.is_file() and not overwrite:
        try:
            saved = json.loads(cache.read_text())
            if saved.get("settings") == settings:
                return dict(saved["result"])
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            pass  # damaged or another format: evaluate again
    result: dict[str, Any] = {}
    infer_dir = variant_dir / "infer"
    world = InferOptions(
        checkpoint=run_dir,
        store=store_path,
        out=infer_dir,
        mode="world",
        windows_per_episode=settings["windows_per_episode"],
        seed=settings["infer_seed"],
        overwrite=True,
        command="xwam ablate (offline, world mode)",
    )
    summary = InferenceRun(world).execute(progress)
    run = load_run(infer_dir)
    specs = [s for s in applicable_metrics(run, with_lpips=False) if s.name in ("psnr", "absrel")]
    report = evaluate_run(run, specs, progress=progress)
    metrics = report["metrics"]
    result["infer_run"] = str(infer_dir)
    result["windows"] = [
        [int(e), int(f)] for e, f in zip(run["episode_index"], run["frame_index"], strict=True)
    ]
    result["episodes"] = summary.episodes
    result["world_denoiser_calls"] = summary.num_denoiser_calls
    result["predicts_depth"] = run.has_pred_depth
    result["psnr_db"] = metrics["psnr"]["model"]["overall"] if "psnr" in metrics else None
    result["absrel"] = metrics["absrel"]["model"]["overall"] if "absrel" in metrics else None
    result["offline_baselines"] = {
        name: {
            m: metrics[m]["baselines"][name]["overall"] for m in metrics if name in metrics[m]["baselines"]
        }
        for name in ("repeat_frame", "mean_frame")
    }
    # policy-mode latency on the same windows (nothing written: the run object predicts in memory)
    policy_opts = dataclasses.replace(world, mode="policy", out=variant_dir / "infer-policy", overwrite=False)
    _, latencies, calls = InferenceRun(policy_opts).predict(progress)
    result["latency_ms_offline"] = 1000 * sum(latencies) / len(latencies)
    result["policy_denoiser_calls"] = calls
    result["latency_source"] = "offline"
    result["latency_ms"] = result["latency_ms_offline"]
    if closed_loop:
        from xwam_core.policy import Policy
        from xwam_core.sim.metaworld import evaluate_metaworld

        policy = Policy.from_checkpoint(run_dir)
        sim = evaluate_metaworld(
            policy,
            list(settings["tasks"]),
            settings["episodes"],
            seed=settings["seed"],
            max_steps=settings["max_steps"],
            baselines=["expert", "random"] if with_sim_baselines else False,
            progress=progress,
        )
        data = sim.to_json()
        k, n = sim.counts("model")
        result["success_rate"] = k / n if n else None
        result["successes"] = [k, n]
        result["success_interval_95"] = data["success_rate"]["interval_95"]["mean"]["model"]
        result["success_per_task"] = {
            t: data["success_rate"]["successes"]["per_task"][t]["model"] for t in sim.tasks
        }
        result["latency_ms_closed_loop"] = data["model_latency_ms_mean"]
        if data["model_latency_ms_mean"] is not None:
            result["latency_source"] = "closed loop"
            result["latency_ms"] = data["model_latency_ms_mean"]
        result["actions_per_query"] = sim.actions_per_query
        result["sim_baselines"] = {
            p: {
                "success_rate": sim.success_rate(p),
                "successes": list(sim.counts(p)),
                "success_interval_95": data["success_rate"]["interval_95"]["mean"][p],
            }
            for p in ("expert", "random")
            if sim.counts(p)[1]
        }
    write_json_atomic(cache, {"settings": settings, "result": result})
    return result


def _is_ablation_json(path: Path) -> bool:
    try:
        if path.stat().st_size > 64 * 2**20:  # far beyond any table: not read to find out
            return False
        content = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(content, dict) and "xwam_ablation" in content


def check_table_files(out: Path) -> None:
    """Every run rewrites OUT/ablation.json and OUT/ablation.md: refuse, before any training, when one of
    them is there and is not an earlier ablation's table (a file of something else is never replaced)."""
    ours = _is_ablation_json(out / "ablation.json")
    for name in ("ablation.json", "ablation.md"):
        path = out / name
        if path.is_dir():
            raise XWAMError(f"--out {out}: {name} there is a folder; expected the ablation's table file")
        if (path.exists() or path.is_symlink()) and not ours:
            raise XWAMError(
                f"--out {out}: {name} there was not written by `xwam ablate` (no ablation.json of an "
                "ablation beside it); refusing to replace it (give another --out)"
            )


def _machine() -> str:
    import torch

    device = "cuda: " + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    cpu = platform.processor() or platform.machine()
    return f"{device} ({cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def run_ablation(
    recipe_path: str | Path,
    variants: list[str] | str | None = None,
    overrides: list[str] | None = None,
    out: str | Path = "out/ablate",
    episodes: int = 10,
    seed: int = 1000,
    store: str | Path | None = None,
    windows_per_episode: int = 4,
    max_steps: int = 150,
    overwrite: bool = False,
    progress: Progress = SILENT,
) -> AblationResult:
    """Train and evaluate each variant (see the module's docstring); write OUT/ablation.json and .md."""
    from xwam_core.data.reader import EpisodeStore
    from xwam_core.data.sources.metaworld import MAX_STEPS_LIMIT
    from xwam_core.recipe import load_recipe

    names = parse_variants(variants)
    overrides = list(overrides or [])
    check_overrides(overrides)
    if episodes < 1:
        raise XWAMError(f"--episodes {episodes}: expected an integer >= 1 (closed-loop episodes per task)")
    if seed < 0:
        raise XWAMError(f"--seed {seed}: expected an integer >= 0")
    if windows_per_episode < 1:
        raise XWAMError(f"--windows-per-episode {windows_per_episode}: expected an integer >= 1")
    if not 1 <= max_steps <= MAX_STEPS_LIMIT:  # the closed loop's limit, checked before any training
        raise XWAMError(f"--max-steps {max_steps}: expected 1 to {MAX_STEPS_LIMIT} (Meta-World's horizon)")
    sets = overrides + ([f"data.store={json.dumps(str(store))}"] if store is not None else [])
    base = load_recipe(recipe_path, sets)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise XWAMError(f"--out {out}: is a file; expected a folder")
    check_table_files(out)
    recipes = {n: variant_recipe(base, n, out / n / "run") for n in names}  # every one checked first
    if base.data.mixture:
        raise XWAMError(
            f"{recipe_path}: data.mixture ({len(base.data.mixture)} stores): the ablation trains and evaluates "
            "on one store; pass --store PATH (it replaces the mixture)"
        )
    store_path = Path(base.data.store)
    episode_store = EpisodeStore(store_path)
    if base.data.val_episodes < 1:
        raise XWAMError(
            f"{recipe_path}: data.val_episodes = 0 holds no episode out; the ablation evaluates on held-out "
            "episodes (--set data.val_episodes=N)"
        )
    sim = is_metaworld_store(episode_store)
    notes: list[str] = []
    if not sim:
        source = episode_store.info.get("xwam", {}).get("source", "unknown")
        notes.append(
            f"closed loop skipped: {store_path} is not a Meta-World store (source: {source}), so there is no "
            "simulator to roll out in; success is n/a and latency is the offline policy-mode latency"
        )
    tasks = list(episode_store.tasks)
    settings = {
        "store": str(store_path.resolve()),
        "windows_per_episode": windows_per_episode,
        "infer_seed": 0,
        "tasks": tasks,
        "episodes": episodes,
        "seed": seed,
        "max_steps": max_steps,
    }
    bar = progress.task("variants", total=len(names))
    rows: list[VariantResult] = []
    have_sim_baselines = False
    for name in names:
        recipe = recipes[name]
        bar.advance(0, info=f"{name}: training")
        how, summary = _train_variant(recipe, overwrite, progress)
        progress.log(f"{name}: {how} ({recipe.train.out})")
        bar.advance(0, info=f"{name}: evaluating")
        evaluation = _evaluate_variant(
            out / name,
            Path(recipe.train.out),
            store_path,
            settings,
            sim,
            sim and not have_sim_baselines,
            overwrite,
            progress,
        )
        have_sim_baselines = have_sim_baselines or bool(evaluation.get("sim_baselines"))
        final = summary.get("final") or {}
        rows.append(
            VariantResult(
                name=name,
                description=DESCRIPTIONS[name],
                noise_mode=recipe.noise.mode,
                inference_schedule=recipe.inference.schedule,
                num_steps_video=recipe.inference.num_steps_video,
                num_steps_action=(
                    recipe.inference.num_steps_video
                    if recipe.inference.schedule == "sync"
                    else recipe.inference.num_steps_action
                ),
                num_depth_blocks=depth_blocks(recipe),
                run=str(recipe.train.out),
                training=how,
                train_seconds=summary.get("seconds"),
                train_steps=int(summary.get("steps", recipe.train.max_steps)),
                final_loss=final.get("loss"),
                evaluation=evaluation,
            )
        )
        bar.advance(info=f"{name}: done")
    first = rows[0].evaluation
    windows = first["windows"]
    differing = [r.name for r in rows if r.evaluation["windows"] != windows]
    if differing:  # cannot happen with one recipe and store; said, not hidden
        notes.append(f"offline windows differ from {rows[0].name}'s for: {', '.join(differing)}")
    if not episode_store.has_depth:
        notes.append(f"AbsRel n/a: {store_path} has no depth")
    elif any(r.evaluation["absrel"] is None for r in rows):
        which = ", ".join(r.name for r in rows if r.evaluation["absrel"] is None)
        notes.append(f"AbsRel n/a for {which}: no depth branch, so no depth is predicted")
    sim_baselines: dict[str, Any] = next(
        (r.evaluation["sim_baselines"] for r in rows if r.evaluation.get("sim_baselines")), {}
    )
    n_val = len(first["episodes"])
    scale = {
        "train_steps": base.train.max_steps,
        "batch_size": base.data.batch_size,
        "train_episodes": len(episode_store.episodes) - n_val,
        "held_out_episodes": n_val,
        "offline_windows": len(windows),
        "closed_loop_episodes_per_task": episodes if sim else None,
        "machine": _machine(),
        "overrides": overrides,
    }
    result = AblationResult(
        out=out,
        recipe=str(recipe_path),
        store=str(store_path),
        variants=rows,
        closed_loop={
            "ran": sim,
            "note": None if sim else notes[0],
            "tasks": tasks if sim else [],
            "episodes_per_task": episodes if sim else None,
            "seed": seed if sim else None,
            "max_steps": max_steps if sim else None,
            "interval": "95% Wilson score interval, pooled over tasks",
        },
        offline={
            "mode": "world",
            "episodes": first["episodes"],
            "windows": len(windows),
            "windows_per_episode": windows_per_episode,
            "frames": "future frames only",
            "metrics": {"psnr_db": "dB, higher is better", "absrel": "lower is better"},
        },
        baselines={"offline": first["offline_baselines"], "closed_loop": sim_baselines},
        scale=scale,
        notes=notes,
    )
    out.mkdir(parents=True, exist_ok=True)
    result.json_path = write_json_atomic(out / "ablation.json", result.to_json())
    result.md_path = write_text_atomic(out / "ablation.md", markdown(result))
    return result


# ------------------------------------------------------------------------------------ formatting
def fmt_success(ev: dict[str, Any]) -> str:
    rate, interval = ev.get("success_rate"), ev.get("success_interval_95")
    if rate is None:
        return "n/a"
    k, n = ev.get("successes", [0, 0])
    band = f" [{100 * interval[0]:.0f}-{100 * interval[1]:.0f}]" if interval else ""
    return f"{100 * rate:.0f}% ({k}/{n}){band}"


def fmt_number(x: float | None, digits: int) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def fmt_paper(name: str) -> str:
    p = PAPER[name]
    return f"{p['success']:.1f}%" + (f" at {p['latency_ms']} ms" if p["latency_ms"] is not None else "")


def scale_line(result: AblationResult) -> str:
    s = result.scale
    loop = (
        f"{s['closed_loop_episodes_per_task']} held-out closed-loop episodes per task "
        f"({', '.join(result.closed_loop['tasks'])}; seed {result.closed_loop['seed']})"
        if result.closed_loop["ran"]
        else "no closed loop"
    )
    return (
        f"Scale: {s['train_steps']} training steps at batch {s['batch_size']} on {s['train_episodes']} "
        f"episodes; {s['offline_windows']} offline windows of {s['held_out_episodes']} held-out "
        f"episode{'' if s['held_out_episodes'] == 1 else 's'}; "
        f"{loop}; machine: {s['machine']}"
    )


def markdown(result: AblationResult) -> str:
    """ablation.md: the measured table beside the paper's numbers, the baselines, the scale and notes."""
    lines = [
        f"# Ablation: {result.recipe}",
        "",
        "| variant | success [95%] | latency ms | PSNR dB | AbsRel | train s | paper |",
        "|---|---|---|---|---|---|---|",
    ]
    for v in result.variants:
        ev = v.evaluation
        lines.append(
            f"| {v.name} | {fmt_success(ev)} | {fmt_number(ev.get('latency_ms'), 1)} | "
            f"{fmt_number(ev.get('psnr_db'), 2)} | {fmt_number(ev.get('absrel'), 4)} | "
            f"{fmt_number(v.train_seconds, 1)} | {fmt_paper(v.name)} |"
        )
    for name, values in result.baselines["offline"].items():
        lines.append(
            f"| _{name.replace('_', ' ')}_ | | | {fmt_number(values.get('psnr'), 2)} | "
            f"{fmt_number(values.get('absrel'), 4)} | | |"
        )
    for name, values in result.baselines["closed_loop"].items():
        lines.append(f"| _{name}_ | {fmt_success(values)} | | | | | |")
    latency = {r.evaluation.get("latency_source") for r in result.variants}
    lines += [
        "",
        "Variants: "
        + "; ".join(f"**{v.name}**: {v.description}" for v in result.variants)
        + ". Latency: policy mode, ms per query ("
        + " / ".join(sorted(s for s in latency if s))
        + "). PSNR and AbsRel: world mode, future frames of the same held-out windows for every variant. "
        f"Paper: {PAPER_SOURCE}.",
        "",
        scale_line(result) + ".",
    ]
    if result.notes:
        lines += ["", *[f"- {n}" for n in result.notes]]
    return "\n".join(lines) + "\n"

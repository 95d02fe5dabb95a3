"""`--dry-run` (xwam_core.plan): the plan of a recipe per GPU, checked against measurement and the CLI.

The memory figure is checked against the measured peak of a real training step of the tiny preset on
this CPU (a fresh process); bench/plan_check.py does the same for the medium preset as well.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from xwam_cli.main import app
from xwam_core import plan as P
from xwam_core.errors import XWAMError
from xwam_core.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny_cpu.toml")
BASE = str(ROOT / "recipes" / "base.toml")
ADVICE = re.compile(
    r"^needs [\d.]+ GB/GPU on \d+ x [\d.]+ GB \((single|ddp|fsdp2), micro-batch \d+[^)]*\); "
    r"(fits with (single|ddp|fsdp2)( \+ grad checkpointing)? at micro-batch \d+ \(x accumulation \d+\): "
    r"[\d.]+ GB/GPU|does not fit even with .*)$"
)


def test_tiny_predicted_peak_within_20_percent_of_measured() -> None:
    from bench.plan_check import compare

    result = compare("tiny", grad_ckpt=False)
    assert 0.8 <= result["ratio"] <= 1.2, result


def test_base_model_is_built_on_meta_without_allocating() -> None:
    """The 5B model (27 GB in fp32) planned in a fresh process that stays far below that; DDP refused on
    8 x 80 GB with what fits."""
    code = f"""
import json, resource
from xwam_core.plan import plan
from xwam_core.recipe import load_recipe
p = plan(load_recipe({BASE!r}), gpus=8, strategy="ddp")
print(json.dumps({{"maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **p.to_json()}}))
"""
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    plan = json.loads(out.stdout.strip().splitlines()[-1])
    parameters = sum(g["trainable"] + g["frozen"] for g in plan["parameters"].values())
    assert parameters > 7e9  # 5.0 B trunk + 1.6 B depth branch + 0.7 B VAE
    assert plan["maxrss_mb"] < 3000, plan["maxrss_mb"]
    assert plan["tokens"]["sequence"] == 761  # docs/method.md section 2
    assert plan["tokens"]["depth_branch"] == 720
    assert not plan["fits"]  # DDP holds 147 GB of weights, gradients and AdamW state per GPU
    assert ADVICE.match(plan["advice"]), plan["advice"]
    assert "fsdp2" in plan["advice"].split("; ")[1]
    # FLOPs: 6 x params x tokens is the bulk; attention's quadratic term adds, the text K/V subtract
    six_pt = plan["flops_six_params_tokens"]
    assert 0.9 < plan["flops_per_step"] / six_pt < 1.5


def test_dry_run_json_through_the_cli() -> None:
    result = CliRunner().invoke(app, ["pretrain", TINY, "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    # 3 views x 3 latent frames x (64/8/2)^2 tokens + 32 actions + 9 states
    assert plan["tokens"]["sequence"] == 3 * 3 * 16 + 32 + 9
    # the recipe's data.batch_size (12) on one process, in one micro-batch
    assert plan["batch"] == {"global_batch": 12, "ranks": 1, "micro_batch": 12, "accumulation": 1}
    assert plan["strategy"] == "ddp" and plan["fits"] and plan["advice"] == ""
    assert plan["parameters"]["main branch"]["trainable"] > 0
    assert plan["memory"]["total"] > plan["memory"]["weights"] > 0


def test_dry_run_table_and_finetune_without_init() -> None:
    result = CliRunner().invoke(app, ["finetune", TINY, "--dry-run", "--strategy", "single"])
    assert result.exit_code == 0, result.output
    for row in ("tokens per sample", "memory/GPU: activations", "FLOPs per step", "step time"):
        assert row in result.stdout
    result = CliRunner().invoke(app, ["finetune", TINY])
    assert result.exit_code == 1 and "needs --init" in result.output
    result = CliRunner().invoke(app, ["pretrain", TINY, "--gpus", "8", "--json"])  # no --dry-run
    assert result.exit_code == 1 and "--gpus, --json: planning options" in result.output


def test_refusal_is_one_line_saying_what_would_fit() -> None:
    recipe = load_recipe(TINY)
    plan = P.plan(recipe, gpus=1, strategy="single")
    smallest = P.plan(recipe, gpus=1, strategy="single", micro_batch=1)
    # between what micro-batch 1 needs and what the recipe's micro-batch needs
    capacity = (plan.memory.total + smallest.memory.total) / 2 / P.GB
    result = CliRunner().invoke(
        app, ["pretrain", TINY, "--dry-run", "--strategy", "single", "--gpu-memory", f"{capacity:.4f}"]
    )
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: needs"), result.stderr
    assert ADVICE.match(errors[0].removeprefix("error: ")), errors[0]
    assert "fits with single" in errors[0]
    result = CliRunner().invoke(app, ["pretrain", TINY, "--dry-run", "--gpu-memory", "0.001", "--json"])
    assert result.exit_code == 1
    assert "does not fit even with fsdp2" in json.loads(result.stdout)["advice"]


def test_batch_keys_and_their_absence() -> None:
    recipe = load_recipe(TINY, ["data.batch_size=16"])
    assert P.resolve_batch(recipe, 2) == P.Batch(16, 2, 8, 1)  # no micro-batch key: accumulation 1
    assert P.resolve_batch(recipe, 2, micro_batch=2) == P.Batch(16, 2, 2, 4)
    section, key = P.MICRO_BATCH_KEY
    setattr(getattr(recipe, section), key, 1)  # the Trainer's key, read where the recipe has it
    assert P.resolve_batch(recipe, 2) == P.Batch(16, 2, 1, 8)
    with pytest.raises(XWAMError, match="does not divide over 3 GPUs"):
        P.resolve_batch(recipe, 3)
    with pytest.raises(XWAMError, match="micro-batch 3 does not divide the 8 samples per GPU"):
        P.resolve_batch(recipe, 2, micro_batch=3)


def test_bad_options_are_one_line_errors() -> None:
    recipe = load_recipe(TINY)
    with pytest.raises(XWAMError, match="--gpu 'V100': expected one of H100 80GB"):
        P.plan(recipe, gpu="V100")
    with pytest.raises(XWAMError, match="strategy 'zero3'"):
        P.plan(recipe, strategy="zero3")
    with pytest.raises(XWAMError, match="'single' runs on one GPU"):
        P.plan(recipe, gpus=2, strategy="single")
    for memory in (float("nan"), float("inf"), 0.0):
        with pytest.raises(XWAMError, match="expected a finite number of GB > 0"):
            P.plan(recipe, gpu_memory_gb=memory)
    assert P.gpu_named("h200") is P.GPUS["H200"]

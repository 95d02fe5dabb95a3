"""`xwam --help` and every `xwam CMD --help` answer without importing the heavy packages.

Help is read often and must come at once: commands import torch, diffusers and friends inside their
bodies only. Each check runs in a fresh interpreter, since this test process has long imported torch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# seconds each at import; none is needed to print help
HEAVY = (
    "torch",
    "diffusers",
    "transformers",
    "accelerate",
    "datasets",
    "pyarrow",
    "scipy",
    "open3d",
    "mujoco",
)

# Invokes every registered command's help in one interpreter and reports, per invocation, the heavy
# modules that appeared during it (so a failure names the command that pulled them in).
HELP_ALL = f"""
import json, sys
from typer.testing import CliRunner
from xwam_cli.main import app

heavy = {HEAVY!r}
report = {{"<import>": [m for m in heavy if m in sys.modules]}}
runner = CliRunner()
for args in (["--help"], *([c.name, "--help"] for c in app.registered_commands)):
    before = {{m for m in heavy if m in sys.modules}}
    result = runner.invoke(app, args)
    if result.exit_code != 0 or "Usage" not in result.output:
        raise SystemExit(f"{{args}}: exit {{result.exit_code}}: {{result.output[-500:]}}")
    report[" ".join(args)] = sorted({{m for m in heavy if m in sys.modules}} - before)
print(json.dumps(report))
"""


def run_python(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def test_every_command_help_imports_no_heavy_package():
    proc = run_python("-c", HELP_ALL)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    report = json.loads(proc.stdout)
    assert {"--help", "prepare --help", "pretrain --help", "evaluate --help"} <= set(report), report
    pulled = {args: modules for args, modules in report.items() if modules}
    assert not pulled, f"help imported heavy packages (move the import into the command body): {pulled}"


def test_module_entry_point_help_imports_no_heavy_package():
    for args in (["--help"], ["pretrain", "--help"]):
        proc = run_python("-X", "importtime", "-m", "xwam_cli.main", *args)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "Usage" in proc.stdout and "--help" in proc.stdout, proc.stdout
        # -X importtime writes one line per module to stderr: "import time: self | cumulative | name"
        imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
        assert not imported & set(HEAVY), f"xwam {' '.join(args)} imported {sorted(imported & set(HEAVY))}"

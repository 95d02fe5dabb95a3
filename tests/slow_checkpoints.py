"""`python -m tests.slow_checkpoints pretrain ...`: the `xwam` CLI with checkpoint writes and pruning slowed
down and announced on stdout, so a test can kill the process inside them (test-only: nothing in xwam_core
knows of it; it wraps xwam_core.checkpoint's functions from outside).

    @@ write step-00000005     a checkpoint's training state starts being written (each tensor file then
                               takes XWAM_TEST_WRITE_DELAY / 4 seconds more)
    @@ prune step-00000003     an old checkpoint, already renamed aside, starts being deleted file by file
                               over XWAM_TEST_WRITE_DELAY seconds
    @@ saved step-00000005     save_checkpoint returned
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from xwam_core import checkpoint

DELAY = float(os.environ.get("XWAM_TEST_WRITE_DELAY", "0.3"))
STEP = re.compile(r"step-\d{8}")


def announce(event: str, path: Path) -> None:
    match = STEP.search(path.name)
    print(f"@@ {event} {match.group(0) if match else path.name}", flush=True)


_write_training_state = checkpoint.write_training_state
_save_file = checkpoint.save_file
_save_checkpoint = checkpoint.save_checkpoint
_rmtree = shutil.rmtree


def write_training_state(folder: Path, state: Any) -> None:
    announce("write", folder)
    _write_training_state(folder, state)


def save_file(tensors: Any, filename: Any, *args: Any, **kwargs: Any) -> None:
    _save_file(tensors, filename, *args, **kwargs)
    time.sleep(DELAY / 4)


def save_checkpoint(run_dir: Any, parts: Any, state: Any, keep_last: int = 3) -> Path:
    final = _save_checkpoint(run_dir, parts, state, keep_last)
    announce("saved", final)
    return final


def rmtree(path: Any, *args: Any, **kwargs: Any) -> None:
    path = Path(path)
    if checkpoint.PRUNED_MARK in path.name:
        announce("prune", path)
        files = sorted(p for p in path.rglob("*") if p.is_file())
        for file in files:
            file.unlink()
            time.sleep(DELAY / max(1, len(files)))
    _rmtree(path, *args, **kwargs)


checkpoint.write_training_state = write_training_state
checkpoint.save_file = save_file
checkpoint.save_checkpoint = save_checkpoint
shutil.rmtree = rmtree

if __name__ == "__main__":
    from xwam_cli.main import app

    sys.argv[0] = "xwam"
    app()

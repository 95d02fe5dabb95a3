"""`xwam prepare` as a library call: source -> episode store, atomically."""

from __future__ import annotations

from pathlib import Path

from xwam_core.data.shards import merge_shards, prepare_parts
from xwam_core.data.sources import SOURCES
from xwam_core.data.store import StoreSummary
from xwam_core.errors import DataError
from xwam_core.progress import SILENT, Progress
from xwam_core.recipe import PrepareConfig, Recipe


def prepare_store(recipe: Recipe, progress: Progress = SILENT) -> StoreSummary:
    """Build the store `recipe.prepare.out` from `recipe.prepare.source`.

    Options are checked before any episode is generated (so no bar starts before an error); an
    existing store is only replaced with `overwrite`. Episodes are encoded by `prepare.workers` processes
    into a parts folder beside `out` and the store is assembled from it in episode order
    (xwam_core.data.shards): an interrupted run (Ctrl-C, killed) keeps the finished episodes and the same
    command continues; on an error nothing is left behind. The resolved recipe is saved in
    `meta/recipe.toml`. With `prepare.shard` use `prepare_shard`.
    """
    result = _prepare(recipe, progress, shard=False)
    assert isinstance(result, StoreSummary)
    return result


def prepare_shard(recipe: Recipe, progress: Progress = SILENT) -> Path:
    """Prepare shard `prepare.shard` ("i/N") of the store into the shard folder `prepare.out`; `merge`
    turns the N shard folders into the store."""
    result = _prepare(recipe, progress, shard=True)
    assert isinstance(result, Path)
    return result


def _prepare(recipe: Recipe, progress: Progress, shard: bool) -> StoreSummary | Path:
    cfg: PrepareConfig = recipe.prepare
    if not cfg.out:
        raise DataError("no output folder: pass --out DIR (or prepare.out in the recipe)")
    if shard != bool(cfg.shard):
        raise DataError("prepare.shard: " + ("expected 'i/N'" if shard else "set; use prepare_shard"))
    if cfg.source not in SOURCES:
        raise DataError(f"unknown source '{cfg.source}' (expected one of: {', '.join(SOURCES)})")
    return prepare_parts(recipe, SOURCES[cfg.source], progress)


def merge(
    shard_dirs: list[Path], out: Path, overwrite: bool = False, progress: Progress = SILENT
) -> StoreSummary:
    """`xwam merge`: the shard folders of one prepare -> the store a one-shot prepare writes."""
    return merge_shards(shard_dirs, out, overwrite, progress)

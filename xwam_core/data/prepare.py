"""`xwam prepare` as a library call: source -> episode store, atomically."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from xwam_core.data.sources import make_source
from xwam_core.data.store import StoreSummary, StoreWriter
from xwam_core.errors import DataError
from xwam_core.progress import SILENT, Progress
from xwam_core.recipe import PrepareConfig, Recipe, recipe_to_toml


def prepare_store(recipe: Recipe, progress: Progress = SILENT) -> StoreSummary:
    """Build the store `recipe.prepare.out` from `recipe.prepare.source`.

    Options are checked before any episode is generated (so no bar starts before an error); an
    existing store is only replaced with `overwrite`; on any error (or Ctrl-C) nothing is left behind, and
    what an interrupted earlier run left beside `out` is removed (a line each through `progress.log`).
    The resolved recipe is saved in `meta/recipe.toml`.
    """
    cfg: PrepareConfig = recipe.prepare
    if not cfg.out:
        raise DataError("no output folder: pass --out DIR (or prepare.out in the recipe)")
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise DataError(f"{out}: already exists; pass --overwrite to replace it")
    source = make_source(cfg)
    info = source.info()
    section = getattr(
        cfg, cfg.source.replace("-", "_"), None
    )  # the source's own options, recorded with the store
    options = dataclasses.asdict(section) if section is not None else {}
    with StoreWriter(
        out,
        info,
        overwrite=cfg.overwrite,
        source_options=options,
        notify=progress.log,
        store_format=cfg.store_format,
    ) as writer:
        (writer.tmp / "meta").mkdir(parents=True, exist_ok=True)
        (writer.tmp / "meta" / "recipe.toml").write_text(recipe_to_toml(recipe))
        bar = progress.task(f"{cfg.source} episodes", total=info.num_episodes)
        for episode in source.episodes():
            writer.add(episode)
            bar.advance(info=f"{episode.task} ({'success' if episode.success else 'no success'})")
    assert writer.summary is not None
    return writer.summary

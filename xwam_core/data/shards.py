"""Sharded, parallel, resumable prepare: episodes encoded in worker processes as parts, then assembled.

Every `xwam prepare` encodes its episodes into a parts folder beside the target and then assembles the
store from it in episode order, so 1 worker, N workers and N shards merged give the same store:

    .OUT.parts/                    beside OUT while a prepare runs; a shard's folder (OUT) once complete
        prepare.json               the manifest: settings, shard, episode numbers, the source's description,
                                   the recipe; a rerun with other settings is refused
        episodes/episode-000123/   one finished episode, written as .episode-000123.tmp and renamed:
            frames.parquet         per-frame columns (xwam_core.data.store.EncodedEpisode.frames)
            arrays.npz             cameras and statistics samples (numpy arrays, read without pickles)
            episode.json           task, length, success
            observation.images.<view>.mp4   its videos (store format 2)

A killed prepare (Ctrl-C, SIGKILL, a preempted job) keeps its finished episodes there: the same command
continues; `--overwrite` starts over. An error (a bad episode, a full disk) removes it, like the store's
own temporary folder. Shard i of N holds the episodes i, i + N, i + 2N, ... (tasks stay balanced);
`merge_shards` assembles complete shards into one store equal to a one-shot prepare.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shutil
import signal
import time
import tomllib
import zipfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from xwam_core.atomic import DiskError, Notify, disk_error, make_parents, remove_empty, replace_folder
from xwam_core.data.conform import Conform, conform_episode, conform_info, make_conform
from xwam_core.data.sources.base import EpisodeSource, SourceInfo
from xwam_core.data.store import EncodedEpisode, StoreSummary, StoreWriter, encode_episode, frame_schema
from xwam_core.data.video import store_video
from xwam_core.errors import DataError, RecipeError, XWAMError
from xwam_core.progress import SILENT, Progress

try:
    import fcntl
except ImportError:  # not POSIX: no lock against two prepares of one target
    fcntl = None  # type: ignore[assignment]

MANIFEST = "prepare.json"
PARTS_FORMAT = 1
# the settings that say how a prepare runs, not what it makes: they may change between a run and its rerun
RUN_SETTINGS = ("out", "overwrite", "workers", "shard")
SourceBuilder = Callable[[Any], EpisodeSource]  # PrepareConfig -> source (xwam_core.data.sources.SOURCES)


# ------------------------------------------------------------------------------------------ shards
def parse_shard(text: str) -> tuple[int, int]:
    """'i/N' -> (i, N) with 0 <= i < N (a SLURM array of N tasks numbered 0 .. N-1)."""
    try:
        index_text, count_text = text.split("/")
        index, count = int(index_text), int(count_text)
    except ValueError:
        raise RecipeError(f"prepare.shard: expected 'i/N' like '0/4', got {text!r}") from None
    if count < 1 or not 0 <= index < count:
        raise RecipeError(f"prepare.shard: expected 'i/N' with 0 <= i < N, got {text!r}")
    return index, count


def shard_episodes(num_episodes: int, index: int, count: int) -> list[int]:
    """The episode numbers of shard `index` of `count`: index, index + count, ... (deterministic)."""
    return list(range(index, num_episodes, count))


def prepare_settings(cfg: Any) -> dict[str, Any]:
    """What a prepare makes, flattened (`prepare.metaworld.size` -> 64): equal settings, equal episodes."""
    table = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RUN_SETTINGS}
    settings = _flatten(table, "prepare.")
    for (
        key,
        value,
    ) in settings.items():  # a source folder as absolute path: `data/x` and `/home/me/data/x` agree
        if key.endswith(".path") and isinstance(value, str) and value:
            settings[key] = os.path.abspath(os.path.expanduser(value))
    return settings


def _flatten(table: dict[str, Any], prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict) and key in ("metaworld", "lerobot", "xwam_release"):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def first_difference(expected: dict[str, Any], actual: dict[str, Any]) -> str | None:
    """The first key whose value differs, or None."""
    for key in sorted(set(expected) | set(actual)):
        if _jsonable(expected.get(key)) != _jsonable(actual.get(key)):
            return key
    return None


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))


def info_to_json(info: SourceInfo) -> dict[str, Any]:
    return _jsonable(dataclasses.asdict(info))


def info_from_json(table: dict[str, Any]) -> SourceInfo:
    table = dict(table)
    table["image_size"] = tuple(table["image_size"])
    return SourceInfo(**table)


# ------------------------------------------------------------------------------------------ parts
def part_name(index: int) -> str:
    return f"episode-{index:06d}"


def write_part(folder: Path, index: int, encoded: EncodedEpisode) -> None:
    """Move one encoded episode into `folder/episodes` as a finished part (written whole, then renamed)."""
    final = folder / "episodes" / part_name(index)
    tmp = final.parent / f".{final.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    pq.write_table(encoded.frames, tmp / "frames.parquet")
    arrays = {f"stats:{key}": values for key, values in encoded.stats.items()}
    for view, (intrinsics, extrinsics) in encoded.cameras.items():
        arrays[f"camera:{view}:intrinsics"] = intrinsics
        arrays[f"camera:{view}:extrinsics"] = extrinsics
    np.savez(tmp / "arrays.npz", **arrays)  # type: ignore[arg-type]
    videos = {}
    for key, path in encoded.videos.items():
        os.replace(path, tmp / f"{key}.mp4")
        videos[key] = f"{key}.mp4"
    meta = {"task": encoded.task, "length": encoded.length, "success": encoded.success, "videos": videos}
    (tmp / "episode.json").write_text(json.dumps(meta))
    os.replace(tmp, final)


def read_part(folder: Path, index: int) -> EncodedEpisode:
    """A finished part as `EncodedEpisode` (its videos stay in the part folder)."""
    part = folder / "episodes" / part_name(index)
    meta = _part_meta(part)
    try:
        frames = pq.read_table(part / "frames.parquet")
        with np.load(part / "arrays.npz", allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(
            f"{part}: cannot read this finished episode ({type(exc).__name__}: {exc}); prepare it again"
        ) from None
    cameras: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    stats: dict[str, np.ndarray] = {}
    for key, values in arrays.items():
        kind, _, rest = key.partition(":")
        if kind == "stats":
            stats[rest] = values
        else:
            view, _, which = rest.rpartition(":")
            pair = cameras.get(view, (values, values))
            cameras[view] = (values, pair[1]) if which == "intrinsics" else (pair[0], values)
    return EncodedEpisode(
        task=meta["task"],
        length=int(meta["length"]),
        success=bool(meta["success"]),
        frames=frames,
        cameras=cameras,
        videos={key: part / name for key, name in meta["videos"].items()},
        stats=stats,
    )


def _part_meta(part: Path) -> dict[str, Any]:
    """A part's episode.json, checked: task (text), length (> 0), success (bool), videos (name -> file)."""
    path = part / "episode.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read ({type(exc).__name__}: {exc}); prepare it again") from None
    expected = "expected task (text), length (a positive whole number), success (true/false), videos"
    if not isinstance(meta, dict):
        raise DataError(f"{path}: holds {type(meta).__name__}, not an object; {expected}; prepare it again")
    for key, ok in (
        ("task", lambda v: isinstance(v, str)),
        ("length", lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0),
        ("success", lambda v: isinstance(v, bool)),
        ("videos", lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values())),
    ):
        if key not in meta or not ok(meta[key]):
            raise DataError(f"{path}: '{key}' is {meta.get(key, 'missing')!r}; {expected}; prepare it again")
    return meta


def check_part_videos(folder: Path, index: int, size: tuple[int, int] | None, again: str) -> None:
    """Each video of a finished part exists, is not empty, and its container header opens with the
    part's frame count and the image size `size` (no decoding). `again`: what to tell the user."""
    import av

    part = folder / "episodes" / part_name(index)
    meta = _part_meta(part)
    for name in meta["videos"].values():
        path = part / name
        if Path(name).name != name or not path.is_file():
            raise DataError(f"{path}: video missing from this finished episode; {again}")
        if path.stat().st_size == 0:
            raise DataError(f"{path}: empty video (0 bytes); {again}")
        try:
            with av.open(os.fspath(path)) as container:
                stream = container.streams.video[0]
                frames, h, w = stream.frames, stream.codec_context.height, stream.codec_context.width
        except Exception as exc:  # PyAV raises many types for a damaged container
            reason = str(exc).splitlines()[0][:120] if str(exc) else ""
            raise DataError(
                f"{path}: unreadable video ({type(exc).__name__}: {reason}; truncated?); {again}"
            ) from None
        if frames and frames != meta["length"]:
            raise DataError(
                f"{path}: video holds {frames} frames, expected {meta['length']} (episode.json); {again}"
            )
        if size is not None and (h, w) != tuple(size):
            raise DataError(f"{path}: video frames are {h}x{w}, expected {size[0]}x{size[1]}; {again}")


def finished_parts(folder: Path) -> set[int]:
    """The episode numbers whose parts are complete (removes half-written ones of a killed run)."""
    episodes = folder / "episodes"
    done = set()
    if episodes.is_dir():
        for entry in episodes.iterdir():
            if entry.name.startswith(".") and entry.name.endswith(".tmp"):
                shutil.rmtree(entry, ignore_errors=True)
            elif entry.name.startswith("episode-") and (entry / "episode.json").is_file():
                done.add(int(entry.name.removeprefix("episode-")))
    return done


# ------------------------------------------------------------------------------------------ workers
@dataclass
class EncodeJob:
    """How a worker process makes its episodes: the source's builder and settings, where parts go."""

    builder: SourceBuilder
    cfg: Any  # PrepareConfig
    folder: Path


# in a worker process: its source (built once) and the queue its progress goes back through
_worker_source: tuple[EpisodeSource, Conform, SourceInfo] | None = None
_worker_queue: Any = None


def _open_source(job: EncodeJob) -> tuple[EpisodeSource, Conform, SourceInfo]:
    source = job.builder(job.cfg)
    info = source.info()
    conform = make_conform(info, job.cfg.resize, job.cfg.fps, job.cfg.action_kinds)
    return source, conform, conform_info(info, conform)


def encode_parts(
    job: EncodeJob,
    indices: Sequence[int],
    opened: tuple[EpisodeSource, Conform, SourceInfo],
    done: Callable[[int, str], None],
) -> None:
    """Encode the episodes `indices` as parts of `job.folder`; `done(index, status)` after each."""
    source, conform, info = opened
    scratch = job.folder / "episodes" / f".encoding-{os.getpid()}"
    wanted = sorted(indices)
    produced = 0
    schema = frame_schema(info, job.cfg.store_format)
    video = store_video(job.cfg.video, job.cfg.video_crf)
    for index, episode in zip(wanted, source.episodes_at(wanted), strict=False):
        episode = conform_episode(episode, conform)
        encoded = encode_episode(episode, index, info, job.cfg.store_format, scratch, schema, video)
        write_part(job.folder, index, encoded)
        produced += 1
        done(index, f"{episode.task} ({'success' if episode.success else 'no success'})")
    shutil.rmtree(scratch, ignore_errors=True)
    if produced != len(wanted):
        raise DataError(
            f"source '{info.name}': produced {produced} of the episodes {wanted[0]}..{wanted[-1]}; "
            f"expected {len(wanted)} (its num_episodes is {info.num_episodes})"
        )


class WorkerDied(DataError):
    """A worker process ended without a word (killed, out of memory): the finished episodes are kept."""


def _worker_init(job: EncodeJob, queue: Any) -> None:
    global _worker_source, _worker_queue
    _worker_queue = queue
    _worker_source = None
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle: it stops us


def _worker_run(job: EncodeJob, indices: list[int]) -> None:
    """One block of episodes in a worker process; errors go back as one-line DataErrors."""
    global _worker_source
    try:
        if _worker_source is None:
            _worker_source = _open_source(job)
        encode_parts(job, indices, _worker_source, lambda i, status: _worker_queue.put((i, status)))
    except XWAMError as exc:  # some carry fields that do not survive pickling: send the line
        raise DataError(str(exc)) from None
    except Exception as exc:
        err = disk_error(exc, job.folder)
        if err is not None:  # the main process names the target the user gave
            raise OSError(err.code, os.strerror(err.code)) from None
        raise


def _blocks(indices: list[int], workers: int) -> list[list[int]]:
    """Contiguous blocks (a source reuses its simulator within a block), a few per worker for balance."""
    count = min(len(indices), workers * 4)
    bounds = np.linspace(0, len(indices), count + 1).round().astype(int)
    return [indices[a:b] for a, b in itertools.pairwise(bounds.tolist()) if b > a]


def run_workers(
    job: EncodeJob,
    indices: list[int],
    workers: int,
    advance: Callable[[str], None],
    opened: tuple[EpisodeSource, Conform, SourceInfo] | None = None,
) -> None:
    """Encode `indices` with `workers` processes (1: in this process, with the source `opened`)."""
    if not indices:
        return
    if workers <= 1:
        encode_parts(job, indices, opened or _open_source(job), lambda i, status: advance(status))
        return
    import multiprocessing
    import pickle

    try:
        pickle.dumps(job.builder)
    except Exception:
        raise DataError(
            f"source '{job.cfg.source}' cannot run in worker processes (its builder is not an importable "
            "function); use --workers 1"
        ) from None
    # spawn: fresh interpreters, nothing inherited from this one (an OpenGL context, library threads)
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    executor = ProcessPoolExecutor(
        max_workers=workers, mp_context=context, initializer=_worker_init, initargs=(job, queue)
    )
    pending: set[Future] = set()
    completed = False
    try:
        pending = {executor.submit(_worker_run, job, block) for block in _blocks(indices, workers)}
        while pending:
            finished, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            _drain(queue, advance)
            for future in finished:
                future.result()  # a worker's error, raised here
        _drain(queue, advance)
        completed = True
    except BrokenProcessPool:
        raise WorkerDied(
            f"{job.folder}: a worker process died (killed, or out of memory?); its finished episodes are "
            "kept: rerun the same command to continue, with fewer --workers if memory ran out"
        ) from None
    finally:
        if not completed:  # an error or Ctrl-C: stop the workers now, not after their blocks
            for process in list(getattr(executor, "_processes", {}).values()):  # no public way to stop them
                process.terminate()
        executor.shutdown(wait=True, cancel_futures=True)
        queue.close()


def _drain(queue: Any, advance: Callable[[str], None]) -> None:
    import queue as queues

    while True:
        try:
            _, status = queue.get_nowait()
        except queues.Empty:
            return
        advance(status)


# ------------------------------------------------------------------------------------------ the folder
class PartsFolder:
    """The parts of one prepare (or one shard), its manifest, and the lock that keeps it to one writer."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = path
        self.manifest = manifest
        self._fd: int | None = None

    @staticmethod
    def beside(out: Path) -> Path:
        return out.parent / f".{out.name}.parts"

    @property
    def indices(self) -> list[int]:
        return list(self.manifest["episodes"])

    @property
    def info(self) -> SourceInfo:
        return info_from_json(self.manifest["source_info"])

    def lock(self) -> None:
        if fcntl is None:
            return
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DataError(
                f"{self.path}: another prepare is writing these episodes right now; wait for it or stop it"
            ) from None
        self._fd = fd

    def unlock(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def remove(self) -> None:
        self.unlock()
        shutil.rmtree(self.path, ignore_errors=True)


def open_parts(
    out: Path, manifest: dict[str, Any], overwrite: bool, notify: Notify | None = None
) -> tuple[PartsFolder, bool]:
    """Start or continue the parts folder of `out`; (folder, whether it was made here). A folder left by
    an earlier run with other settings is refused with the first setting that differs."""
    path = PartsFolder.beside(out)
    if path.exists() and overwrite:
        shutil.rmtree(path)
        if notify:
            notify(f"removed {path}: the unfinished episodes of an earlier prepare (--overwrite starts over)")
    if path.is_dir() and (path / MANIFEST).is_file():
        folder = PartsFolder(path, _read_manifest(path))
        folder.lock()
        old = folder.manifest
        done = len(finished_parts(path))
        for key, before, now in _changes(old, manifest):
            folder.unlock()
            raise DataError(
                f"{out}: an unfinished prepare of it ({path}, {done} episodes done) has {key} = "
                f"{json.dumps(before)}, this one {json.dumps(now)}; rerun with the same settings to continue, "
                "or pass --overwrite to start over"
            )
        return folder, False
    if path.exists():  # made but killed before its manifest was written: nothing to keep
        shutil.rmtree(path)
    path.mkdir()
    folder = PartsFolder(path, manifest)
    folder.lock()
    (path / "episodes").mkdir()
    tmp = path / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, path / MANIFEST)
    return folder, True


def _changes(old: dict[str, Any], new: dict[str, Any]) -> Iterator[tuple[str, Any, Any]]:
    key = first_difference(old["settings"], new["settings"])
    if key is not None:
        yield key, old["settings"].get(key), new["settings"].get(key)
    if old.get("shard") != new.get("shard"):
        yield "prepare.shard", _shard_text(old.get("shard")), _shard_text(new.get("shard"))
    key = first_difference(old["source_info"], new["source_info"])
    if key is not None:
        yield f"the source's {key}", old["source_info"].get(key), new["source_info"].get(key)


def _shard_text(shard: list[int] | None) -> str:
    return f"{shard[0]}/{shard[1]}" if shard else ""


def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(
            f"{folder}: not a shard folder (no {MANIFEST}); expected the --out of `xwam prepare --shard`"
        ) from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read ({exc}); expected the manifest `xwam prepare` writes") from None
    if not isinstance(manifest, dict):
        raise DataError(
            f"{path}: holds {type(manifest).__name__}, not an object; expected the manifest `xwam prepare` writes"
        )
    if manifest.get("parts_format") != PARTS_FORMAT:
        raise DataError(f"{path}: parts_format {manifest.get('parts_format')!r}; expected {PARTS_FORMAT}")
    for key, kind in (
        ("settings", dict),
        ("source_info", dict),
        ("episodes", list),
        ("recipe", str),
        ("num_episodes", int),
    ):
        if not isinstance(manifest.get(key), kind):
            raise DataError(
                f"{path}: '{key}' is {manifest.get(key, 'missing')!r}; expected the manifest `xwam prepare` "
                "writes (prepare it again)"
            )
    shard = manifest.get("shard")
    if shard is not None and not (
        isinstance(shard, list) and len(shard) == 2 and all(isinstance(x, int) for x in shard)
    ):
        raise DataError(f"{path}: 'shard' is {shard!r}; expected [i, N] or null (prepare it again)")
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in manifest["episodes"]):
        raise DataError(f"{path}: 'episodes' holds non-integers; expected episode numbers (prepare it again)")
    return manifest


# ------------------------------------------------------------------------------------------ prepare
def prepare_parts(
    recipe: Any,
    builder: SourceBuilder,
    progress: Progress = SILENT,
) -> StoreSummary | Path:
    """`xwam prepare` of `recipe.prepare`: the store (a summary), or with `prepare.shard` the shard folder."""
    from xwam_core.recipe import recipe_to_toml

    cfg = recipe.prepare
    started = time.perf_counter()
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise DataError(f"{out}: already exists; pass --overwrite to replace it")
    source = builder(cfg)  # checks the source's options before anything is written
    raw_info = source.info()
    conform = make_conform(raw_info, cfg.resize, cfg.fps, cfg.action_kinds)
    info = conform_info(raw_info, conform)
    shard = parse_shard(cfg.shard) if cfg.shard else None
    indices = shard_episodes(info.num_episodes, *shard) if shard else list(range(info.num_episodes))
    source_options = _source_options(cfg)
    manifest: dict[str, Any] = {
        "parts_format": PARTS_FORMAT,
        "settings": prepare_settings(cfg),
        "shard": list(shard) if shard else None,
        "num_episodes": info.num_episodes,
        "episodes": indices,
        "source_info": info_to_json(info),
        "source_options": source_options,
        "recipe": recipe_to_toml(recipe),
        "complete": False,
    }
    made: list[Path] = []
    folder: PartsFolder | None = None
    try:
        made = make_parents(out)
        folder, _ = open_parts(out, manifest, cfg.overwrite, progress.log)
        done = finished_parts(folder.path)
        for i in sorted(done & set(indices)):  # a part damaged since (a full disk, a bad copy): redo it
            try:
                check_part_videos(folder.path, i, info.image_size, "encoding it again")
            except DataError as exc:
                progress.log(str(exc))
                shutil.rmtree(folder.path / "episodes" / part_name(i))
                done.discard(i)
        todo = [i for i in indices if i not in done]
        label = f"{cfg.source} episodes" + (f" (shard {shard[0]}/{shard[1]})" if shard else "")
        bar = progress.task(label, total=len(indices), completed=len(indices) - len(todo))
        if done and todo:
            progress.log(f"continuing: {len(indices) - len(todo)} of {len(indices)} episodes already done")
        job = EncodeJob(builder=builder, cfg=cfg, folder=folder.path)
        run_workers(job, todo, cfg.workers, lambda status: bar.advance(info=status), (source, conform, info))
        if shard:
            result: StoreSummary | Path = _finish_shard(folder, out, cfg.overwrite)
        else:
            result = assemble([folder], out, cfg.overwrite, recipe_to_toml(recipe), progress, source_options)
            folder.remove()
            result.seconds = time.perf_counter() - started
        return result
    except KeyboardInterrupt:
        if folder is not None:  # the caller says so (xwam_cli/prepare.py: one `interrupted:` line)
            folder.unlock()
        raise
    except BaseException as exc:
        if folder is not None:
            folder.remove()
        remove_empty(made)
        err = disk_error(exc, out)
        if err is not None and err is not exc:
            raise DiskError(err.code, _outside(err.path, out), err.needed, err.written) from exc
        raise


def _outside(path: Path, out: Path) -> Path:
    """A path inside the parts folder of `out` (or that folder, when making it failed) named by the
    target the user gave."""
    parts = PartsFolder.beside(out)
    if path == parts or parts in path.parents:
        return out
    return path


def _source_options(cfg: Any) -> dict[str, Any]:
    section = getattr(cfg, cfg.source.replace("-", "_"), None)  # the source's own options
    return dataclasses.asdict(section) if section is not None else {}


def _finish_shard(folder: PartsFolder, out: Path, overwrite: bool) -> Path:
    """The complete parts folder becomes the shard folder `out`."""
    folder.manifest["complete"] = True
    tmp = folder.path / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(folder.manifest, indent=2))
    os.replace(tmp, folder.path / MANIFEST)
    folder.unlock()
    if out.exists():
        from xwam_core.atomic import check_replaceable

        check_replaceable(out, MANIFEST)
    replace_folder(folder.path, out, overwrite=overwrite)
    return out


def assemble(
    folders: list[PartsFolder],
    out: Path,
    overwrite: bool,
    recipe_toml: str,
    progress: Progress = SILENT,
    source_options: dict[str, Any] | None = None,
) -> StoreSummary:
    """Write the store `out` from the parts of `folders`, in episode order (0 .. num_episodes - 1)."""
    first = folders[0]
    info = first.info
    where = {i: f for f in folders for i in f.indices}
    order = sorted(where)
    settings = first.manifest["settings"]
    with StoreWriter(
        out,
        info,
        overwrite=overwrite,
        source_options=source_options if source_options is not None else first.manifest["source_options"],
        notify=progress.log,
        store_format=int(settings["prepare.store_format"]),
        video=store_video(settings.get("prepare.video", "av1"), int(settings.get("prepare.video_crf", 0))),
    ) as writer:
        (writer.tmp / "meta").mkdir(parents=True, exist_ok=True)
        (writer.tmp / "meta" / "recipe.toml").write_text(recipe_toml)
        bar = progress.task("writing the store", total=len(order))
        for index in order:
            writer.add_encoded(read_part(where[index].path, index))
            bar.advance()
    assert writer.summary is not None
    return writer.summary


# ------------------------------------------------------------------------------------------ merge
def merge_shards(
    shard_dirs: Sequence[Path], out: Path, overwrite: bool = False, progress: Progress = SILENT
) -> StoreSummary:
    """One store from the complete shard folders of one prepare: the same store as a one-shot prepare
    (statistics computed over all episodes). Refuses missing, repeated or mismatched shards."""
    from xwam_core.recipe import Recipe, recipe_from_dict, recipe_to_toml

    if not shard_dirs:
        raise DataError(
            "merge: no shard folders given; expected the --out folders of `xwam prepare --shard i/N`"
        )
    if out.exists() and not overwrite:
        raise DataError(f"{out}: already exists; pass --overwrite to replace it")
    folders = []
    for path in shard_dirs:
        path = Path(path)
        manifest = _read_manifest(path)
        if not manifest.get("shard"):
            raise DataError(f"{path}: not a shard (prepared without --shard)")
        if not manifest.get("complete"):
            raise DataError(
                f"{path}: shard {_shard_text(manifest['shard'])} is not complete; rerun its prepare"
            )
        missing = [i for i in manifest["episodes"] if i not in finished_parts(path)]
        if missing:
            raise DataError(f"{path}: episode {missing[0]} of this shard is missing; prepare the shard again")
        size = manifest["source_info"].get("image_size")
        if not (isinstance(size, list) and len(size) == 2 and all(isinstance(x, int) for x in size)):
            size = None  # checked with the rest of the source's description below
        for i in manifest["episodes"]:
            check_part_videos(path, i, size, "prepare the shard again")
        folders.append(PartsFolder(path, manifest))
    first = folders[0]
    count = first.manifest["shard"][1]
    seen: dict[int, Path] = {}
    for folder in folders:
        for key, before, now in _changes(
            first.manifest, {**folder.manifest, "shard": first.manifest["shard"]}
        ):
            raise DataError(
                f"{folder.path}: {key} = {json.dumps(now)}, but {json.dumps(before)} in {first.path}; "
                "shards of one store need the same settings"
            )
        index, n = folder.manifest["shard"]
        if n != count:
            raise DataError(f"{folder.path}: shard {index}/{n}, but {first.path} is one of {count} shards")
        if index in seen:
            raise DataError(f"{folder.path}: shard {index}/{n} given twice (also {seen[index]})")
        seen[index] = folder.path
    absent = [i for i in range(count) if i not in seen]
    if absent:
        raise DataError(
            f"merge: shard {absent[0]}/{count} is missing; expected all {count} shards of the prepare"
        )
    recipe: Recipe = recipe_from_dict(tomllib.loads(first.manifest["recipe"]), str(first.path / MANIFEST))
    recipe.prepare.out, recipe.prepare.shard = str(out), ""
    return assemble(folders, out, overwrite, recipe_to_toml(recipe), progress)

"""Batch runs over an archive: one store per input, what is done is skipped, failures are isolated.

Inputs come from globs. A matched file is one input (a raster, or a DICOM file); a matched folder
is a DICOM study and each of its series is one input. Each input's store sits under the output
root at a name that mirrors the input's path relative to its glob's fixed part (``a/b.tif`` ->
``ROOT/a/b.tif.zarr``, ``a_b.tif`` -> ``ROOT/a_b.tif.zarr``): stable from night to night, never
outside the root, and two inputs that would share a name are refused before anything runs.

Decisions come from the stores themselves: complete and made by the same job (config, model and
source content) -> skipped; incomplete of the same job -> resumed; complete but the source changed
-> a new version is built beside it (``NAME.zarr.next``) and swapped in only once complete, so the
previous store stays readable until then (on object storage, which has no rename, the new version
is copied over the old one: ``MaskStore.replace_version``; a swap cut short is finished by the next
run before anything else happens to that store). All inputs stream through one pool of
workers (a model is loaded once per actor for the whole batch); a failing input is recorded with
its message and traceback and never stops the others.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import BatchConfig, SourceConfig
from pipeline.core.plan import Target
from pipeline.errors import ConfigError, RaymaskError, SourceError, StoreBusy, one_line
from pipeline.jobs.cluster import probe, ray_session, target_of, unwrap
from pipeline.jobs.run import (
    Job,
    choose_engine,
    executor_for,
    finalize,
    label_regions,
    open_output,
    prepare,
    regions_pending,
)
from pipeline.jobs.stream import stream
from pipeline.store import MaskStore, finish_replacement, location, replace_version, swap_in
from pipeline.store.lease import store_lease
from pipeline.store.location import ObjectPath, StorePath

REPORT = "batch-report.json"
_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class BatchInput:
    name: str  # store name relative to the root, without .zarr
    source: SourceConfig
    label: str  # what the report shows: the file, or the folder and series
    problem: RaymaskError | None = None  # a study that could not even be split into series


@dataclass
class InputResult:
    input: str
    store: str
    status: str  # done | resumed | skipped | busy (another run holds its store) | failed
    units_run: int = 0
    units_skipped: int = 0
    error: str | None = None
    traceback: str | None = None
    classes: dict[str, Any] = field(default_factory=dict)
    exports: dict[str, str] = field(default_factory=dict)  # name -> path written, or why not


@dataclass
class BatchReport:
    root: str
    started: str
    seconds: float
    results: list[InputResult]

    @property
    def ok(self) -> bool:
        return all(r.status != "failed" for r in self.results)

    def counts(self) -> dict[str, int]:
        counts = {"done": 0, "resumed": 0, "skipped": 0, "busy": 0, "failed": 0}
        for r in self.results:
            counts[r.status] += 1
        return counts

    def to_json(self) -> dict[str, Any]:
        return {"root": self.root, "started": self.started, "seconds": self.seconds, "ok": self.ok,
                "counts": self.counts(), "results": [asdict(r) for r in self.results]}  # fmt: skip


def expand_inputs(config: BatchConfig) -> list[BatchInput]:
    """Inputs from the globs, with stable store names; refuses empty globs and name collisions."""

    found: dict[str, BatchInput] = {}
    for pattern in config.inputs:
        if pattern.startswith(("s3://", "/vsis3/")):  # listed in the bucket, read through GDAL's /vsis3/
            _add_objects(found, pattern, config)
            continue
        base = _fixed_part(pattern)
        matches = sorted(glob.glob(pattern, recursive=True)) if _has_glob(pattern) else [pattern]
        matches = [m for m in matches if Path(m).exists()]
        if not matches:
            raise ConfigError(f"{pattern}: matches nothing")
        for match in matches:
            rel = _relative_name(Path(match), base)
            if Path(match).is_dir():
                _add_study(found, match, rel)
            else:
                source = SourceConfig(path=match, kind=config.source.kind, bands=config.source.bands)
                _add(found, BatchInput(rel, source, match))
    return list(found.values())


def _add_study(found: dict[str, BatchInput], match: str, rel: str) -> None:
    """A DICOM study folder (or ``s3://`` prefix): one input per series, named ``rel/MODALITY-tag``."""
    from pipeline.sources.dicom import discover

    try:
        series, _ = discover([match])
    except RaymaskError as exc:  # this study fails on its own; the other inputs still run
        source = SourceConfig(path=match, kind="dicom")
        _add(found, BatchInput(f"{rel}/study", source, match, problem=exc))
        return
    for s in series:
        tag = hashlib.sha256(s.key.encode()).hexdigest()[:8]
        source = SourceConfig(path=s.paths, kind="dicom")
        label = f"{match} ({s.modality} series {tag}, {len(s.frames)} frames)"
        _add(found, BatchInput(f"{rel}/{s.modality or 'series'}-{tag}", source, label))


def _add_objects(found: dict[str, BatchInput], pattern: str, config: BatchConfig) -> None:
    """Inputs from an ``s3://`` glob: each matching object is one input (a raster, or a DICOM file),
    its store named after its key relative to the pattern's fixed prefix (as local globs name
    theirs); a URL ending in ``/`` is a DICOM study prefix, one input per series."""
    from pipeline.sources.remote import glob_s3

    url = pattern.replace("/vsis3/", "s3://", 1)
    if url.endswith("/"):  # a prefix: a DICOM study folder in the bucket
        name = url.rstrip("/").rsplit("/", 1)[-1]
        _add_study(found, url, name)
        return
    base, matches = glob_s3(url)
    if not matches:
        raise ConfigError(f"{pattern}: matches nothing")
    for match in matches:
        rel = match[len(base) :].strip("/") or match.rsplit("/", 1)[-1]
        if any(part in ("..", ".", "") for part in rel.split("/")):
            raise SourceError(f"{match}: cannot derive a store name inside the output root")
        source = SourceConfig(path=match, kind=config.source.kind, bands=config.source.bands)
        _add(found, BatchInput(rel, source, match))


def run_batch(config: BatchConfig, *, progress: bool = True) -> BatchReport:
    started, clock = time.strftime("%Y-%m-%dT%H:%M:%S%z"), time.perf_counter()
    root = _root(config)
    if isinstance(root, Path) and root.exists() and not root.is_dir():
        raise ConfigError(f"{config.output.root}: the output root is a file, not a folder")
    inputs = expand_inputs(config)
    target = target_of(config.runtime.address)
    if target not in ("local", "auto"):
        probe(target)  # an unreachable cluster fails here, before any store or report exists
    if isinstance(root, Path):
        root.mkdir(parents=True, exist_ok=True)
    results: dict[int, InputResult] = {}
    planned: dict[int, tuple[Job, MaskStore, StorePath | None]] = {}
    with contextlib.ExitStack() as leases:  # one writer per store: overlapping batches share the inputs
        for key, item in enumerate(inputs):
            store_path = root / f"{item.name}.zarr"
            result = InputResult(input=item.label, store=f"{item.name}.zarr", status="done")
            results[key] = result
            if item.problem is not None:
                _fail(result, item.problem)
                continue
            if isinstance(root, Path) and not _stays_inside(root, store_path):  # type: ignore[arg-type]
                _fail(
                    result, SourceError(f"{store_path}: leaves output.root {root} through a symbolic link; not written")
                )
                continue
            try:
                leases.enter_context(store_lease(store_path, command=f"raymask batch (input {item.label})"))
            except StoreBusy as exc:
                result.status, result.error = "busy", one_line(exc, 300)
                continue
            try:
                plan = _plan(config, item, store_path, result)
            except RaymaskError as exc:
                _fail(result, exc)
                continue
            if plan is not None:
                planned[key] = plan
        if planned:
            _run(config, planned, results, progress=progress)
        for key, (job, store, final) in planned.items():
            if results[key].status != "failed":
                _finish(job, store, final, results[key])
        if config.output.exports:
            for result in results.values():
                if result.status in ("done", "resumed", "skipped"):
                    _exports(config, root / result.store, result)
    report = BatchReport(str(root), started, time.perf_counter() - clock, [results[k] for k in sorted(results)])
    text = json.dumps(report.to_json(), indent=2)
    if isinstance(root, ObjectPath):
        location.put_object(root / REPORT, text.encode())
    else:
        (root / REPORT).write_text(text)
    return report


def _root(config: BatchConfig) -> StorePath:
    """The output root: an absolute local folder, or an ``s3://`` prefix."""
    root = location.store_path(config.output.root)
    return root.absolute() if isinstance(root, Path) else root


def _plan(
    config: BatchConfig, item: BatchInput, store_path: StorePath, result: InputResult
) -> tuple[Job, MaskStore, StorePath | None] | None:
    """Decide from the store on disk (``plan.resume_action``): skip, resume, start, or build a new
    version beside a complete store whose source or config changed."""
    if isinstance(store_path, ObjectPath):
        finish_replacement(store_path)  # a swap a killed run left half-done is finished first
    job = prepare(config.job(item.source, str(store_path)))
    action, store, done = open_output(job, overwrite=False, batch=True)
    if action == "skip":
        result.status, result.units_skipped = "skipped", int(store.units_done().size)
        result.classes = (store.info.stats or {}).get("classes", {})
        return None
    final = None
    if action == "version":  # built at NAME.next, swapped in when complete
        final = store_path
        job = prepare(config.job(item.source, str(store_path.with_name(store_path.name + ".next"))))
        action, store, done = open_output(job, overwrite=False, batch=True)
        if action in ("skip", "version"):  # a complete leftover of a run stopped before its swap: again
            action, store, done = open_output(job, overwrite=True, batch=True)
    if action == "resume":
        result.status, result.units_skipped = "resumed", done
    return job, store, final


def _run(
    config: BatchConfig, planned: dict[int, tuple[Job, MaskStore, StorePath | None]], results: dict[int, InputResult],
    *, progress: bool,
) -> None:  # fmt: skip
    from pipeline.core.plan import pending_units
    from pipeline.jobs.ingest import ingest_series

    pending = sum(int((~store.units_done()).sum()) for _, store, _ in planned.values())
    engine = choose_engine(config.runtime, pending)
    with ray_session(config.runtime.address, enabled=engine == "ray", progress=progress):
        targets: dict[int, Target] = {}
        units: list[tuple[int, tuple[int, ...]]] = []
        for key, (job, store, _) in planned.items():
            try:
                if job.info.series is not None:
                    ingest_series(store, job.info.series, executor=executor_for(engine, config.runtime), progress=False)
            except Exception as exc:
                _fail(results[key], unwrap(exc))
                continue
            pixel_measure = job.pixel_measure
            targets[key] = Target(job.source, job.grid, job.config.tiling.edge, str(store.path), pixel_measure,
                                  len(job.model.classes))  # fmt: skip
            todo = pending_units(job.grid, store.units_done())
            results[key].units_run = len(todo)
            units.extend((key, u.index) for u in todo)
        if units:
            rows = stream(
                targets, units, model=config.model, runtime=config.runtime, engine=engine, isolate=True,
                progress=progress,
            )  # fmt: skip
            for row in rows:
                error = str(row["error"])
                result = results[int(row["key"])]
                if error and result.status != "failed":
                    message, _, trace = error.partition("\n")
                    result.status, result.error, result.traceback = "failed", message, trace
        for key, (job, store, _) in planned.items():
            if results[key].status == "failed" or not regions_pending(job, store):
                continue
            try:
                label_regions(job, store, engine=engine, progress=False)
            except Exception as exc:
                _fail(results[key], exc)


def _finish(job: Job, store: MaskStore, final: StorePath | None, result: InputResult) -> None:
    result.classes = finalize(job, store)
    if isinstance(final, ObjectPath) and isinstance(store.path, ObjectPath):
        replace_version(store.path, final)  # copied over the old one: object storage has no rename
    elif isinstance(final, Path) and isinstance(store.path, Path):  # two renames; the old one was readable until now
        retired = final.with_name(final.name + f".old-{os.getpid()}")
        swap_in(store.path, final, retired)
        shutil.rmtree(retired)


def _exports(config: BatchConfig, store_path: StorePath, result: InputResult) -> None:
    """Write the configured exports of a complete store beside it: all of them for a store this run
    made, only the missing ones for a skipped store. A failed export fails the input (the store stays
    complete; the next run retries the export). Beside a store on object storage, each export is
    written to a temporary folder and uploaded (with its sidecar files) once whole."""
    from pipeline.query.formats import export_path, unfit, write_export

    store = MaskStore.open(store_path)
    for name in config.output.exports:
        reason = unfit(store, name)
        if reason:
            result.exports[name] = f"not written: {reason}"
            continue
        local = export_path(Path(store_path.name), name)
        relative = str(Path(result.store).with_name(local.name))
        there = (
            location.key_exists(store_path.parent, local.name)
            if isinstance(store_path, ObjectPath)
            else export_path(store_path, name).exists()
        )
        if result.status == "skipped" and there:
            result.exports[name] = relative
            continue
        try:
            if isinstance(store_path, ObjectPath):
                with tempfile.TemporaryDirectory(prefix="raymask-export-") as tmp:
                    written = Path(tmp) / local.name
                    write_export(store, name, written, address=config.runtime.address)
                    for file in sorted(Path(tmp).iterdir()):  # the export, then e.g. its .aux.xml
                        location.put_object(store_path.parent / file.name, file.read_bytes())
            else:
                write_export(store, name, export_path(store_path, name), address=config.runtime.address)
        except Exception as exc:
            _fail(result, exc)
            result.error = f"export {name}: {result.error}"
            return
        result.exports[name] = relative


def _fail(result: InputResult, exc: BaseException) -> None:
    result.status = "failed"
    result.error = one_line(exc)
    result.traceback = "".join(traceback.format_exception(exc))


def _add(found: dict[str, BatchInput], item: BatchInput) -> None:
    if item.name in found:
        raise ConfigError(
            f"{item.label}: would share the store name {item.name}.zarr with {found[item.name].label}; "
            "rename one or split the batch"
        )
    found[item.name] = item


def _has_glob(pattern: str) -> bool:
    return any(c in pattern for c in _GLOB_CHARS)


def _fixed_part(pattern: str) -> Path:
    """The folder that store names are relative to: the pattern's parts before the first glob."""
    parts = Path(pattern).parts
    fixed = []
    for part in parts:
        if _has_glob(part):
            break
        fixed.append(part)
    base = Path(*fixed) if fixed else Path(".")
    return base if _has_glob(pattern) else base.parent  # a plain path is named after itself


def _stays_inside(root: Path, store: Path) -> bool:
    """Whether ``store`` (and every folder on the way to it) resolves inside ``root``: names never
    hold ``..`` (_relative_name), but a symbolic link already under the root could point anywhere."""
    try:
        store.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def _relative_name(match: Path, base: Path) -> str:
    try:
        rel = match.absolute().relative_to(base.absolute())
    except ValueError:
        rel = Path(match.name)
    name = rel.as_posix().strip("/")
    if not name or name == "." or any(part in ("..", "") for part in name.split("/")):
        raise SourceError(f"{match}: cannot derive a store name inside the output root")
    return name

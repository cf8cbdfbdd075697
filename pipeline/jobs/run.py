"""Run a job: check everything on the driver, then run its work units on workers (pipeline.jobs.stream).

The driver opens the input and the model's description, creates or resumes the store, and hands
unit indices to workers: Ray actors, or this process for small jobs (``runtime.engine``). Workers
read, predict and write each unit straight into the store and report one small row per unit, so
pixels never pass through the driver. Then regions are labelled (one task per chunk) and the
statistics summed from the store before it is marked complete.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import __version__
from pipeline.config import (
    HuTissueModelConfig,
    JobConfig,
    NetworkModelConfig,
    RegionsConfig,
    RuntimeConfig,
    card_beside,
)
from pipeline.core.blend import BlendGrid
from pipeline.core.geometry import TileGrid, WorkUnit
from pipeline.core.georef import pixel_measure
from pipeline.core.plan import Target, pending_units, pick_engine, resume_action
from pipeline.core.stats import PixelMeasure, class_table
from pipeline.errors import ConfigError, ModelError, SourceError, StoreError, StoreExists, one_line
from pipeline.jobs.cluster import ray_session, unwrap
from pipeline.jobs.executors import Executor, RayExecutor, SerialExecutor
from pipeline.jobs.ingest import ingest_series
from pipeline.jobs.regions import RegionSpec, label_store, resolve
from pipeline.jobs.stream import StreamClock, stream
from pipeline.sources.inputs import InputInfo, Source, open_input
from pipeline.store import MaskStore, StoreLayout, location
from pipeline.store.lease import store_lease
from pipeline.store.outputs import check_writable_folder, guard_output
from workers.models.registry import ModelSpec, describe


@dataclass(frozen=True)
class Job:
    """A validated job: the config plus what was learnt by opening the input and the model."""

    config: JobConfig
    source: Source
    info: InputInfo
    model: ModelSpec
    grid: TileGrid
    fingerprint: str
    store_path: Any  # a Path, or an ObjectPath for an s3:// store
    pixel_measure: PixelMeasure  # what one pixel measures (m² per row, mm², mm³), or None
    regions: RegionSpec | None = None  # None: regions.enabled is false
    blend: BlendGrid | None = None  # tiling.stitch blend: the sliding-window grid over the image

    @property
    def stitch(self) -> str:
        return "exact" if self.blend is None else "blend"

    @property
    def context_halo(self) -> int:
        """The smallest halo along the axes where the model sees context (z only for 3-D models)."""
        axes = self.grid.halo if self.model.dims == 3 else self.grid.halo[-2:]
        return min(axes)

    @property
    def exact(self) -> bool:
        return self.blend is None and self.model.exact_with(self.context_halo)

    @property
    def equals(self) -> str:
        """What the output equals, in words (the summary's and the store's claim)."""
        if self.blend is not None:
            b = self.blend
            weights = f"gaussian σ = {b.sigma:g} × window" if b.weights == "gaussian" else "constant"
            return (
                f"sliding-window inference (window {' × '.join(map(str, b.window))}, overlap {b.overlap[-1]:g}, "
                f"{weights}; MONAI's sliding_window_inference), not whole-image inference"
            )
        if self.exact and self.model.pixelwise:
            return "whole-image inference (a per-pixel model: identical labels)"
        if self.exact:
            return "whole-image inference (labels identical except at float near-ties; logits within 1e-4)"
        return "nothing claimed: tiles may differ from whole-image inference near their edges"


@dataclass
class RunSummary:
    store: str
    status: str
    units_total: int
    units_run: int
    units_skipped: int
    chunks: int
    seconds: float
    exact: bool
    classes: dict[str, dict[str, Any]]
    measure: str | None
    stitch: str = "exact"  # exact (each chunk from one window) or blend (sliding-window inference)
    equals: str = ""  # what the output equals, in words
    near_ties: int | None = None  # pixels whose top two logits are within 2e-4 (None: no logits)
    windows: dict[str, Any] = field(default_factory=dict)  # blend: windows in the grid, computed, extra compute
    preview: str | None = None
    notes: list[str] = field(default_factory=list)
    engine: str = "process"  # where the units ran: "process" (this one) or "ray"
    cluster: str = "this process (no Ray)"  # which Ray, in words: started here, joined at an address, ...
    timings: Timings = field(default_factory=lambda: Timings())
    workers: dict[str, Any] = field(default_factory=dict)  # actors, cpus, gpus and threads each, processes started

    @property
    def units_per_s(self) -> float:
        """The steady rate: units over the time spent computing them (start-ups excluded)."""
        return self.units_run / self.timings.compute_s if self.timings.compute_s > 0 else 0.0


@dataclass
class Timings:
    """Where a run's wall time went, in seconds; ``total_s`` is the whole command after parsing."""

    startup_s: float = 0.0  # connecting to Ray or starting a local one (0 in process)
    workers_s: float = 0.0  # starting workers and loading the model
    compute_s: float = 0.0  # reading, predicting and writing the units
    regions_s: float = 0.0  # labelling connected regions
    total_s: float = 0.0


def prepare(config: JobConfig) -> Job:
    """Open the input and describe the model: every input error surfaces here, before Ray starts."""
    store_path = location.store_path(config.output.path).absolute()  # absolute: Ray workers have their own cwd
    opened = open_input(config.source, store_path=store_path)
    info = opened.info
    declared = math.prod(info.shape)
    if declared > config.runtime.max_pixels:
        size = " × ".join(str(n) for n in info.shape)
        raise SourceError(
            f"{_shown(config.source.path)}: declares {size} = {declared:.3g} pixels, over runtime.max_pixels "
            f"({config.runtime.max_pixels:.3g}); raise it if the image is meant to be that large"
        )
    hu_defaults = isinstance(config.model, HuTissueModelConfig) and "upper" not in config.model.model_fields_set
    if hu_defaults and info.modality not in (None, "CT"):  # own thresholds (model.upper) suit any modality
        raise SourceError(
            f"{_shown(config.source.path)}: modality {info.modality}, but model.kind hu-tissue thresholds CT values "
            "in Hounsfield units; set model.upper (and classes) to threshold other values"
        )
    model = describe(config.model, info.bands)
    if _card_doubt(config) is not None:  # the card beside the weights knows better than the config
        model = dataclasses.replace(model, receptive_radius=None)
    ndim = len(info.shape)
    chunk, halo = config.tiling.per_axis(ndim)
    stride = (model.stride,) * ndim
    if ndim == 3 and model.dims != 3:
        # Per-pixel and 2-D models run slice by slice: no context or stride along z.
        stride, halo = (1, *stride[1:]), (0, *halo[1:])
    if model.pixelwise:
        halo = (0,) * ndim  # a per-pixel model needs no context
    for axis in range(ndim):
        if chunk[axis] % stride[axis]:
            raise ConfigError(
                f"tiling.chunk {list(chunk)}: axis {axis} is not a multiple of the model stride {stride[axis]}"
            )
    blend = _blend_grid(config, info.shape, chunk, model)
    per_unit = (config.tiling.chunks_per_unit,) * ndim
    if blend is not None:
        halo = (0,) * ndim  # each unit reads the windows over its core instead
        per_unit = blend_units(
            info.shape, chunk, config.tiling.chunks_per_unit, "chunks_per_unit" in config.tiling.model_fields_set
        )
    grid = TileGrid.create(info.shape, chunk=chunk, halo=halo, stride=stride, chunks_per_unit=per_unit)
    if model.fixed_window is not None:
        _check_fixed_window(config, model.fixed_window, grid, blend)
    if config.output.probabilities and not isinstance(config.model, NetworkModelConfig):
        raise ConfigError(
            f"output.probabilities: model.kind {config.model.kind} gives labels, not logits; "
            "probabilities come from network models"
        )
    regions = None
    if config.regions.enabled:
        regions = resolve(config.regions, ndim, [n for n, _ in model.classes])
    voxel = info.volume.voxel_volume_mm3 if info.volume is not None else None
    try:
        per_pixel = pixel_measure(info.georef, info.shape[0], voxel_mm3=voxel, pixel_area_mm2=info.pixel_area_mm2)
    except ValueError as exc:  # a grid whose pixel areas cannot be computed: before any store exists
        raise SourceError(f"{_shown(config.source.path)}: {exc}") from exc
    return Job(config, opened.source, info, model, grid, opened.fingerprint, store_path, per_pixel, regions, blend)


BLEND_STRIP = 4096  # px: the default width of a blended unit's strip (windows along its sides are computed twice)


def blend_units(shape: tuple[int, ...], chunk: tuple[int, ...], per_unit: int, stated: bool) -> tuple[int, ...]:
    """Chunks per blended unit along each axis: the whole first axis (a unit walks it band by band),
    ``chunks_per_unit`` across it, or by default strips up to 4096 px wide but at least two of them
    where the image is wider than a chunk (two actors have work)."""
    along = -(-shape[0] // chunk[0])
    if not stated:
        widths = [min(BLEND_STRIP, max(c, -(-s // 2))) for s, c in zip(shape[1:], chunk[1:])]
        return (along, *(max(1, -(-w // c)) for w, c in zip(widths, chunk[1:])))
    return (along, *(per_unit,) * (len(shape) - 1))


def stitch_of(config: JobConfig) -> str:
    """``tiling.stitch`` as the job means it: as stated, else the model card's, else exact."""
    if config.tiling.stitch is not None:
        return config.tiling.stitch
    if isinstance(config.model, NetworkModelConfig):
        found = card_beside(config.model)
        if found is not None and found[0].stitch is not None:
            return found[0].stitch
    return "exact"


def _blend_grid(
    config: JobConfig, shape: tuple[int, ...], chunk: tuple[int, ...], model: ModelSpec
) -> BlendGrid | None:
    """The sliding-window grid of ``tiling.stitch: blend`` (checked against the network), or None."""
    if stitch_of(config) != "blend":
        return None
    if not isinstance(config.model, NetworkModelConfig):
        raise ConfigError(
            f"tiling.stitch blend: model.kind {config.model.kind} works pixel by pixel and tiles exactly; "
            "blending is for networks"
        )
    window = config.tiling.blend_window(len(shape), chunk, config.model.dims)
    strided = window if config.model.dims == 3 else window[-2:]
    if any(w % model.stride for w in strided):
        raise ConfigError(f"tiling.window {list(window)} must be a multiple of the model stride ({model.stride})")
    overlap = tuple(0.0 if w == 1 else config.tiling.overlap for w in window)
    return BlendGrid(shape, window, overlap, weights=config.tiling.weights, sigma=config.tiling.sigma)


def _card_doubt(config: JobConfig) -> str | None:
    """Why the network's model card forbids an exactness claim (pipeline.card.card_doubt), or None."""
    from pipeline.card import card_doubt

    if not isinstance(config.model, NetworkModelConfig):
        return None
    found = card_beside(config.model)
    return card_doubt(found[0], config.model.receptive_radius) if found else None


def _check_fixed_window(config: JobConfig, fixed: tuple[int, ...], grid: TileGrid, blend: BlendGrid | None) -> None:
    """A network exported with a fixed input size takes only windows of that size (before any store exists)."""
    if blend is not None:
        shapes = [blend.window[-len(fixed) :]]
    else:
        shapes = sorted({u.read.shape[-len(fixed) :] for u in grid.units()}, reverse=True)
    if shapes != [fixed]:
        shown = ", ".join(" × ".join(map(str, s)) for s in shapes[:4]) + (", ..." if len(shapes) > 4 else "")
        raise ModelError(
            f"{getattr(config.model, 'path', 'model')}: the graph takes a fixed {' × '.join(map(str, fixed))} input, "
            f"but this job's windows are {shown} (units plus halo, smaller at the image edges); "
            "export it with dynamic spatial axes"
        )


def _shown(path: str | list[str]) -> str:
    return path if isinstance(path, str) else f"{path[0]} (and {len(path) - 1} more)"


def job_inputs(job: Job) -> list[str]:
    """Every path the job reads: the source as configured (a file, band files or a DICOM folder),
    the files behind it, and the model file; no output may be one of them or lie inside them."""
    configured = job.config.source.path
    paths = [configured] if isinstance(configured, str) else list(configured)
    paths += list(job.source.paths) if job.info.series is None else list(job.info.series.paths)
    model_path = getattr(job.config.model, "path", None)
    if isinstance(model_path, str):
        paths.append(model_path)
    return [p for p in dict.fromkeys(paths) if "://" not in p and not p.startswith("/vsi")]


def decide_output(job: Job, *, overwrite: bool, batch: bool = False) -> tuple[str, MaskStore | None]:
    """What a run will do at the job's output path (``plan.resume_action``) and the store found
    there, decided without changing anything; refused (one line) when it may not go ahead.

    Whatever is there is opened first, so a folder that is not a raymask store is refused, never removed.
    """
    given, path = job.config.output.path, job.store_path
    if not isinstance(path, location.ObjectPath):
        guard_output(path, inputs=job_inputs(job), overwrite=overwrite, kind="store")
    existing = MaskStore.open(path) if _store_there(path) else None
    status = existing.status if existing is not None else None
    same = existing is not None and same_job(existing, job)
    action = resume_action(status, same, overwrite=overwrite, batch=batch)
    if action == "exists":
        raise StoreExists(f"{given}: a complete store is already there; pass --overwrite to replace it")
    if action == "conflict":
        raise StoreError(
            f"{given}: an incomplete store of a different job (config, model or source changed); "
            "pass --overwrite to start again"
        )
    return action, existing


def _store_there(path: Any) -> bool:
    """Whether something is at the output path for ``MaskStore.open`` to judge. On object storage a
    prefix without root metadata is nothing when an interrupted creation left it (its marker is
    there: the next creation clears it) and is refused when anything else is there."""
    if not isinstance(path, location.ObjectPath):
        return bool(path.exists())
    if location.key_exists(path, "zarr.json"):
        return True
    location.refuse_foreign(path)
    return False


def open_output(job: Job, *, overwrite: bool, batch: bool = False) -> tuple[str, MaskStore, int]:
    """Act on what is at the job's output path: returns the action, the store (for ``skip`` and
    ``version``: the complete one found, read-only) and the units done."""
    action, existing = decide_output(job, overwrite=overwrite, batch=batch)
    return (action, *apply_output(job, action, existing))


def apply_output(job: Job, action: str, existing: MaskStore | None) -> tuple[MaskStore, int]:
    """Carry out ``decide_output``'s action: the store to write (or the complete one found) and its units done."""
    path = job.store_path
    if existing is not None and action in ("skip", "version"):
        return existing, int(existing.units_done().sum())
    if action == "resume":
        store = MaskStore.open(path, mode="r+")
        return store, int(store.units_done().sum())
    if action == "replace":
        MaskStore.remove(path)
    return create_store(job), 0


def create_store(job: Job) -> MaskStore:
    """A new, empty store for ``job`` at its output path (``decide_output`` checked the folder)."""
    layout = StoreLayout(
        grid=job.grid,
        classes=job.model.classes,
        georef=job.info.georef,
        provenance=_provenance(job),
        volume=job.info.volume,
        pixel_area_mm2=job.info.pixel_area_mm2,
        probabilities=job.config.output.probabilities,
        codes=dict(job.model.codes),
    )
    return MaskStore.create(job.store_path, layout)


def finalize(job: Job, store: MaskStore) -> dict[str, dict[str, Any]]:
    """Write the levels, sum the per-unit statistics the store holds, write them, mark the store complete."""
    if job.config.output.levels:
        from pipeline.store.levels import write_levels

        write_levels(store)
    unit = store.info.measure_unit
    table = class_table(store.totals(), [n for n, _ in job.model.classes], unit)
    if job.regions is not None:
        with_region_counts(table, (store.regions_info or {}).get("per_class", {}))
    statistics: dict[str, Any] = {"classes": table, "measure": unit}
    ties = store.near_ties()
    if ties is not None:
        statistics["near_ties"] = ties
    store.mark_complete(statistics)
    return table


def with_region_counts(table: dict[str, dict[str, Any]], per_class: dict[str, int]) -> None:
    """Put each labelled class's region count into its class-table row (and take stale ones out)."""
    for name, row in table.items():
        row.pop("regions", None)
        if name in per_class:
            row["regions"] = per_class[name]


def regions_pending(job: Job, store: MaskStore) -> bool:
    """Whether ``job`` still has to label ``store``'s regions (a resumed job may have done it)."""
    if job.regions is None:
        return False
    info = store.regions_info
    if info is None or info.get("connectivity") != job.regions.connectivity:
        return True
    names = [n for n, _ in job.model.classes]
    if info.get("classes") != [names[i] for i in job.regions.classes]:
        return True
    try:
        store.regions()
    except StoreError:
        return True
    return False


def label_regions(job: Job, store: MaskStore, *, engine: str = "ray", progress: bool) -> None:
    """Connected regions of the finished mask, one task per chunk (see pipeline.jobs.regions)."""
    assert job.regions is not None
    try:
        label_store(
            store,
            job.regions,
            source=job.source,
            executor=executor_for(engine, job.config.runtime),
            progress=progress,
            modality=job.info.modality,
        )
    except Exception as exc:
        raise unwrap(exc) from exc


def label_existing(
    path: str | Path, config: RegionsConfig, *, address: str | None = None, progress: bool = True
) -> tuple[dict[str, Any], list[str]]:
    """Label (or relabel) the regions of a store whose mask is written; returns (summary, notes).

    The old regions, if any, stay in place until the new ones are complete. Mean intensities
    need the source: a volume's own image array, or the job's raster if it is still there and
    unchanged (its fingerprint is checked); otherwise the table has no intensity columns.
    """
    store = MaskStore.open(path, mode="r+")
    missing = int((~store.units_done()).sum())
    if missing:
        raise StoreError(f"{path}: {missing} work units are not written yet; finish the job first (raymask run CONFIG)")
    names = store.info.class_names
    spec = resolve(config, store.mask.ndim, names)
    source, notes = _stored_source(store)
    modality = store.info.source.modality if store.info.source else None
    runtime = RuntimeConfig(address=address)
    n_chunks = math.prod(-(-size // chunk) for size, chunk in zip(store.mask.shape, store.mask.chunks, strict=True))
    engine = choose_engine(runtime, n_chunks)  # a handful of chunks is labelled here, as small jobs run
    try:
        lease = store_lease(location.store_path(path), command="raymask regions --compute")
        with lease, ray_session(address, enabled=engine == "ray"):
            summary = label_store(
                store, spec, source=source, executor=executor_for(engine, runtime), progress=progress,
                modality=modality,
            )  # fmt: skip
    except Exception as exc:
        raise unwrap(exc) from exc
    stats = store.meta.get("stats")
    if stats:  # keep the per-class region counts in the statistics in step with the new table
        with_region_counts(stats.get("classes", {}), summary["per_class"])
        store.update_meta(stats=stats)
    return summary, notes


def _stored_source(store: MaskStore) -> tuple[Source | None, list[str]]:
    from pipeline.sources.store_array import StoreArraySource

    image = store.info.arrays.image
    if image:
        return StoreArraySource(store=str(store.path.absolute()), array=image), []
    job = store.info.job or {}
    paths = store.info.source.paths if store.info.source else []
    try:
        config = JobConfig.model_validate(job)
        if paths:  # the paths as the job resolved them: the config's may be relative to its cwd
            config = config.model_copy(
                update={"source": config.source.model_copy(update={"path": paths if len(paths) > 1 else paths[0]})}
            )
        opened = open_input(config.source, store_path=store.path.absolute())
    except Exception as exc:
        return None, [f"no mean intensities: the source cannot be opened ({one_line(exc, 120)})"]
    if store.info.source is None or opened.fingerprint != store.info.source.fingerprint:
        return None, ["no mean intensities: the source changed since the store was written"]
    return opened.source, []


def same_job(store: MaskStore, job: Job) -> bool:
    """Whether ``store`` was made by this job: same config, model and source content."""
    return store.info.identity == _identity(job)


def choose_engine(runtime: RuntimeConfig, n_units: int) -> str:
    """``process`` or ``ray`` for a job of ``n_units`` units here and now (see plan.pick_engine)."""
    import ray

    return pick_engine(
        runtime, n_units, ray_running=ray.is_initialized(), ray_address=os.environ.get("RAY_ADDRESS") or None
    )


def run_job(config: JobConfig, *, overwrite: bool = False, progress: bool = True, wait: bool = False) -> RunSummary:
    """Run a job to a complete store; one writer at a time (``store_lease``: ``wait`` for a busy store)."""
    started = time.perf_counter()
    job = prepare(config)
    if isinstance(job.store_path, location.ObjectPath):
        location.exists(job.store_path)  # the bucket answers (one line naming the store if not)
    else:
        check_writable_folder(job.store_path)  # the lease lives beside the store
    with store_lease(job.store_path, command=f"raymask run (output {config.output.path})", wait=wait):
        return _run_leased(job, started, overwrite=overwrite, progress=progress)


def _run_leased(job: Job, started: float, *, overwrite: bool, progress: bool) -> RunSummary:
    config = job.config
    action, existing = decide_output(job, overwrite=overwrite)
    done = existing.units_done() if action == "resume" and existing is not None else None
    engine = choose_engine(config.runtime, job.grid.n_units - (int(done.sum()) if done is not None else 0))
    timings = Timings()
    clock = StreamClock()
    mark = time.perf_counter()
    # The cluster first: a run that cannot reach its cluster leaves what is at the output path as it was.
    with ray_session(config.runtime.address, enabled=engine == "ray", progress=progress) as cluster:
        timings.startup_s = time.perf_counter() - mark
        store, skipped = apply_output(job, action, existing)
        todo = pending_units(job.grid, store.units_done())
        per_pixel = job.pixel_measure
        need_regions = regions_pending(job, store)
        if todo:
            _predict(job, store, todo, per_pixel, engine=engine, clock=clock, progress=progress)
        if need_regions:
            mark = time.perf_counter()
            label_regions(job, store, engine=engine, progress=progress)
            timings.regions_s = time.perf_counter() - mark
    timings.workers_s, timings.compute_s = clock.workers_s, clock.compute_s
    table = finalize(job, store)
    unit = store.info.measure_unit
    summary = RunSummary(
        store=config.output.path,
        status=store.status,
        units_total=job.grid.n_units,
        units_run=len(todo),
        units_skipped=skipped,
        chunks=int(np.prod(job.grid.grid_shape)),
        seconds=0.0,
        exact=job.exact,
        classes=table,
        measure=unit,
        stitch=job.stitch,
        equals=job.equals,
        near_ties=(store.info.stats or {}).get("near_ties"),  # as finalize summed it
        windows=_window_counts(job, todo),
        engine=engine,
        cluster=cluster,
        timings=timings,
    )
    if clock.placement is not None:
        p = clock.placement
        summary.workers = {"actors": p.actors, "cpus": p.cpus, "gpus": p.gpus, "threads": p.threads,
                           "replaced": clock.replaced, "grown": clock.grown, "lost": clock.lost}  # fmt: skip
    summary.notes.extend(job.info.notes)
    if unit is None and job.info.modality is None:
        summary.notes.append("the source has no CRS: statistics are in pixels only")
    if job.model.mixed_precision:
        summary.notes.append(
            f"mixed precision ({config.model.precision}): tiled output is not guaranteed to equal whole-image inference"  # type: ignore[union-attr]
        )
    elif job.blend is not None:
        pass  # blending claims what it equals (summary.equals), never exactness
    elif (doubt := _card_doubt(config)) is not None:
        summary.notes.append(f"tiling not claimed exact: {doubt}")
    elif not job.exact:
        summary.notes.append(
            f"tiling is not exact: halo {job.context_halo} < receptive radius {job.model.receptive_radius}"
            if job.model.receptive_radius is not None
            else "tiling exactness unknown: the model declares no receptive_radius"
        )
    if clock.lost:
        summary.notes.append(
            f"{clock.lost} worker(s) died ({clock.replaced} replaced; the others left with their nodes); "
            "their unfinished units were recomputed"
        )
    if clock.grown:
        summary.notes.append(f"{clock.grown} worker(s) added while running, on room that appeared in the cluster")
    if config.output.preview:
        from pipeline.jobs.preview import write_preview

        summary.preview = str(write_preview(store, job.source))
    timings.total_s = summary.seconds = time.perf_counter() - started
    return summary


def _predict(
    job: Job, store: MaskStore, todo: list[WorkUnit], per_pixel: PixelMeasure, *, engine: str, clock: StreamClock,
    progress: bool,
) -> None:  # fmt: skip
    if job.info.series is not None:
        try:
            ingest_series(store, job.info.series, executor=executor_for(engine, job.config.runtime), progress=progress)
        except Exception as exc:
            raise unwrap(exc) from exc
    target = Target(
        job.source, job.grid, job.config.tiling.edge, str(store.path), per_pixel, len(job.model.classes),
        blend=job.blend, probabilities=job.config.output.probabilities,
    )  # fmt: skip
    rows = stream(
        {0: target},
        [(0, u.index) for u in todo],
        model=job.config.model,
        runtime=job.config.runtime,
        engine=engine,
        progress=progress,
        clock=clock,
    )
    try:
        for _ in rows:
            pass
    except Exception as exc:  # a worker that could not start (its model failed to load) fails through Ray
        raise unwrap(exc) from exc


def _window_counts(job: Job, todo: list[WorkUnit]) -> dict[str, Any]:
    """Blending: windows in the sliding-window grid, windows the units computed (those shared by
    units are computed by each), and the extra compute that costs over one whole-image pass."""
    if job.blend is None:
        return {}
    grid = job.blend.n_windows
    every = job.blend.windows_computed([u.core for u in job.grid.units()])
    run = job.blend.windows_computed([u.core for u in todo])
    return {"grid": grid, "computed": run, "extra": round(every / grid - 1, 4)}


def executor_for(engine: str, runtime: RuntimeConfig) -> Executor:
    """Where per-chunk tasks (DICOM ingest, region labelling) run: Ray tasks (a handful of them in
    this process, as for small jobs), or this process."""
    return RayExecutor(serial_up_to=runtime.small_job_units) if engine == "ray" else SerialExecutor()


def _identity(job: Job) -> dict[str, str]:
    return {"job": job.config.identity(), "model": job.model.identity, "source": job.fingerprint}


def _provenance(job: Job) -> dict[str, Any]:
    return {
        "raymask_version": __version__,
        "identity": _identity(job),
        "job": job.config.model_dump(mode="json"),
        "model": {
            "kind": job.model.kind,
            "identity": job.model.identity,
            "stride": job.model.stride,
            "receptive_radius": job.model.receptive_radius,
            "exact_tiling": job.exact,
            "stitch": job.stitch,
            "equals": job.equals,
        },
        "source": {
            "paths": list(job.source.paths) if job.info.series is None else job.info.series.paths,
            "bands": list(job.source.bands),
            "series": job.info.series.key if job.info.series else None,
            "modality": job.info.modality,
            "dtypes": list(job.info.dtypes),
            "fingerprint": job.fingerprint,
        },
        "grid": {
            "chunk": list(job.grid.chunk),
            "halo": list(job.grid.halo),
            "stride": list(job.grid.stride),
            "chunks_per_unit": list(job.grid.chunks_per_unit),
            "edge": job.config.tiling.edge,
            **(
                {
                    "window": list(job.blend.window),
                    "overlap": list(job.blend.overlap),
                    "weights": job.blend.weights,
                    "sigma": job.blend.sigma,
                }
                if job.blend is not None
                else {}
            ),
        },
    }

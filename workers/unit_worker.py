"""The worker: read -> predict -> write for a list of work units, pipelined inside one process.

One ``UnitWorker`` holds one model (loaded once) and two small thread pools. For each list of
units it is given, it reads windows ahead in the reader threads (GDAL and zarr release the GIL
while they decode), stacks equal-shape windows into model calls, keeps up to two calls in flight
(on a GPU the next batch is copied while the last one computes), and hands each unit's labels to
the writer threads, which crop the core, mark nodata, write the unit's chunks and its statistics
row straight into the store. Per unit, only ``{key, unit, error}`` leaves the worker: pixels
never travel between processes, and no scheduler sees a task per tile.

The same class runs as a Ray actor (``pipeline.jobs.stream``) or in the driver's own process for small
jobs; the bytes written are the same either way.
"""

from __future__ import annotations

import sys
import threading
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from pipeline.config import ModelConfig
from pipeline.core.blend import BlendGrid, blend_bands
from pipeline.core.geometry import Box, WorkUnit, inside_image, pad_to_window
from pipeline.core.plan import Item, Target, group_batches
from pipeline.core.stats import NODATA, ChunkStats, merge
from pipeline.errors import ModelError, RaymaskError, StoreError, describe, os_error_line
from pipeline.sources.geotiff import WORKER_QUIET
from pipeline.store import MaskStore
from workers.models.prediction import Prediction, finish
from workers.models.registry import Segmenter, build

T = TypeVar("T")
Row = dict[str, Any]  # {"key": int, "unit": tuple, "error": str, "error_type": str}


@dataclass
class _Window:
    """One unit on its way through the worker. ``frame`` is the box (image pixels) that ``image``,
    ``valid`` and the unit's prediction cover: its read window (a blended unit reads row by row in
    ``_blend``, and its frame is just its core)."""

    item: Item
    unit: WorkUnit
    frame: Box
    image: np.ndarray | None = None
    valid: np.ndarray | None = None
    error: BaseException | None = None


@dataclass(frozen=True)
class Written:
    """What a blended unit's chunks (or one band of them) added up to, once written: its statistics row."""

    stats: ChunkStats
    near_ties: int


class UnitWorker:
    def __init__(
        self,
        targets: dict[int, Target],
        model: ModelConfig,
        *,
        threads: int = 1,
        device: str = "cpu",
        batch_size: int = 4,
        prefetch: int = 2,
        io_threads: int = 1,
        in_flight: int = 2,
        actor: bool = False,
    ) -> None:
        if actor:  # a Ray actor: its own process, whose warning filters are its own
            quiet_worker_warnings()
        self.targets = targets
        self.batch_size = batch_size
        self.prefetch = prefetch
        self.in_flight = in_flight
        # An actor whose constructor raises dies, and Ray prints its traceback on the driver's
        # console; an actor reports the failure through ready() instead, as one line.
        self.failure: tuple[str, str] | None = None
        try:
            self.model: Segmenter = build(model, device=device, in_flight=in_flight)
        except Exception as exc:
            if not actor:
                raise
            self.failure = (exc.__class__.__name__, describe(exc).partition("\n")[0])
        _limit_threads(threads)
        self.readers: Executor = (
            ThreadPoolExecutor(io_threads, thread_name_prefix="raymask-read") if io_threads else _Inline()
        )
        self.writers: Executor = (
            ThreadPoolExecutor(io_threads, thread_name_prefix="raymask-write") if io_threads else _Inline()
        )
        # Every model call runs in this one thread, whichever lease it comes from: one batch at a
        # time, and the forward pass's large temporaries always come from (and go back to) one
        # malloc arena. From two lease threads each arena kept its own copy: +300 MB an actor.
        self.runner: Executor = ThreadPoolExecutor(1, thread_name_prefix="raymask-model") if io_threads else _Inline()
        self._local = threading.local()
        self._stores: dict[int, MaskStore] = {}
        self._stores_lock = threading.Lock()

    def ready(self) -> tuple[str, str] | None:
        """Returns once the model is loaded: None, or why it could not be (error class, message)."""
        return self.failure

    def process(self, items: Sequence[Item]) -> Iterator[Row]:
        """Compute and write every unit of ``items``; yield one row per unit as it lands.

        A unit whose read, model call or write raises yields a row with the error's description
        (``error``) and class name (``error_type``) and the others go on; the caller decides
        whether that stops the run. Rows come in the order the units finish.
        """
        windows = [self._window(item) for item in items]
        batches = group_batches(windows, self._batch_key, self.batch_size)
        reads: deque[list[Future[_Window]]] = deque()
        launched: deque[tuple[list[_Window], Callable[[], Prediction | Written]]] = deque()
        writes: deque[Future[Row]] = deque()
        upcoming = iter(batches)

        def top_up() -> None:
            while len(reads) < self.prefetch + 1:
                batch = next(upcoming, None)
                if batch is None:
                    return
                reads.append([self.readers.submit(self._read, w) for w in batch])

        top_up()
        while reads or launched:
            if reads:
                batch = [f.result() for f in reads.popleft()]
                top_up()
                good = [w for w in batch if w.error is None]
                writes.extend(self.writers.submit(_error_row, w.item, w.error) for w in batch if w.error is not None)
                if good:
                    launched.append((good, self._launch(good)))
            if launched and (len(launched) >= self.in_flight or not reads):
                done, collect = launched.popleft()
                try:
                    outputs = collect()
                except Exception as exc:
                    for w in done:
                        w.image = w.valid = None
                    writes.extend(self.writers.submit(_error_row, w.item, exc) for w in done)
                else:
                    writes.extend(self.writers.submit(self._write, w, outputs, j) for j, w in enumerate(done))
            while writes and (writes[0].done() or len(writes) > 2 * self.batch_size):
                yield writes.popleft().result()
        while writes:
            yield writes.popleft().result()

    def _window(self, item: Item) -> _Window:
        target = self.targets[item[0]]
        unit = target.grid.unit(item[1])
        return _Window(item, unit, unit.read if target.blend is None else unit.core)

    def _batch_key(self, window: _Window) -> tuple[object, ...]:
        """Units whose windows stack into one model call; a blended unit is a model call of its own
        (its windows are batched inside it)."""
        if self.targets[window.item[0]].blend is not None:
            return ("blend", window.item)
        return (window.item[0], window.frame.shape)

    # -- stages (reader threads, the model thread, writer threads) ----------------------------

    def _read(self, window: _Window) -> _Window:
        target = self.targets[window.item[0]]
        if target.blend is not None:
            return window  # a blended unit reads its rows of windows as it goes (_blend)
        cache = self._local.__dict__.setdefault("datasets", {})
        try:
            data, valid = target.source.read(inside_image(window.frame, target.grid.shape), cache=cache)
            window.image = pad_to_window(data, window.frame, target.grid.shape, edge=target.edge)
            window.valid = pad_to_window(valid, window.frame, target.grid.shape, edge=target.edge)
        except Exception as exc:
            window.error = exc
        return window

    def _launch(self, batch: list[_Window]) -> Callable[[], Prediction | Written]:
        """Queue a model call on the model thread; the result, called, gives the outputs (or raises)."""
        target = self.targets[batch[0].item[0]]
        if target.blend is not None:
            blended = self.runner.submit(self._blend, batch[0])
            return lambda: blended.result()()
        images = [w.image for w in batch if w.image is not None]
        valid = [w.valid for w in batch if w.valid is not None]
        call = self.runner.submit(self._call_model, images, valid, target.probabilities)
        return lambda: call.result()()

    def _call_model(
        self, images: list[np.ndarray], valid: list[np.ndarray], probabilities: bool
    ) -> Callable[[], Prediction]:
        launch = getattr(self.model, "launch", None)
        if launch is not None:
            return launch(images, valid, probabilities=probabilities)  # type: ignore[no-any-return]
        if probabilities:
            raise ModelError("output.probabilities needs a network model: this model gives labels, not logits")
        labels = self.model.predict(np.stack(images), np.stack(valid))
        return lambda: Prediction(labels)

    def _blend(self, window: _Window) -> Callable[[], Written]:
        """A blended unit, on the model thread: its rows of windows read ahead in the reader threads,
        through the network, summed band by band (``blend_bands``); each finished band of chunks goes
        to the writer threads at once, so the unit holds a few bands, never the strip."""
        key = window.item[0]
        target = self.targets[key]
        grid, unit = target.blend, window.unit
        assert grid is not None
        forward = getattr(self.model, "forward", None)
        if forward is None:
            raise ModelError("tiling.stitch blend needs a network model (it sums logits)")
        import torch

        weights = self._weights(grid)
        rows = grid.window_rows(unit.core)
        reads: deque[Future[tuple[np.ndarray, np.ndarray]]] = deque()
        upcoming = iter(rows)

        def read_ahead() -> None:
            while len(reads) < self.prefetch + 1:
                row = next(upcoming, None)
                if row is None:
                    return
                reads.append(self.readers.submit(self._read_box, target, grid.to_image(row[0])))

        def row_data() -> Iterator[tuple[Box, list[Box], np.ndarray, np.ndarray]]:
            read_ahead()
            for box, wins in rows:
                image, valid = reads.popleft().result()
                read_ahead()
                yield box, wins, image, valid

        writes: list[Future[Written]] = []
        bands = blend_bands(
            row_data(), forward, grid, unit.core, target.grid.chunk[0],
            zeros=lambda shape: torch.zeros(shape, dtype=torch.float32, device=weights.device),
            weights=weights, n_classes=target.n_classes, batch_size=self.batch_size,
        )  # fmt: skip
        for band, logits, valid in bands:
            outputs = finish(logits.unsqueeze(0), probabilities=target.probabilities)()
            del logits
            writes.append(self.writers.submit(self._write_band, key, unit, grid.to_image(band), outputs, valid))
        parts = [f.result() for f in writes]
        total = Written(merge((p.stats for p in parts), target.n_classes), sum(p.near_ties for p in parts))
        return lambda: total

    def _read_box(self, target: Target, box: Box) -> tuple[np.ndarray, np.ndarray]:
        """``box`` of the source (image pixels; outside the image: zeros, invalid), in a reader thread."""
        cache = self._local.__dict__.setdefault("datasets", {})
        return _read_padded(target, box, cache)

    def _write_band(self, key: int, unit: WorkUnit, band: Box, outputs: Prediction, valid: np.ndarray) -> Written:
        """Write the unit's chunks in ``band`` (image pixels; the core's rows there); its statistics."""
        target = self.targets[key]
        inside = band.intersect(unit.core)
        labels, probabilities, ties = _cut(outputs, 0, inside.within(band), valid)
        stats = self._store(key).write_chunks(
            unit, inside, labels, pixel_measure=target.pixel_measure, n_classes=target.n_classes,
            probabilities=probabilities,
        )  # fmt: skip
        return Written(stats, ties or 0)

    def _weights(self, grid: BlendGrid) -> Any:
        """The grid's weight map as a tensor on the model's device, made once per grid."""
        import torch

        cache = self.__dict__.setdefault("_weight_maps", {})
        key = (grid.window, grid.weights, grid.sigma)
        if key not in cache:
            device = getattr(self.model, "device", torch.device("cpu"))
            cache[key] = torch.from_numpy(grid.weight_map).to(device)
        return cache[key]

    def _write(self, window: _Window, outputs: Prediction | Written, j: int) -> Row:
        key, index = window.item
        target = self.targets[key]
        unit = window.unit
        try:
            if isinstance(outputs, Written):  # a blended unit: its chunks are written, its statistics row now
                self._store(key).write_unit_stats(unit, outputs.stats, near_ties=outputs.near_ties)
                return {"key": key, "unit": index, "error": "", "error_type": ""}
            assert window.valid is not None
            labels, probabilities, ties = _cut(outputs, j, unit.core.within(window.frame), window.valid)
            self._store(key).write_unit(
                unit, labels, pixel_measure=target.pixel_measure, n_classes=target.n_classes,
                probabilities=probabilities, near_ties=ties,
            )  # fmt: skip
        except OSError as exc:  # disk full, read-only, permissions: named by the store, with what to do
            if exc.filename is None:
                exc.filename = str(target.store)
            return _error_row(window.item, exc)
        except Exception as exc:
            return _error_row(window.item, exc)
        finally:
            window.image = window.valid = None  # a lease's memory is the windows in flight, not all it read
        return {"key": key, "unit": index, "error": "", "error_type": ""}

    def _store(self, key: int) -> MaskStore:
        with self._stores_lock:
            store = self._stores.get(key)
            if store is None:
                store = self._stores[key] = MaskStore.open(self.targets[key].store, mode="r+")
            return store

    def close(self) -> None:
        self.readers.shutdown(wait=True)
        self.runner.shutdown(wait=True)
        self.writers.shutdown(wait=True)


class _Inline(Executor):
    """Runs each call at once in the calling thread (``io_threads: 0``)."""

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        future: Future[T] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:
            future.set_exception(exc)
        return future


def quiet_worker_warnings() -> None:
    """Ray actors: the warnings raymask handles itself are not printed (they would be forwarded to
    the driver's console once per window)."""
    for category in WORKER_QUIET:
        warnings.filterwarnings("ignore", category=category)


def _error_row(item: Item, exc: BaseException | None) -> Row:
    assert exc is not None
    if isinstance(exc, OSError) and not isinstance(exc, RaymaskError):  # disk full, read-only, ...
        exc = StoreError(os_error_line(exc))
    return {"key": item[0], "unit": item[1], "error": describe(exc), "error_type": exc.__class__.__name__}


def _cut(
    outputs: Prediction, j: int, core: tuple[slice, ...], valid: np.ndarray
) -> tuple[np.ndarray, np.ndarray | None, int | None]:
    """Window ``j``'s outputs cut to ``core`` (slices of the window), invalid pixels set to nodata:
    (labels, probabilities or None, near-ties among the valid pixels, or None without logits)."""
    labels = np.array(outputs.labels[j][core], dtype=np.uint8)
    invalid = ~valid[core]
    labels[invalid] = NODATA
    probabilities = None
    if outputs.probabilities is not None:
        probabilities = np.array(outputs.probabilities[j][(slice(None), *core)])
        probabilities[:, invalid] = NODATA
    ties = int((outputs.ties[j][core] & ~invalid).sum()) if outputs.ties is not None else None
    return labels, probabilities, ties


def _read_padded(target: Target, box: Box, cache: dict[Any, Any]) -> tuple[np.ndarray, np.ndarray]:
    """``box`` of the source (image pixels; it may reach outside the image, where the sliding-window
    grid pads with zeros): values, and validity that is False outside the image."""
    inside = inside_image(box, target.grid.shape)
    data, valid = target.source.read(inside, cache=cache)
    if inside == box:
        return data, valid
    image = np.zeros((data.shape[0], *box.shape), dtype=data.dtype)
    mask = np.zeros(box.shape, dtype=bool)
    cut = inside.within(box)
    image[(slice(None), *cut)] = data
    mask[cut] = valid
    return image, mask


def _limit_threads(threads: int) -> None:
    """Torch's intra-op threads, if this process runs torch (importing it costs seconds otherwise)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(max(1, threads))

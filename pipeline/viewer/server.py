"""``raymask serve PATH``: a read-only web app over a store or a folder of stores.

Pages (HTML and JavaScript shipped in ``pipeline/viewer/static``, Leaflet among them, built from npm
when the package is installed; nothing is fetched at run time) and a JSON API that the pages use and
scripts can too:

- ``GET /api/stores``: every store under the folder (the catalog rows, with region counts)
- ``GET /api/stores/NAME``: one store's record (``raymask info --json``) plus what the pages need
- ``GET /api/stores/NAME/tiles/mask|image/Z/X/Y.png``: map tiles in the store's pixel grid
- ``GET /api/stores/NAME/point?row=R&col=C`` (volumes: ``&slice=S``): the class, the region and its row
- ``GET /api/stores/NAME/regions?sort=COL&desc=1&class=CLASS&limit=N&offset=K``: the region table
- ``GET /api/stores/NAME/slices/axial|coronal|sagittal/I.png?window=bone`` (or ``&centre=&width=``),
  ``.../labels/axial/I.png``: volume planes
- ``GET /api/stores/NAME/thumbnail.png``

NAME is the store's path under the folder (``a/b.tif.zarr``), URL-encoded. Only stores that the
folder's catalog lists are served: a name is looked up, never joined to a path, so ``..``, encoded
separators and symbolic links out of the folder reach nothing. Every failure is a 4xx (or 500) with a
one-line JSON error; the server never writes.
"""

from __future__ import annotations

import functools
import json
import math
import mimetypes
import threading
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.webtiles import TILE, max_zoom, tile_window
from pipeline.errors import QueryError, RaymaskError, StoreError, one_line
from pipeline.store import MaskStore

STATIC = Path(__file__).with_name("static")
PAGES = {"": "catalog.html", "map": "map.html", "volume": "volume.html", "frames": "map.html"}  # frames: a map
# page in pixels (no CRS), its legend counting pixels


class NotFound(Exception):
    pass


class BadRequest(Exception):
    pass


class Library:
    """The stores under the served folder, found by the catalog and opened once each; a store that is
    still being written is opened again on each look, so its progress shows, and so is a complete one
    whose root metadata changed (a batch swapped a new version in)."""

    def __init__(self, root: Path, only: Path | None = None) -> None:
        self.root = root
        self.only = only  # serving one store: only it
        self.lock = threading.Lock()
        self.names: dict[str, Path] = {}
        self.opened: dict[str, tuple[MaskStore, tuple[int, ...]]] = {}

    def scan(self) -> dict[str, Path]:
        from pipeline.store.catalog import find_stores

        if self.only is not None:
            found = {self.only.name: self.only}
        else:
            inside = self.root.resolve()
            found = {
                p.relative_to(self.root).as_posix(): p
                for p in find_stores(self.root)
                if isinstance(p, Path) and p.resolve().is_relative_to(inside)  # a link out of the folder: not served
            }
        with self.lock:
            self.names = found
        return found

    def store(self, name: str) -> MaskStore:
        path = self.names.get(name) or self.scan().get(name)
        if path is None:
            raise NotFound(f"{name}: no such store here")
        stamp = _stamp(path / "zarr.json")
        with self.lock:
            cached, seen = self.opened.get(name, (None, None))
        if cached is not None and cached.info.complete and seen == stamp:
            return cached
        store = MaskStore.open(path)  # new, still being written, or replaced by a new version since
        with self.lock:
            self.opened[name] = (store, stamp)
        return store


def _stamp(path: Path) -> tuple[int, ...]:
    try:
        st = path.stat()
    except OSError:
        return ()
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def kind_of(store: MaskStore) -> str:
    if store.info.volume is not None:
        return "volume"
    return "map" if store.info.crs and store.info.transform else "frames"


def store_record(name: str, store: MaskStore) -> dict[str, Any]:
    from pipeline.jobs.report import store_info

    info = store_info(store)
    meta = store.info
    shape = [int(v) for v in meta.shape]
    record: dict[str, Any] = {"name": name, "kind": kind_of(store), **info}
    regions = store.regions_info
    record["region_count"] = int(regions["count"]) if regions else None
    if meta.volume is None:
        record["tiles"] = {"size": TILE, "max_zoom": max_zoom((shape[-2], shape[-1])), "rows": shape[-2],
                           "cols": shape[-1]}  # fmt: skip
        record["has_image"] = bool(meta.source and meta.source.paths)
    else:
        record["spacing_mm"] = [float(v) for v in meta.volume.spacing_mm]
        record["has_image"] = store.image is not None
    return record


def _int(query: dict[str, list[str]], key: str, default: int | None = None) -> int:
    values = query.get(key)
    if not values:
        if default is None:
            raise BadRequest(f"{key}: required")
        return default
    try:
        return int(values[0])
    except ValueError:
        raise BadRequest(f"{key}={values[0]!r}: not an integer") from None


def _float(query: dict[str, list[str]], key: str) -> float | None:
    values = query.get(key)
    if not values:
        return None
    try:
        value = float(values[0])
    except ValueError:
        raise BadRequest(f"{key}={values[0]!r}: not a number") from None
    if not math.isfinite(value):
        raise BadRequest(f"{key}={values[0]!r}: not a finite number")
    return value


def _hidden(query: dict[str, list[str]]) -> set[int]:
    raw = (query.get("hide") or [""])[0]
    try:
        return {int(v) for v in raw.split(",") if v.strip()}
    except ValueError:
        raise BadRequest(f"hide={raw!r}: class ids separated by commas") from None


class Api:
    """The routes, each ``(store, parts, query) -> (content type, body)``."""

    def __init__(self, library: Library) -> None:
        self.library = library

    def stores(self) -> list[dict[str, Any]]:
        rows = []
        for name in sorted(self.library.scan()):
            try:
                store = self.library.store(name)
            except (StoreError, NotFound) as exc:
                rows.append({"name": name, "error": one_line(exc)})
                continue
            record = store_record(name, store)
            rows.append({k: record[k] for k in record if k not in ("tiles",)})
        return rows

    def handle(self, path: str, query: dict[str, list[str]]) -> tuple[str, bytes]:
        parts = [urllib.parse.unquote(p) for p in path.split("/") if p]
        if parts == ["api", "stores"]:
            return _json(self.stores())
        if len(parts) < 3 or parts[:2] != ["api", "stores"]:
            raise NotFound(f"{path}: no such route")
        # the store's name runs up to the part that ends in .zarr (names may hold folders)
        end = next((i for i in range(2, len(parts)) if parts[i].endswith(".zarr")), None)
        if end is None:
            raise NotFound(f"{path}: no store named")
        name = "/".join(parts[2 : end + 1])
        rest = parts[end + 1 :]
        store = self.library.store(name)
        return self.route(name, store, rest, query)

    def route(self, name: str, store: MaskStore, rest: list[str], query: dict[str, list[str]]) -> tuple[str, bytes]:
        from pipeline.viewer import render

        if not rest:
            return _json(store_record(name, store))
        head = rest[0]
        if head == "thumbnail.png" and len(rest) == 1:
            return "image/png", render.thumbnail(store)
        if head == "tiles" and len(rest) == 5 and rest[1] in ("mask", "image") and rest[4].endswith(".png"):
            if store.info.volume is not None:
                raise BadRequest("tiles: a volume; use slices")
            try:
                z, x, y = int(rest[2]), int(rest[3]), int(rest[4].removesuffix(".png"))
            except ValueError:
                raise BadRequest("tiles: Z/X/Y.png with integers") from None
            shape = tuple(int(v) for v in store.info.shape)
            window = tile_window((shape[0], shape[1]), z, x, y)
            if window is None:
                raise NotFound(f"tile {z}/{x}/{y}: outside the image")
            if rest[1] == "mask":
                return "image/png", render.mask_tile(store, window, _hidden(query))
            bands = (query.get("bands") or [""])[0]
            try:
                chosen = tuple(int(b) for b in bands.split(",") if b.strip()) or None
            except ValueError:
                raise BadRequest(f"bands={bands!r}: band numbers separated by commas") from None
            return "image/png", render.image_tile(store, window, chosen)
        if head == "point" and len(rest) == 1:
            return _json(point(store, query))
        if head == "regions" and len(rest) == 1:
            return _json(regions(store, query))
        if head == "slices" and len(rest) in (3, 4):
            labels = rest[1] == "labels"
            axis, file = rest[-2], rest[-1]
            if axis not in render.AXES or not file.endswith(".png") or (len(rest) == 4 and not labels):
                raise NotFound("slices: /slices/AXIS/I.png or /slices/labels/AXIS/I.png")
            try:
                index = int(file.removesuffix(".png"))
            except ValueError:
                raise BadRequest("slices: I.png with an integer") from None
            if labels:
                return "image/png", render.slice_labels(store, axis, index, _hidden(query))
            preset = (query.get("window") or ["soft-tissue"])[0]
            if preset not in render.WINDOWS:
                raise BadRequest(f"window={preset!r}: one of {', '.join(render.WINDOWS)}")
            centre, width = render.WINDOWS[preset]
            given_centre, given_width = _float(query, "centre"), _float(query, "width")
            centre = centre if given_centre is None else given_centre
            width = width if given_width is None or given_width <= 0 else given_width
            return "image/png", render.slice_image(store, axis, index, centre, width)
        raise NotFound(f"{'/'.join(rest)}: no such route for a store")


def point(store: MaskStore, query: dict[str, list[str]]) -> dict[str, Any]:
    from pipeline.query.view import StoreView

    view = StoreView(store)
    row, col = _int(query, "row"), _int(query, "col")
    index: tuple[float, ...] = (col + 0.5, row + 0.5)
    if store.info.volume is not None:
        index = (*index, _int(query, "slice") + 0.5)
    return view.at(index, crs="pixel")


def regions(store: MaskStore, query: dict[str, list[str]]) -> dict[str, Any]:
    from pipeline.query.view import StoreView

    if store.regions_info is None:
        return {"count": 0, "rows": [], "columns": []}
    view = StoreView(store)
    frame = view.regions(query["class"][0] if query.get("class") else None)
    sort = (query.get("sort") or ["id"])[0]
    if sort not in frame.columns:
        raise BadRequest(f"sort={sort!r}: one of {', '.join(frame.columns)}")
    frame = frame.sort_values(sort, ascending=(query.get("desc") or ["0"])[0] in ("0", "false", ""), kind="stable")
    offset, limit = _int(query, "offset", 0), _int(query, "limit", 200)
    if offset < 0 or not 0 < limit <= 10000:
        raise BadRequest("offset >= 0 and 0 < limit <= 10000")
    page = frame.iloc[offset : offset + limit]
    rows = json.loads(page.to_json(orient="records"))
    return {"count": len(frame), "columns": list(frame.columns), "rows": rows}


def _json(value: Any) -> tuple[str, bytes]:
    return "application/json", json.dumps(value, default=_plain).encode()


def _plain(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def make_handler(api: Api) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "raymask-viewer"
        protocol_version = "HTTP/1.1"  # connections kept alive, as browsers and tile clients expect
        disable_nagle_algorithm = True  # else a body written after its headers waits out a delayed ACK (40 ms)
        timeout = 60  # an idle kept-alive connection is closed after a minute

        def log_message(self, format: str, *args: Any) -> None:
            return  # quiet: a tile per request would flood the terminal

        def do_GET(self) -> None:
            self._serve(head=False)

        def do_HEAD(self) -> None:
            self._serve(head=True)

        def _refuse(self) -> None:
            self._send(HTTPStatus.METHOD_NOT_ALLOWED, "application/json", b'{"error": "read-only"}', False)

        do_POST = do_PUT = do_DELETE = do_PATCH = _refuse

        def _serve(self, head: bool) -> None:
            try:
                url = urllib.parse.urlsplit(self.path)
                query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
                status, kind, body = HTTPStatus.OK, *self._content(url.path, query)
            except NotFound as exc:
                status, kind, body = HTTPStatus.NOT_FOUND, *_error(exc)
            except (BadRequest, QueryError, ValueError, UnicodeError) as exc:
                status, kind, body = HTTPStatus.BAD_REQUEST, *_error(exc)
            except RaymaskError as exc:  # a damaged or unreadable store: its one line
                status, kind, body = HTTPStatus.UNPROCESSABLE_ENTITY, *_error(exc)
            except Exception as exc:  # never a traceback to the client
                status, kind, body = HTTPStatus.INTERNAL_SERVER_ERROR, *_error(exc)
            self._send(status, kind, body, head)

        def _content(self, path: str, query: dict[str, list[str]]) -> tuple[str, bytes]:
            if "\x00" in path or len(path) > 2048:
                raise BadRequest("malformed path")
            if path.startswith("/api/"):
                return api.handle(path, query)
            if path.startswith("/static/"):
                return static_file(path.removeprefix("/static/"))
            page = path.strip("/").split("/", 1)[0]
            if page in PAGES:
                return static_file(PAGES[page])
            raise NotFound(f"{path}: no such page")

        def _send(self, status: HTTPStatus, kind: str, body: bytes, head: bool) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store" if kind == "application/json" else "max-age=60")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            if not head:
                self.wfile.write(body)

    return Handler


@functools.cache
def _static_files() -> dict[str, Path]:
    """The package's static files by name, listed once (they do not change while serving)."""
    return {p.relative_to(STATIC).as_posix(): p for p in STATIC.rglob("*") if p.is_file()}


def static_file(name: str) -> tuple[str, bytes]:
    """A file shipped in the package's static folder: looked up among the files there, never joined."""
    path = _static_files().get(urllib.parse.unquote(name))
    if path is None:
        raise NotFound(f"/static/{name}: no such file")
    kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    if path.suffix == ".js":
        kind = "text/javascript"
    return kind, path.read_bytes()


def _error(exc: BaseException) -> tuple[str, bytes]:
    return "application/json", json.dumps({"error": one_line(exc, 300)}).encode()


def make_server(path: str | Path, host: str = "127.0.0.1", port: int = 8765) -> ThreadingHTTPServer:
    """The server for ``path`` (a store, or a folder of stores), bound but not yet serving."""
    where = Path(path).absolute()
    if not where.exists():
        raise StoreError(f"{path}: no such store or folder")
    if (where / "zarr.json").is_file():
        MaskStore.open(where)  # a store: it must be one raymask can read
        library = Library(where.parent, only=where)
    elif where.is_dir():
        library = Library(where)
    else:
        raise StoreError(f"{path}: not a store or a folder of stores")
    library.scan()
    server = _Server((host, port), make_handler(Api(library)))
    server.daemon_threads = True
    _share_display_cache()
    return server


def _share_display_cache() -> None:
    """A folder for the display pyramids of source images (pipeline.viewer.render.DISPLAYS), shared by
    the worker processes and removed when the process that made it ends."""
    import atexit
    import os
    import shutil
    import tempfile

    from pipeline.viewer import render

    if render.DISPLAYS.folder is None:
        folder = Path(tempfile.mkdtemp(prefix="raymask-serve-"))
        render.DISPLAYS.folder = folder
        maker = os.getpid()

        def remove() -> None:
            if os.getpid() == maker:  # not a forked worker ending
                shutil.rmtree(folder, ignore_errors=True)

        atexit.register(remove)


def serve(server: ThreadingHTTPServer, workers: int = 1) -> None:
    """Serve until interrupted, in ``workers`` processes sharing the listening socket: tiles are
    numpy and PNG work that holds the GIL, so one process serves about one core's worth."""
    import os
    import signal

    def stop(*_: object) -> None:
        raise KeyboardInterrupt  # SIGTERM ends the parent as Ctrl-C does: its workers are stopped too

    signal.signal(signal.SIGTERM, stop)
    children = []
    for _ in range(max(0, workers - 1)):
        pid = os.fork()
        if pid == 0:  # a worker: serve, and end with its parent
            signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the parent stops everyone
            _end_with_parent()
            try:
                server.serve_forever()
            finally:
                os._exit(0)
        children.append(pid)
    try:
        server.serve_forever()
    finally:
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass


def _end_with_parent() -> None:
    """Have the kernel end this worker if the parent dies without stopping it (SIGKILL); Linux only."""
    import ctypes
    import os
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent is already gone
        os._exit(0)


class _Server(ThreadingHTTPServer):
    # A page asks for dozens of tiles at once: the default backlog of 5 drops connections, which
    # clients then retry after a second (TCP's SYN timeout), a second that lands in every tail latency.
    request_queue_size = 256

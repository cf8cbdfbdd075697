"""Where a store is: a local folder, or a prefix in object storage (``s3://bucket/prefix``).

The zarr layer for object storage is zarr's ``ObjectStore`` over obstore (Rust: connection pooling,
retries with backoff and request timeouts built in, one wheel with no botocore to pin), configured
from the same environment GDAL reads for ``/vsis3/`` (``AWS_S3_ENDPOINT``, ``AWS_HTTPS``,
``AWS_VIRTUAL_HOSTING``, ``AWS_REGION``, the credentials; ``AWS_ENDPOINT_URL`` too), so a user sets
them once. Local stores stay zarr ``LocalStore`` paths.

``ObjectPath`` is the URL with the few path operations the store code uses (``/``, ``name``), so a
store's ``path`` prints as the URL the user gave.
"""

from __future__ import annotations

import os
import shutil
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any, Union

import zarr

from pipeline.config import URL


class ObjectPath:
    """``s3://bucket/key`` with ``/`` and ``name``; ``str()`` is the URL."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def __truediv__(self, other: str | Path) -> ObjectPath:
        return ObjectPath(f"{self.url}/{str(other).strip('/')}")

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def parent(self) -> ObjectPath:
        return ObjectPath(self.url.rsplit("/", 1)[0])

    def with_name(self, name: str) -> ObjectPath:
        return self.parent / name

    def absolute(self) -> ObjectPath:
        return self

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"ObjectPath({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectPath) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)


StorePath = Union[Path, ObjectPath]


def split_s3(url: str) -> tuple[str, str] | None:
    """``(bucket, key)`` of ``s3://bucket/key`` or ``/vsis3/bucket/key``; None for anything else."""
    for prefix in ("s3://", "/vsis3/"):
        if url.startswith(prefix):
            bucket, _, key = url[len(prefix) :].partition("/")
            return bucket, key
    return None


def s3_config() -> dict[str, Any]:
    """obstore S3 settings from the environment GDAL reads."""
    config: dict[str, Any] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
    https = os.environ.get("AWS_HTTPS", "YES").upper() not in ("NO", "FALSE", "OFF", "0")
    if not endpoint and os.environ.get("AWS_S3_ENDPOINT"):
        endpoint = f"{'https' if https else 'http'}://{os.environ['AWS_S3_ENDPOINT']}"
    if endpoint:
        config["endpoint"] = endpoint
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        config["region"] = region
    if os.environ.get("AWS_VIRTUAL_HOSTING", "TRUE").upper() in ("FALSE", "NO", "OFF", "0"):
        config["virtual_hosted_style_request"] = False
    if os.environ.get("AWS_NO_SIGN_REQUEST", "").upper() in ("YES", "TRUE", "ON", "1"):
        config["skip_signature"] = True
    return config


def s3_store(bucket: str, prefix: str | None = None) -> Any:
    """An obstore S3 store for ``bucket`` (rooted at ``prefix``), configured from the environment;
    requests time out rather than hang (an unreachable endpoint is an error in seconds)."""
    from obstore.store import S3Store

    config = s3_config()
    endpoint = str(config.get("endpoint", ""))
    client: dict[str, Any] = {"connect_timeout": "5s", "timeout": "60s"}
    if endpoint.startswith("http://"):
        client["allow_http"] = True
    retry = {"max_retries": 3, "retry_timeout": timedelta(seconds=20)}
    return S3Store(bucket, prefix=prefix or None, config=config, client_options=client, retry_config=retry)  # type: ignore[arg-type]


def store_path(where: str | Path | ObjectPath) -> StorePath:
    """A store's location from what a user or a task gave: a URL, or a local path."""
    if isinstance(where, (Path, ObjectPath)):
        return where
    return ObjectPath(where) if URL.match(where) else Path(where)


def relative(path: StorePath, root: StorePath) -> str:
    """``path`` below ``root``, as a ``/``-separated name (a store's name in a catalog)."""
    if isinstance(path, ObjectPath) and isinstance(root, ObjectPath):
        return path.url.removeprefix(root.url).strip("/")
    return Path(path).relative_to(Path(root)).as_posix()  # type: ignore[arg-type]


def is_object(where: str | Path | ObjectPath) -> bool:
    return isinstance(store_path(where), ObjectPath)


def zarr_store(where: str | Path | ObjectPath, *, read_only: bool = True) -> Any:
    """What zarr opens for ``where``: a path string for local folders, an ``ObjectStore`` rooted at
    the prefix for S3 URLs. Other schemes are refused in one line."""
    from pipeline.errors import StoreError

    path = store_path(where)
    if isinstance(path, Path):
        return str(path)
    parts = split_s3(path.url)
    if parts is None:
        raise StoreError(f"{path}: only s3:// URLs (and S3-compatible servers) are supported for stores")
    bucket, prefix = parts
    return zarr.storage.ObjectStore(s3_store(bucket, prefix), read_only=read_only)


def open_group(where: str | Path | ObjectPath, *, mode: str = "r", **kwargs: Any) -> zarr.Group:
    return zarr.open_group(zarr_store(where, read_only=mode == "r"), mode=mode, **kwargs)  # type: ignore[arg-type]


def open_array(where: str | Path | ObjectPath, *, mode: str = "r") -> zarr.Array:
    return zarr.open_array(zarr_store(where, read_only=mode == "r"), mode=mode)  # type: ignore[arg-type]


def create_array(where: str | Path | ObjectPath, **kwargs: Any) -> zarr.Array:
    """A new zarr array at ``where`` (a folder or a prefix), replacing what was there."""
    return zarr.create_array(zarr_store(where, read_only=False), overwrite=True, **kwargs)


def write_bytes(where: StorePath, data: bytes) -> None:
    """A whole file (written beside and renamed into place) or one object: a reader sees all or none."""
    if isinstance(where, ObjectPath):
        put_object(where, data)
        return
    tmp = where.with_name(f".{where.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial")
    tmp.write_bytes(data)
    os.replace(tmp, where)


def read_bytes(where: StorePath) -> bytes:
    """A file's or an object's bytes; FileNotFoundError when neither is there."""
    if isinstance(where, Path):
        return where.read_bytes()
    data = get_object(where)
    if data is None:
        raise FileNotFoundError(str(where))
    return data


def remove(where: StorePath) -> None:
    """A folder and what it holds, or every object under a prefix; nothing when nothing is there."""
    if isinstance(where, Path):
        shutil.rmtree(where, ignore_errors=True)
    else:
        delete_prefix(where)


def key_exists(where: str | Path | ObjectPath, key: str) -> bool:
    """Whether ``key`` (``mask/c/0/1``) is stored under the store at ``where``."""
    path = store_path(where)
    if isinstance(path, Path):
        return (path / key).is_file()
    import obstore

    client, prefix = _bucket_key(path)
    try:
        obstore.head(client, f"{prefix.strip('/')}/{key}")
    except FileNotFoundError:
        return False
    except Exception as exc:
        raise unreachable(path, exc) from exc
    return True


# -- objects, for what zarr does not do: markers, leases, copying a finished local array in -------


def _bucket_key(path: ObjectPath) -> tuple[Any, str]:
    from pipeline.errors import StoreError

    parts = split_s3(path.url)
    if parts is None:
        raise StoreError(f"{path}: only s3:// URLs (and S3-compatible servers) are supported for stores")
    bucket, key = parts
    return s3_store(bucket), key


def unreachable(path: object, exc: BaseException) -> Exception:
    """One line for an object-store failure (credentials, bucket, endpoint), naming the URL."""
    from pipeline.errors import StoreError, object_store_problem, one_line

    problem = object_store_problem(exc)
    if problem is not None:
        return StoreError(f"{path}: {problem}: {one_line(exc, 160)}")
    return StoreError(f"{path}: cannot reach the object store: {one_line(exc, 200)}")


def list_keys(path: ObjectPath) -> list[str]:
    """Keys under ``path`` (as a prefix), relative to it."""
    import obstore

    client, key = _bucket_key(path)
    prefix = key.strip("/") + "/"
    try:
        return [str(m["path"])[len(prefix) :] for batch in obstore.list(client, prefix=prefix) for m in batch]
    except Exception as exc:
        raise unreachable(path, exc) from exc


def exists(where: StorePath) -> bool:
    """Anything at ``where``: a file or folder, or any object under the prefix."""
    if isinstance(where, Path):
        return where.exists()
    return bool(list_keys(where))


def creation_marker(path: ObjectPath) -> ObjectPath:
    """The object that says a store's creation at ``path`` began and has not finished."""
    return path.with_name(f"{path.name}.creating")


def replacement_marker(path: ObjectPath) -> ObjectPath:
    """The object that says a new version is being copied over the store at ``path``; it holds
    the URL of the new version."""
    return path.with_name(f"{path.name}.replacing")


def refuse_replacing(path: ObjectPath) -> None:
    """Refuse a store that a new version is being copied over (a batch swap under way, or cut short)."""
    from pipeline.errors import StoreError

    if get_object(replacement_marker(path)) is not None:
        raise StoreError(f"{path}: a new version is being copied over this store; run the batch again to finish it")


def refuse_foreign(path: ObjectPath) -> None:
    """Refuse a prefix holding objects that raymask did not leave: only an interrupted creation
    (its marker is there) may be cleared and built again."""
    from pipeline.errors import StoreError

    refuse_replacing(path)
    if exists(path) and get_object(creation_marker(path)) is None:
        raise StoreError(f"{path}: something is there that raymask did not make; not touched")


def copy_prefix(src: ObjectPath, dst: ObjectPath, *, last: str = "zarr.json") -> None:
    """Copy every object under ``src`` to the same relative key under ``dst`` (server-side, within
    one bucket), ``last`` after all the others: a reader finds it only once the rest is there."""
    import obstore

    from pipeline.errors import StoreError

    client, src_key = _bucket_key(src)
    _, dst_key = _bucket_key(dst)
    if split_s3(src.url)[0] != split_s3(dst.url)[0]:  # type: ignore[index]
        raise StoreError(f"{src}: copying between buckets is not supported (to {dst})")
    keys = sorted(list_keys(src), key=lambda k: k == last)
    try:
        for key in keys:
            obstore.copy(client, f"{src_key.strip('/')}/{key}", f"{dst_key.strip('/')}/{key}")
    except Exception as exc:
        raise unreachable(dst, exc) from exc


def delete_prefix(path: ObjectPath) -> None:
    import obstore

    client, key = _bucket_key(path)
    keys = [f"{key.strip('/')}/{k}" for k in list_keys(path)]
    for start in range(0, len(keys), 1000):
        obstore.delete(client, keys[start : start + 1000])


def get_object(path: ObjectPath) -> bytes | None:
    import obstore

    client, key = _bucket_key(path)
    try:
        return bytes(obstore.get(client, key).bytes())
    except FileNotFoundError:
        return None
    except Exception as exc:
        raise unreachable(path, exc) from exc


def put_object(path: ObjectPath, data: bytes, *, create: bool = False) -> bool:
    """Write ``data`` at ``path``; with ``create``, only if nothing is there (a conditional put:
    one of two writers wins). Returns False when ``create`` lost."""
    import obstore
    from obstore.exceptions import AlreadyExistsError

    client, key = _bucket_key(path)
    try:
        obstore.put(client, key, data, mode="create" if create else "overwrite")
    except (AlreadyExistsError, FileExistsError):
        return False
    except Exception as exc:
        raise unreachable(path, exc) from exc
    return True


def get_tagged(path: ObjectPath) -> tuple[bytes, str] | None:
    """An object's bytes and its ETag (for a conditional overwrite), or None when it is not there."""
    import obstore

    client, key = _bucket_key(path)
    try:
        result = obstore.get(client, key)
        return bytes(result.bytes()), str(result.meta["e_tag"])
    except FileNotFoundError:
        return None
    except Exception as exc:
        raise unreachable(path, exc) from exc


def put_if_unchanged(path: ObjectPath, data: bytes, etag: str) -> bool:
    """Overwrite the object at ``path`` only if its ETag is still ``etag`` (If-Match): of two
    writers that read the same version, one wins. False when it changed or went."""
    import obstore
    from obstore.exceptions import PreconditionError

    client, key = _bucket_key(path)
    try:
        obstore.put(client, key, data, mode={"e_tag": etag})
    except (PreconditionError, FileNotFoundError):
        return False
    except Exception as exc:
        raise unreachable(path, exc) from exc
    return True


def delete_object(path: ObjectPath) -> None:
    import obstore

    client, key = _bucket_key(path)
    obstore.delete(client, key)


def upload_tree(folder: Path, path: ObjectPath) -> None:
    """Every file under ``folder`` to the same relative keys under ``path`` (a finished zarr array or
    group built on disk, copied in)."""
    import obstore

    client, key = _bucket_key(path)
    for file in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.endswith(".partial")):
        obstore.put(client, f"{key.strip('/')}/{file.relative_to(folder).as_posix()}", file.read_bytes())

"""Where a store is: a local folder, or a prefix in object storage (``s3://bucket/prefix``).

The zarr layer for object storage is zarr's ``ObjectStore`` over obstore (Rust: connection pooling,
retries with backoff and request timeouts built in, one wheel with no botocore to pin), configured
from the same environment GDAL reads (``pipeline.sources.remote.s3_config``). Local stores stay
zarr ``LocalStore`` paths.

``ObjectPath`` is the URL with the few path operations the store code uses (``/``, ``name``), so a
store's ``path`` prints as the URL the user gave.
"""

from __future__ import annotations

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

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"ObjectPath({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectPath) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)


StorePath = Union[Path, ObjectPath]


def store_path(where: str | Path | ObjectPath) -> StorePath:
    """A store's location from what a user or a task gave: a URL, or a local path."""
    if isinstance(where, (Path, ObjectPath)):
        return where
    return ObjectPath(where) if URL.match(where) else Path(where)


def is_object(where: str | Path | ObjectPath) -> bool:
    return isinstance(store_path(where), ObjectPath)


def zarr_store(where: str | Path | ObjectPath, *, read_only: bool = True) -> Any:
    """What zarr opens for ``where``: a path string for local folders, an ``ObjectStore`` rooted at
    the prefix for S3 URLs. Other schemes are refused in one line."""
    from pipeline.errors import StoreError

    path = store_path(where)
    if isinstance(path, Path):
        return str(path)
    from pipeline.sources.remote import s3_store, split_s3

    parts = split_s3(path.url)
    if parts is None:
        raise StoreError(f"{path}: only s3:// URLs (and S3-compatible servers) are supported for stores")
    bucket, prefix = parts
    return zarr.storage.ObjectStore(s3_store(bucket, prefix), read_only=read_only)


def open_group(where: str | Path | ObjectPath, *, mode: str = "r", **kwargs: Any) -> zarr.Group:
    return zarr.open_group(zarr_store(where, read_only=mode == "r"), mode=mode, **kwargs)  # type: ignore[arg-type]


def open_array(where: str | Path | ObjectPath, *, mode: str = "r") -> zarr.Array:
    return zarr.open_array(zarr_store(where, read_only=mode == "r"), mode=mode)  # type: ignore[arg-type]


def key_exists(where: str | Path | ObjectPath, key: str) -> bool:
    """Whether ``key`` (``mask/c/0/1``) is stored under the store at ``where``."""
    path = store_path(where)
    if isinstance(path, Path):
        return (path / key).is_file()
    from zarr.core.sync import sync

    return bool(sync(zarr_store(path).exists(key)))

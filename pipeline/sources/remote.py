"""Inputs on S3 (and S3-compatible servers): an object's identity from its metadata, and globs
listed in the bucket. The client is ``pipeline.store.location.s3_store``, configured from the same
variables GDAL reads for ``/vsis3/``."""

from __future__ import annotations

import hashlib
import re

from pipeline.errors import SourceError, SourceNotFound, object_store_problem
from pipeline.store.location import s3_store, split_s3


def object_identity(url: str) -> str:
    """A content identity of an S3 object without reading it: its ETag and size (an object that is
    rewritten gets a new ETag). A missing object or an unreachable endpoint is one line naming ``url``."""
    import obstore

    where = split_s3(url)
    if where is None:
        raise SourceError(f"{url}: not an S3 URL")
    bucket, key = where
    try:
        meta = obstore.head(s3_store(bucket), key)
    except FileNotFoundError as exc:
        raise SourceNotFound(f"{url}: no such object") from exc
    except Exception as exc:  # obstore's errors name the request; one line is what a person needs
        problem = object_store_problem(exc)
        detail = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        raise SourceError(f"{url}: {problem}: {detail}" if problem else f"{url}: {detail}") from exc
    digest = hashlib.sha256(f"{meta.get('e_tag')}|{meta['size']}".encode()).hexdigest()
    return digest[:16]


def glob_s3(pattern: str) -> tuple[str, list[str]]:
    """``(fixed prefix URL, matching object URLs)`` for an ``s3://bucket/prefix/**/*.tif`` pattern:
    one listing of the prefix before the first wildcard, matched as ``glob`` would (``**`` spans
    folders, ``*`` does not). A pattern without wildcards names one object."""
    where = split_s3(pattern)
    if where is None:
        raise SourceError(f"{pattern}: not an S3 URL")
    bucket, key = where
    parts = key.split("/")
    fixed = []
    for part in parts:
        if any(c in part for c in "*?["):
            break
        fixed.append(part)
    if len(fixed) == len(parts):  # one object
        return f"s3://{bucket}/{'/'.join(fixed[:-1])}", [pattern]
    prefix = "/".join(fixed)
    regex = re.compile(_glob_regex(key))
    listed = _keys(pattern, bucket, prefix)
    return f"s3://{bucket}/{prefix}", sorted(f"s3://{bucket}/{k}" for k in listed if regex.fullmatch(k))


def _keys(url: str, bucket: str, prefix: str) -> list[str]:
    """Every key under ``prefix`` (one listing, paged by obstore); a failure is one line naming ``url``."""
    import obstore

    try:
        return [
            str(meta["path"])
            for batch in obstore.list(s3_store(bucket), prefix=f"{prefix}/" if prefix else None)
            for meta in batch
        ]
    except Exception as exc:
        raise SourceError(
            f"{url}: cannot list the bucket: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        ) from exc


def _glob_regex(pattern: str) -> str:
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return "".join(out)


def list_prefix(url: str) -> list[str]:
    """The object URLs under ``s3://bucket/prefix/`` (recursively, hidden names left out), sorted."""
    where = split_s3(url)
    if where is None:
        raise SourceError(f"{url}: not an S3 URL")
    bucket, prefix = where
    keys = _keys(url, bucket, prefix.strip("/"))
    return sorted(f"s3://{bucket}/{k}" for k in keys if not k.rsplit("/", 1)[-1].startswith("."))


def read_object(url: str) -> bytes:
    """The bytes of an S3 object; a missing one is one line naming ``url``."""
    import obstore

    where = split_s3(url)
    if where is None:
        raise SourceError(f"{url}: not an S3 URL")
    bucket, key = where
    try:
        return bytes(obstore.get(s3_store(bucket), key).bytes())
    except FileNotFoundError as exc:
        raise SourceNotFound(f"{url}: no such object") from exc
    except Exception as exc:
        raise SourceError(f"{url}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from exc


def is_dicom_object(url: str) -> bool:
    """Whether the S3 object at ``url`` is a DICOM Part 10 file: ``DICM`` at byte 128, read with
    one ranged request. False for anything else, a missing object included (its reader says so)."""
    import obstore

    where = split_s3(url)
    if where is None:
        return False
    bucket, key = where
    try:
        return bytes(obstore.get_range(s3_store(bucket), key, start=128, end=132)) == b"DICM"
    except Exception:  # missing, shorter than 132 bytes, unreachable: the raster reader reports it
        return False

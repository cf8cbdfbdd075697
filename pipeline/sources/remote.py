"""Objects on S3 (and S3-compatible servers) as raymask reaches them: one configuration for GDAL and
for the object-store client.

GDAL reads inputs through ``/vsis3/`` with its own settings (``AWS_S3_ENDPOINT``, ``AWS_HTTPS``,
``AWS_VIRTUAL_HOSTING``, ``AWS_REGION`` and the credentials); obstore (listing, object metadata) is
configured from the same variables, so a user sets them once. ``AWS_ENDPOINT_URL`` is honoured too.
"""

from __future__ import annotations

import hashlib
import os
import re
from datetime import timedelta
from typing import Any

from pipeline.errors import SourceError, SourceNotFound


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
        raise SourceError(f"{url}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from exc
    digest = hashlib.sha256(f"{meta.get('e_tag')}|{meta['size']}".encode()).hexdigest()
    return digest[:16]


def glob_s3(pattern: str) -> tuple[str, list[str]]:
    """``(fixed prefix URL, matching object URLs)`` for an ``s3://bucket/prefix/**/*.tif`` pattern:
    one listing of the prefix before the first wildcard, matched as ``glob`` would (``**`` spans
    folders, ``*`` does not). A pattern without wildcards names one object."""
    import re

    import obstore

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
    try:
        listed = [
            str(meta["path"])
            for batch in obstore.list(s3_store(bucket), prefix=f"{prefix}/" if prefix else None)
            for meta in batch
        ]
    except Exception as exc:
        raise SourceError(
            f"{pattern}: cannot list the bucket: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        ) from exc
    return f"s3://{bucket}/{prefix}", sorted(f"s3://{bucket}/{k}" for k in listed if regex.fullmatch(k))


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

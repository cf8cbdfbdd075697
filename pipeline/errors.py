"""One exception hierarchy for raymask.

::

    RaymaskError                         base; ``str(exc)`` is a one-line message for a person
    ├── PermanentError                   retrying cannot help: fix the input or the config
    │   ├── ConfigError(ValueError)      a job config key, value or combination is invalid
    │   ├── SourceError                  an input image cannot be used
    │   │   └── SourceNotFound(FileNotFoundError)
    │   ├── ModelError                   a model cannot be built or returned something unusable
    │   ├── StoreError                   an output store is missing, foreign, complete, or of another job
    │   │   └── StoreExists(FileExistsError)
    │   └── QueryError(ValueError)       a box, point, zone file, CRS or class name that cannot be used
    └── TransientError                   I/O that a retry may fix (network paths, a busy cluster)
        └── ClusterError(ConnectionError) a Ray cluster could not be reached

The CLI prints ``str(exc)`` on one line and exits non-zero; retry policy decides by type.
Third-party exceptions are translated at the boundary with ``raise ... from exc``.
"""

from __future__ import annotations

import errno


class RaymaskError(Exception):
    """Base of every error raymask raises on purpose."""


class PermanentError(RaymaskError):
    """Retrying cannot help: the input or the configuration must change."""


class TransientError(RaymaskError):
    """An operation that may succeed if retried."""


class ConfigError(PermanentError, ValueError):
    """A job configuration is invalid."""


class SourceError(PermanentError):
    """An input image cannot be opened or read as requested."""


class SourceNotFound(SourceError, FileNotFoundError):
    """An input path does not exist."""


class ModelError(PermanentError):
    """A model cannot be built, or its output does not fit the contract."""


class StoreError(PermanentError):
    """An output store cannot be used for this job."""


class StoreExists(StoreError, FileExistsError):
    """A complete store exists where a job wants to write."""


class StoreBusy(StoreError):
    """Another live run holds the store's lease (one writer per store)."""


class ClusterError(TransientError, ConnectionError):
    """A Ray cluster could not be reached."""


class QueryError(PermanentError, ValueError):
    """A query (box, point, zones, CRS, class name) cannot be answered as asked."""


class WorkerError(TransientError):
    """A worker process died (killed, out of memory, a crash in native code) more often than retries allow."""


def one_line(exc: BaseException, limit: int | None = None) -> str:
    """The exception's message on one line (whitespace folded; its class name if it has none),
    cut to ``limit`` characters with an ellipsis: the one way an error becomes a report line."""
    text = " ".join(str(exc).split()) or exc.__class__.__name__
    return text if limit is None or len(text) <= limit else text[: limit - 1] + "…"


_DENIED = (
    "signature we calculated", "access key id", "accessdenied", "access denied", "invalidaccesskeyid",
    "lacked the necessary privileges", "permissiondenied", "unauthenticated", "forbidden", "expiredtoken",
    "invalidtoken", "security token",
)  # fmt: skip
_NO_BUCKET = ("nosuchbucket", "specified bucket does not exist", "bucket does not exist")


def object_store_problem(exc: BaseException | str) -> str | None:
    """What an object-store failure (from obstore or GDAL's /vsis3/) means for a person, or None:
    the credentials refused, or a bucket that is not there."""
    text = exc if isinstance(exc, str) else f"{type(exc).__name__} {exc}"
    low = text.lower()
    if any(p in low for p in _NO_BUCKET):
        return "no such bucket"
    if "169.254.169.254" in low or "no credentials" in low:  # fell through to the instance role, and none answered
        return "no credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or run where a role is given)"
    if any(p in low for p in _DENIED):
        return "access denied (check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or the role and bucket policy)"
    return None


def describe(exc: BaseException) -> str:
    """One line for a report, then the traceback."""
    import traceback

    return f"{one_line(exc)}\n{''.join(traceback.format_exception(exc))}"


_OS_HINTS = {
    errno.ENOSPC: "free some space, then run the same command again: the run resumes where it stopped",
    errno.EDQUOT: "the disk quota is used up; free some, then run the same command again to resume",
    errno.EROFS: "the filesystem is read-only",
}


def os_error_line(exc: OSError) -> str:
    """``FILE: No space left on device; free some space, then ...``: an operating-system error
    (disk full, quota, permissions, read-only filesystem) as the one line a user can act on."""
    where = exc.filename if exc.filename is not None else "raymask"
    text = f"{where}: {exc.strerror or one_line(exc)}"
    hint = _OS_HINTS.get(exc.errno or 0)
    return f"{text}; {hint}" if hint else text


def rebuild(name: str, message: str) -> Exception:
    """The raymask error class called ``name`` with ``message`` (a worker's error, carried as text)."""
    cls = globals().get(name)
    if isinstance(cls, type) and issubclass(cls, RaymaskError):
        return cls(message)
    return RuntimeError(message)

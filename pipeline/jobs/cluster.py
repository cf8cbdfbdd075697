"""The driver's Ray: join a cluster or start a local one, and hand back what its wrappers hide.

``ray_session`` is the one way a command gets a Ray: it joins ``runtime.address`` (or RAY_ADDRESS,
or a Ray already initialised in this process) and shuts down only a Ray it started itself.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pipeline.errors import ClusterError, RaymaskError, one_line


def local_cpus() -> int:
    """CPUs this process may use (its affinity mask, which containers and ``taskset`` narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@contextmanager
def ray_session(address: str | None, *, enabled: bool = True, progress: bool = False) -> Iterator[str]:
    """Ray for the block (nothing when ``enabled`` is false: the in-process engine), as a line that
    says which Ray it is; a Ray this call started is shut down after it, one it joined is left running."""
    if not enabled:
        yield "this process (no Ray)"
        return
    saved, owns = {name: os.environ.get(name) for name in AUTH_ENV}, False
    try:
        owns = connect(address, progress=progress)
        yield describe_cluster(owns, address)
    finally:
        if owns:
            import ray

            ray.shutdown()
        if any(os.environ.get(name) != value for name, value in saved.items()):
            for name, value in saved.items():  # the embedded Ray's token lives and dies with it
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
            _reload_ray_auth()


# Ray's token authentication (Ray >= 2.52). Ray 2.60 has no setting that binds its GCS, raylet and
# worker gRPC servers to loopback: they listen on every interface even for a one-machine Ray. So
# the Ray that raymask starts for a run requires a random token, inherited by the processes it
# spawns and known to no one else: anyone who can reach the ports is refused (see SECURITY.md).
AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def _protect_local_ray() -> None:
    if os.environ.get("RAY_AUTH_MODE"):  # the user configured authentication themselves
        return
    import secrets

    os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    _reload_ray_auth()


def _reload_ray_auth() -> None:
    """Make this process's Ray read the authentication settings again: it reads them once, when
    first imported (Ray's own tests reset them the same way)."""
    from ray._raylet import AuthenticationTokenLoader, Config  # type: ignore[attr-defined]

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


# What reaches object storage: credentials, endpoint and region, GDAL's /vsis3/ (/vsigs/, /vsiaz/)
# settings. Set on the driver, they go to the workers with their tasks and actors (a Ray that was
# started earlier, or a cluster's nodes, would not see them otherwise); on a cluster with instance
# roles or node-level settings none are set, and nothing is sent.
STORAGE_ENV_PREFIXES = (
    "AWS_", "GS_", "GOOGLE_APPLICATION_CREDENTIALS", "AZURE_STORAGE_", "CPL_VSIL_", "GDAL_HTTP_", "VSI_CACHE",
)  # fmt: skip


def storage_env() -> dict[str, str]:
    """The driver's object-storage settings, to forward to Ray workers (``runtime_env``)."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(STORAGE_ENV_PREFIXES)}


def storage_options() -> dict[str, Any]:
    """Ray ``.options(...)`` that give a task or actor the driver's object-storage settings."""
    env = storage_env()
    return {"runtime_env": {"env_vars": env}} if env else {}


def describe_cluster(started: bool, address: str | None) -> str:
    """``a local Ray started for this run (2 CPUs)``, ``the Ray cluster at HOST:PORT (3 nodes,
    48 CPUs, 4 GPUs)``, or ``the Ray already running in this process (...)``."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    total = ray.cluster_resources()
    size = f"{len(nodes)} node{'s' if len(nodes) != 1 else ''}, {total.get('CPU', 0):g} CPUs"
    if total.get("GPU"):
        size += f", {total['GPU']:g} GPUs"
    if started and target_of(address) == "local":
        return f"a local Ray started for this run ({size})"
    if started:
        return f"the Ray cluster at {ray.get_runtime_context().gcs_address} ({size})"
    return f"the Ray already running in this process ({size})"


def target_of(address: str | None) -> str:
    """What ``address`` means here: itself, else RAY_ADDRESS, else ``local`` (a Ray of the run's own)."""
    return address or os.environ.get("RAY_ADDRESS") or "local"


def connect(address: str | None, *, progress: bool = False) -> bool:
    """Join ``address`` (or RAY_ADDRESS), or start an embedded Ray; True if this call started it.

    No address means a Ray of this run's own, even when ``ray start`` left a head running on this
    machine (``ray.init()`` would silently join that one); ``auto`` joins it on purpose.
    """
    import ray

    if ray.is_initialized():
        return False
    target = target_of(address)
    if target not in ("auto", "local"):
        probe(target)
    local = target == "local"
    if progress and sys.stderr.isatty():  # starting a local Ray takes seconds: say so rather than sit silent
        print(
            f"raymask: {'starting a local Ray' if local else f'joining the Ray cluster at {target}'}...",
            file=sys.stderr,
        )
    options: dict[str, Any] = {"num_cpus": local_cpus()} if local else {}
    if local:
        _protect_local_ray()
    try:
        ray.init(
            address=target,
            include_dashboard=False,
            logging_level=logging.ERROR,
            # Workers report through their rows; Ray's forwarded logs (a raylet's "a worker died")
            # would land on stdout, inside the JSON that `raymask run --json` prints there.
            log_to_driver=False,
            **options,
        )
    except (ConnectionError, TimeoutError, ValueError, RuntimeError) as exc:
        raise ClusterError(f"cannot reach a Ray cluster at {target!r}: {one_line(exc, 200)}") from exc
    return True


def probe(address: str, timeout: float = 5.0) -> None:
    """Fail within seconds when nothing listens at ``address``; ray.init would retry for minutes."""
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"cluster address {address!r}: expected HOST:PORT, ray://HOST:PORT or 'auto'")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ClusterError(
            f"cannot reach a Ray cluster at {address!r}: {exc.strerror or exc} (is the head running?)"
        ) from exc


def unwrap(exc: BaseException) -> Exception:
    """The raymask error inside Ray's wrappers, so the user sees its one-line message.

    Ray re-raises a failed task (DICOM ingest, region labelling) as a ``RayTaskError`` whose
    ``cause`` is the task's own exception (raymask's errors pickle, so it arrives typed); other
    wrappers chain it as ``__cause__``. Anything else comes back as it is.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        cause = getattr(current, "cause", None)  # first: RayTaskError(SourceError) is both, its text a traceback
        if isinstance(cause, BaseException) and cause is not current:
            current = cause
            continue
        if isinstance(current, RaymaskError):
            return current
        current = current.__cause__
    return exc if isinstance(exc, Exception) else RuntimeError(str(exc))

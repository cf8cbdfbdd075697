"""One writer per store: a lease file beside the store, taken before anything is written.

``.NAME.lease`` in the store's folder holds the holder (command, host, pid), when it started and
its last heartbeat. It is created with ``O_CREAT | O_EXCL`` (one creator wins; on object storage the
same is a conditional put), refreshed every ``HEARTBEAT_S`` by a thread of the holder, and removed
when the holder is done. A second writer is refused with one line naming the holder, or waits
(``--wait``). A lease whose holder is gone (its pid is dead on this host) or silent (no heartbeat for
``STALE_S``) is taken over: it is first renamed to a name of the taker's own, an atomic step only one
contender can win, so two runs never both take over one stale lease.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.errors import StoreBusy, StoreError
from pipeline.store.location import ObjectPath, delete_object, get_object, get_tagged, put_if_unchanged, put_object

HEARTBEAT_S = 5.0
STALE_S = 60.0


def lease_path(store: Any) -> Any:
    return store.parent / f".{store.name}.lease"


def holder_line(store: Any, holder: dict[str, Any]) -> str:
    age = time.time() - float(holder.get("heartbeat", 0))
    return (
        f"{store}: in use by {holder.get('command', 'raymask')} (pid {holder.get('pid')} on {holder.get('host')}, "
        f"since {holder.get('started', '?')}, last heartbeat {age:.0f} s ago); wait for it or pass --wait"
    )


@contextlib.contextmanager
def store_lease(store: Any, *, command: str, wait: bool = False, poll_s: float = 1.0) -> Iterator[None]:
    """Hold the lease on ``store`` for the block; ``StoreBusy`` (one line) if another live writer has it."""
    path = lease_path(store)
    me = {
        "id": uuid.uuid4().hex,
        "command": command,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    while True:
        holder = _try_take(path, me)
        if holder is None:
            break
        if not wait:
            raise StoreBusy(holder_line(store, holder))
        time.sleep(poll_s)
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(path, me, stop), name="raymask-lease", daemon=True)
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join()
        with contextlib.suppress(FileNotFoundError):
            if _read(path).get("id") == me["id"]:
                _unlink(path)


def _try_take(path: Any, me: dict[str, Any]) -> dict[str, Any] | None:
    """Take the lease; None when taken, else the live holder."""
    for _ in range(3):
        if _create(path, me):
            return None
        holder = _read(path)
        if not holder:  # vanished (released) or being written: look again
            time.sleep(0.05)
            holder = _read(path)
            if not holder:
                if not _exists(path):
                    continue
                holder = {"heartbeat": path.stat().st_mtime} if isinstance(path, Path) else {"heartbeat": time.time()}
        if not _stale(holder):
            return holder
        if isinstance(path, ObjectPath):  # no rename on object storage: the stale lease is overwritten
            found = get_tagged(path)  # only if it is still the version judged stale (If-Match): one
            unchanged = found is not None and _parse(found[0]) == holder  # contender's write wins
            if unchanged and found is not None and put_if_unchanged(path, _payload(me), found[1]):
                return None
            continue
        tomb = path.with_name(f"{path.name}.stale-{me['id']}")
        try:
            os.rename(path, tomb)  # only one contender moves this lease away
        except FileNotFoundError:
            continue
        with contextlib.suppress(FileNotFoundError):
            tomb.unlink()
    return _read(path) or {"command": "another raymask", "heartbeat": time.time()}


def _payload(me: dict[str, Any]) -> bytes:
    return json.dumps({**me, "heartbeat": time.time()}).encode()


def _parse(data: bytes) -> dict[str, Any]:
    try:
        parsed = json.loads(data)
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _create(path: Any, me: dict[str, Any]) -> bool:
    if isinstance(path, ObjectPath):  # a conditional put (If-None-Match): one creator wins
        return put_object(path, _payload(me), create=True)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    except OSError as exc:
        raise StoreError(f"{path}: cannot take the store's lease ({exc.strerror or exc})") from exc
    with os.fdopen(fd, "w") as fh:
        json.dump({**me, "heartbeat": time.time()}, fh)
    return True


def _read(path: Any) -> dict[str, Any]:
    try:
        data = json.loads(get_object(path) or b"{}" if isinstance(path, ObjectPath) else path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _exists(path: Any) -> bool:
    return get_object(path) is not None if isinstance(path, ObjectPath) else bool(path.exists())


def _unlink(path: Any) -> None:
    if isinstance(path, ObjectPath):
        delete_object(path)
    else:
        path.unlink()


def _stale(holder: dict[str, Any]) -> bool:
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return True  # its process is gone
        except PermissionError:
            pass  # alive, someone else's
    return time.time() - float(holder.get("heartbeat", 0)) > STALE_S


def _heartbeat(path: Any, me: dict[str, Any], stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        if isinstance(path, ObjectPath):  # one read; rewritten only if still ours since (If-Match)
            try:
                found = get_tagged(path)
            except Exception:  # a failed beat is retried at the next one
                continue
            if found is None or _parse(found[0]).get("id") != me["id"]:
                return  # taken over (we were silent too long): the new holder's lease is not ours to touch
            with contextlib.suppress(Exception):
                put_if_unchanged(path, _payload(me), found[1])
            continue
        if _read(path).get("id") != me["id"]:
            return  # taken over (we were silent too long): the new holder's file is not ours to touch
        tmp = path.with_name(f"{path.name}.{me['id']}.tmp")
        try:
            tmp.write_text(json.dumps({**me, "heartbeat": time.time()}))
            os.replace(tmp, path)
        except OSError:  # a full disk: the run itself reports it; this beat is skipped, the next one tries again
            tmp.unlink(missing_ok=True)

"""Where a command may write: never over one of its inputs, never over an existing file unasked,
and never into a folder it cannot create (one line, before anything is written).

Every command that writes (``run`` and ``batch`` stores, ``export``, ``regions --out``) asks
``guard_output`` first. Inputs are compared by their real paths (symlinks resolved, hard links
caught by ``samefile``), so ``raymask export STORE scene.tif`` cannot replace the scene the store
was made from, whatever ``--overwrite`` says.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from pipeline.config import URL
from pipeline.errors import StoreError, StoreExists
from pipeline.store.mask_store import MaskStore


def guard_output(out: str | Path, *, inputs: Iterable[str | Path] = (), overwrite: bool, kind: str = "file") -> Path:
    """``out`` as a path that may be written now; a one-line ``StoreError`` otherwise.

    ``kind`` is ``"file"`` or ``"store"`` (a folder); a store's own overwrite policy (what is at
    its path, which job made it) is the job's to decide, so only inputs and the folder are checked
    for stores.
    """
    if URL.match(str(out)):
        raise StoreError(f"{out}: a URL; raymask writes to local or shared-filesystem paths only")
    path = Path(out)
    real = Path(os.path.realpath(path))
    for given in inputs:
        source = Path(os.path.realpath(given))
        if real == source or _same_file(path, Path(given)):
            raise StoreError(f"{out}: is an input of this job ({given}); choose another output path")
        if source in real.parents:
            raise StoreError(f"{out}: lies inside the input folder {given}; choose another output path")
        if real in source.parents:
            raise StoreError(f"{out}: holds the input {given}; choose another output path")
    if kind == "file" and path.exists():
        if path.is_dir():
            raise StoreError(f"{out}: is a folder; give a file path")
        if not overwrite:
            raise StoreExists(f"{out}: already exists; pass --overwrite to replace it")
    check_writable_folder(path)
    return path


def store_inputs(store: MaskStore) -> list[str]:
    """What a store was made from and the store itself: what its exports may never replace."""
    source = store.info.source
    job_source = ((store.info.job or {}).get("source") or {}).get("path")
    configured = [job_source] if isinstance(job_source, str) else list(job_source or [])
    paths = [str(store.path), *configured, *(source.paths if source else [])]
    return [p for p in dict.fromkeys(paths) if "://" not in p and not p.startswith("/vsi")]


def check_writable_folder(path: Path) -> None:
    """Create the folder ``path`` will live in and prove it takes a new entry (``os.access`` says yes
    to root on read-only or pseudo filesystems such as /proc)."""
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"{path}: cannot create the output folder {parent} ({exc.strerror or exc})") from exc
    if not parent.is_dir():
        raise StoreError(f"{path}: {parent} is not a folder")
    try:
        probe = tempfile.mkdtemp(prefix=f".{path.name}.probe-", dir=parent)
    except OSError as exc:
        raise StoreError(f"{path}: cannot write in the output folder {parent} ({exc.strerror or exc})") from exc
    os.rmdir(probe)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False

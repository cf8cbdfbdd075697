"""The bad-input corpus (tests/bad_inputs/): every case run through the installed CLI in a subprocess.

For each case: the exit status it names; on failure exactly one line on stderr, ``raymask: error:``
and every expected fragment (argparse's usage line may precede a usage error); never a traceback
or a Python warning; no store left complete by a failed run, a complete store where the case
expects one; and every byte of the case's inputs (``d/in``: imagery, series, models, stores that
queries read) unchanged.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bad_inputs.corpus import CASES, Case, markdown_table

pytestmark = pytest.mark.slow  # ~100 subprocesses: `make test` runs them, `make check` does not


def snapshot(folder: Path) -> dict[str, str]:
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
        for p in sorted(folder.rglob("*"))
        if not p.is_symlink()
    }


def is_complete(store: Path) -> bool:
    meta = store / "zarr.json"
    return meta.is_file() and '"status": "complete"' in meta.read_text().replace('":"', '": "')


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, tmp_path: Path) -> None:
    if case.root_only and os.geteuid() != 0:
        pytest.skip("needs root (mount)")
    d = tmp_path
    argv = case.build(d)
    before = snapshot(d / "in")
    env = {**os.environ, **case.env}
    env.pop("RAY_ADDRESS", None)  # each case is a user's fresh shell
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *argv],
        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL, cwd=d, env=env,
    )  # fmt: skip
    shown = f"exit {result.returncode}\nstdout: {result.stdout[-2000:]}\nstderr: {result.stderr[-3000:]}"
    assert result.returncode == case.exit, shown
    assert "Traceback" not in result.stderr and "Warning:" not in result.stderr, shown
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    if case.exit != 0:
        if case.exit == 2 and lines and lines[0].startswith("usage:"):
            lines = lines[1:]
        assert len(lines) == 1 and lines[0].startswith("raymask: error: "), shown
        for fragment in case.expect:
            assert fragment.format(d=d) in lines[0], f"{fragment!r} not in: {lines[0]}"
        assert not is_complete(d / case.store), "a failed run left a complete store"
    else:
        for fragment in case.expect:
            assert fragment.format(d=d) in result.stdout, shown
        if case.complete:
            assert is_complete(d / case.store), shown
    assert snapshot(d / "in") == before, "an input changed"
    if case.check is not None:
        case.check(d)


def test_the_corpus_is_large_and_its_table_current() -> None:
    """At least 60 cases, unique names, and tests/bad_inputs/README.md lists exactly these
    (regenerate it with `python -m tests.bad_inputs.corpus`)."""
    assert len(CASES) >= 60
    assert len({c.name for c in CASES}) == len(CASES)
    readme = (Path(__file__).parent / "bad_inputs" / "README.md").read_text()
    assert markdown_table() in readme, "tests/bad_inputs/README.md is out of date"

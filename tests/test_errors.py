"""The error vocabulary: one-line messages, and the permanent/transient split the CLI's exit status uses."""

from __future__ import annotations

import pytest

from pipeline.cli.main import EXIT_TRANSIENT
from pipeline.errors import (
    ClusterError,
    ConfigError,
    PermanentError,
    SourceNotFound,
    StoreExists,
    TransientError,
    WorkerError,
    one_line,
    rebuild,
)


def test_one_line_folds_whitespace_cuts_with_an_ellipsis_and_never_returns_nothing() -> None:
    exc = ValueError("scene.tif:\n  band 4\tmissing  ")
    assert one_line(exc) == "scene.tif: band 4 missing"
    assert one_line(exc, 12) == "scene.tif: …" and len(one_line(exc, 12)) == 12
    assert one_line(exc, 100) == one_line(exc)
    assert one_line(KeyError()) == "KeyError"


@pytest.mark.parametrize("cls", [ConfigError, SourceNotFound, StoreExists])
def test_input_config_and_store_errors_are_permanent(cls: type[Exception]) -> None:
    assert issubclass(cls, PermanentError) and not issubclass(cls, TransientError)


@pytest.mark.parametrize("cls", [ClusterError, WorkerError])
def test_cluster_and_worker_failures_are_transient(cls: type[Exception]) -> None:
    assert issubclass(cls, TransientError) and not issubclass(cls, PermanentError)


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (ClusterError("head:6379: unreachable"), 75),
        (WorkerError("unit [0, 0]: its worker died"), 75),
        (StoreExists("out.zarr: a complete store is there"), 1),
    ],
)
def test_the_exit_status_follows_the_permanent_transient_split(
    error: Exception, status: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Whatever a command raises, main() maps it: transient 75 (EX_TEMPFAIL), permanent 1, one line.
    (tests/test_bad_input.py and tests/test_cluster.py see 75 from a real unreachable cluster.)"""
    import importlib

    cli = importlib.import_module("pipeline.cli.main")  # the module: pipeline.cli.main is also the function

    def fail(args: object) -> int:
        raise error

    monkeypatch.setattr(cli, "_cmd_info", fail)  # the parser binds the command when main() builds it
    assert cli.main(["info", "any.zarr"]) == status and EXIT_TRANSIENT == 75
    assert capsys.readouterr().err == f"raymask: error: {error}\n"


def test_a_worker_error_carried_as_text_comes_back_as_its_class() -> None:
    assert type(rebuild("SourceNotFound", "x.tif: no such file")) is SourceNotFound
    assert type(rebuild("NotOurs", "boom")) is RuntimeError


def test_a_reader_that_leaves_early_is_no_traceback(shipped_store) -> None:
    """`raymask regions STORE --json | head -1`: the pipe closes under the writer; exit 141 as a
    shell reports SIGPIPE, and nothing on stderr."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    store, _ = shipped_store("aerial-vegetation.yaml")
    read, write = os.pipe()
    os.close(read)  # the reader has gone before the first byte: every write fails with EPIPE
    try:
        done = subprocess.run(
            [str(Path(sys.executable).parent / "raymask"), "regions", str(store), "--json"],
            stdout=write, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, timeout=120,
        )  # fmt: skip
    finally:
        os.close(write)
    assert done.returncode == 141
    assert done.stderr == ""


@pytest.mark.parametrize(
    ("message", "meaning"),
    [
        ("SignatureDoesNotMatch: The request signature we calculated does not match", "access denied"),
        ("The AWS Access Key Id you provided does not exist in our records.", "access denied"),
        ("PermissionDeniedError: The operation lacked the necessary privileges", "access denied"),
        ("NoSuchBucket: The specified bucket does not exist", "no such bucket"),
        ("Error performing PUT http://169.254.169.254/latest/api/token: 403 Forbidden", "no credentials"),
        ("error sending request: connection refused", None),
        ("TIFFReadDirectory: not a TIFF file", None),
    ],
)
def test_object_store_failures_are_named_for_a_person(message: str, meaning: str | None) -> None:
    from pipeline.errors import object_store_problem

    problem = object_store_problem(message)
    assert (problem is None) if meaning is None else (problem or "").startswith(meaning)

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


def test_a_transient_failure_exits_75_and_a_permanent_one_1(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    from pipeline.cli import main

    assert EXIT_TRANSIENT == 75
    assert main(["info", str(tmp_path / "missing.zarr")]) == 1
    assert capsys.readouterr().err.startswith("raymask: error: ")


def test_a_worker_error_carried_as_text_comes_back_as_its_class() -> None:
    assert type(rebuild("SourceNotFound", "x.tif: no such file")) is SourceNotFound
    assert type(rebuild("NotOurs", "boom")) is RuntimeError

"""Documentation that cannot go stale: every `raymask` command shown in the README and in the
`--help` examples runs, as shown, against the bundled data (in a scratch folder that links
``configs/``, ``data/`` and ``models/``), and exits 0."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli.main import _parser
from tests.conftest import ROOT

BIN = Path(sys.executable).parent
# Commands that need a Ray cluster's head: tests/test_cluster.py runs `raymask submit` against one.
NEEDS_A_CLUSTER = ("raymask submit", "ray job submit")
# Commands that serve until stopped: run, asked for the catalog, and stopped.
SERVES = ("raymask serve",)


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    out = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        for line in block.splitlines():
            line = line.strip()
            if line.startswith((".venv/bin/raymask ", "raymask ", "ray job submit ")):
                out.append(line)
    return out


def help_commands() -> list[str]:
    out = []
    parser = _parser()
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for sub in [parser, *actions[0].choices.values()]:
        for line in (sub.epilog or "").splitlines():
            line = line.strip()
            if line.startswith(("raymask ", "ray job submit ")):
                out.append(line)
    return out


def shell_line(line: str) -> str:
    """The command without its trailing comment, with `raymask` from this environment."""
    command = re.split(r"\s+#\s", line, maxsplit=1)[0].strip()
    return command.removeprefix(".venv/bin/")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scratch folder where the shipped configs and bundled data sit where the docs say."""
    work = tmp_path_factory.mktemp("docs")
    for name in ("configs", "data", "models"):
        (work / name).symlink_to(ROOT / name)
    return work


def run_shell(command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_ADDRESS": ""}
    return subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL)  # fmt: skip


def test_the_docs_show_commands_and_every_one_is_run_here() -> None:
    commands = readme_commands() + help_commands()
    assert len(commands) >= 30
    for line in commands:
        assert shell_line(line).split()[0] in ("raymask", "ray"), line


@pytest.mark.slow  # some forty commands, each its own process
def test_every_command_in_the_readme_and_the_help_runs_as_shown(workdir: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    commands = [shell_line(c) for c in dict.fromkeys(readme_commands() + help_commands())]
    commands = [c for c in commands if not c.startswith(NEEDS_A_CLUSTER)]
    serves = [c for c in commands if c.startswith(SERVES)]
    commands = [c for c in commands if c not in serves]
    # First the runs, as a new user would start (without --overwrite first): they write the stores
    # the other examples read. Then the readers, two at a time. Last, relabelling, which replaces
    # the regions the readers read.
    writes = sorted((c for c in commands if re.match(r"raymask (run|batch) ", c)), key=lambda c: "--overwrite" in c)
    last = [c for c in commands if "--compute" in c]
    reads = [c for c in commands if c not in writes and c not in last]
    failed = []

    def check(command: str) -> None:
        result = run_shell(command, workdir)
        if result.returncode != 0:
            failed.append(f"{command}\n    -> exit {result.returncode}: {result.stderr.strip()[-400:]}")

    with ThreadPoolExecutor(2) as pool:  # commands writing different stores side by side, each store's in order
        list(pool.map(lambda group: [check(c) for c in group], written_together(writes)))
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(check, reads))
    for command in last:
        check(command)
    for command in serves:
        failed.extend(serve_and_stop(command, workdir))
    assert writes and reads and last and serves
    assert failed == [], "\n".join(failed)


def serve_and_stop(command: str, cwd: Path) -> list[str]:
    """Start a `raymask serve` line (on a free port), wait for the URL it prints, fetch the store list
    from it, stop it; what went wrong, if anything."""
    import json
    import urllib.request

    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_ADDRESS": ""}
    proc = subprocess.Popen(["bash", "-c", f"exec {command} --port 0"], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)  # fmt: skip
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        match = re.search(r"http://[0-9.]+:[0-9]+/", line)
        if match is None:
            return [f"{command}\n    -> printed {line!r}, no URL: {proc.stderr.read()[-400:] if proc.stderr else ''}"]
        with urllib.request.urlopen(match.group(0) + "api/stores", timeout=60) as response:
            stores = json.loads(response.read())
        return [] if stores else [f"{command}\n    -> serves no store"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def written_together(writes: list[str]) -> list[list[str]]:
    """The write commands grouped by what they write (a run's output.path, else its config; a
    batch's config), in their order within each group."""
    groups: dict[str, list[str]] = {}
    for command in writes:
        words = shlex.split(command)
        target = next((w.split("=", 1)[1] for w in words if w.startswith("output.path=")), words[2])
        groups.setdefault(target, []).append(command)
    return list(groups.values())


def test_the_commands_that_need_a_cluster_are_the_ones_test_cluster_runs() -> None:
    shown = [shell_line(c) for c in readme_commands() + help_commands() if shell_line(c).startswith(NEEDS_A_CLUSTER)]
    assert shown and all(shlex.split(c)[0] in ("raymask", "ray") for c in shown)
    cluster_tests = (ROOT / "tests" / "test_cluster.py").read_text()
    assert '"submit", "configs/aerial-vegetation.yaml", "--address"' in cluster_tests

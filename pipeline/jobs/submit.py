"""Submit a job to a Ray cluster through the Ray Jobs API and follow it.

The validated, resolved job config travels in the job's runtime environment (an environment
variable the entrypoint reads with ``raymask run env:RAYMASK_JOB``), and the current directory
travels as the working directory, so relative paths mean on the cluster what they mean here.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path
from typing import TextIO

import yaml

from pipeline.config import JobConfig
from pipeline.errors import ClusterError, one_line

CONFIG_ENV = "RAYMASK_JOB"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def submit(
    config: JobConfig,
    *,
    address: str,
    working_dir: Path,
    overwrite: bool = False,
    follow: bool = True,
    out: TextIO = sys.stdout,
) -> tuple[str, str]:
    """Submit; with ``follow``, stream the logs until the job ends. Returns (job id, status)."""
    _use_local_token()  # before Ray is imported: it reads RAY_AUTH_MODE once
    from ray.job_submission import JobSubmissionClient

    from pipeline.jobs.cluster import probe

    probe(address)
    try:
        client = JobSubmissionClient(address)
    except Exception as exc:  # ConnectionError, AuthenticationError, version errors
        raise ClusterError(f"cannot use the Ray Jobs API at {address}: {one_line(exc, 240)}") from exc
    entrypoint = f"raymask run env:{CONFIG_ENV}" + (" --overwrite" if overwrite else "")
    runtime_env = {
        "working_dir": str(working_dir),
        "env_vars": {CONFIG_ENV: yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)},
    }
    job_id = _submit_with_retry(client, entrypoint, runtime_env)
    print(f"submitted {job_id} to {address}", file=out, flush=True)
    if not follow:
        return job_id, str(client.get_job_status(job_id))
    streamed = asyncio.run(_tail(client, job_id, out))
    status = _wait(client, job_id)
    if not streamed:  # a job that ends at once can finish before the log stream connects
        out.write(client.get_job_logs(job_id))
    print(f"job {job_id} {status.lower()}", file=out, flush=True)
    return job_id, status


def _submit_with_retry(client: object, entrypoint: str, runtime_env: dict, timeout: float = 90.0) -> str:
    """Submit; a head that has just started answers "no available agent" for a while, so retry that."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return str(client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env))  # type: ignore[attr-defined]
        except RuntimeError as exc:
            message = one_line(exc)
            if "try again later" not in message or time.monotonic() > deadline:
                raise ClusterError(f"the cluster refused the job: {message[:240]}") from exc
            time.sleep(2.0)


async def _tail(client: object, job_id: str, out: TextIO) -> bool:
    """Stream the job's logs until it ends; whether anything came."""
    streamed = False
    async for lines in client.tail_job_logs(job_id):  # type: ignore[attr-defined]
        streamed = streamed or bool(lines.strip())
        out.write(lines)
        out.flush()
    return streamed


def _wait(client: object, job_id: str, timeout: float = 300.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        status = str(client.get_job_status(job_id)).rsplit(".", 1)[-1]  # type: ignore[attr-defined]
        if status in TERMINAL or time.monotonic() > deadline:
            return status
        time.sleep(0.5)


def _use_local_token() -> None:
    """Clusters started on a machine that holds a Ray token (~/.ray/auth_token) require it."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if os.environ.get("RAY_AUTH_TOKEN") or token_file.is_file():
        os.environ["RAY_AUTH_MODE"] = "token"

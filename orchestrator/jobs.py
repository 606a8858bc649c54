"""Sweeps as Ray Jobs: the driver runs on the cluster, the laptop only submits and watches.

``tl-sweep submit SPEC --address http://head:8265`` validates the spec here, uploads the working
directory (Ray's runtime environment) and submits ``tl-sweep job-run`` as a job whose submission
id is the sweep's id; ``status``, ``logs`` and ``stop`` find it by that id. The user's MLflow and
object-store credentials (``secrets.SECRET_ENV``) go to the job through the cluster's in-memory
key-value store, read and deleted as the job starts: not in the job's command line, its runtime
environment (which Ray's agent logs) or its metadata (which the dashboard shows).
Everything the sweep needs to resume lives in its ``storage.uri``.
"""
from __future__ import annotations

import base64
import time
from typing import Any, Dict, List, Optional

from orchestrator.secrets import forwarded, handoff_key, redact, upload_for_job
from orchestrator.sweepdir import InputError

JOB_TAG = "tl_sweep"  # metadata key that marks a job as a tl-sweep sweep
EXCLUDES = [".git", ".env", "sweeps", "mlruns", "mlartifacts", "*.db", "__pycache__", ".venv", "venv", "*.pt", "*.ckpt"]
DONE = ("SUCCEEDED", "FAILED", "STOPPED")


def is_jobs_address(address: Optional[str]) -> bool:
    return bool(address) and address.startswith(("http://", "https://"))


def client(address: str):
    """A Jobs API client; with token authentication set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN
    (or RAY_AUTH_TOKEN_PATH) as for every Ray client."""
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as e:
        raise InputError(
            f"--address {address}: no Ray Jobs API answers there ({redact(str(e)).splitlines()[0][:200]}). Give the "
            "dashboard's address (http://head:8265); with token authentication export RAY_AUTH_MODE=token and "
            "RAY_AUTH_TOKEN."
        ) from None


def submit(address: str, command: List[str], submission_id: str, working_dir: str, metadata: Dict[str, str],
           leave_out: List[str] = ()) -> str:
    """Submit ``tl-sweep <command...>`` as a job, the user's credentials handed over in memory.
    ``leave_out``: files of the working directory not to upload (the spec goes in the command,
    without the credentials it may hold)."""
    import shlex
    from pathlib import Path

    c = client(address)
    secrets = forwarded()
    args = list(command)
    if secrets:
        key = handoff_key()
        upload_for_job(c, key, secrets)
        args += ["--secrets-key", key]
    excludes = list(EXCLUDES)
    root = Path(working_dir).resolve()
    for f in leave_out:
        p = Path(f).resolve()
        if root in p.parents:
            excludes.append("/" + str(p.relative_to(root)))
    runtime_env = {"working_dir": working_dir, "excludes": excludes}
    try:
        return c.submit_job(entrypoint="tl-sweep " + " ".join(shlex.quote(a) for a in args),
                            submission_id=submission_id, runtime_env=runtime_env,
                            metadata={JOB_TAG: "1", **metadata})
    except Exception as e:
        raise InputError(f"the cluster refused the job: {redact(str(e)).strip().splitlines()[-1][:400]}") from None


def encode_spec(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode()


def decode_spec(text: str) -> str:
    return base64.urlsafe_b64decode(text.encode()).decode()


def sweep_jobs(address: str, sweep: Optional[str] = None) -> List[Any]:
    """tl-sweep's jobs on the cluster (those of one sweep: by id or name), oldest first."""
    jobs = [j for j in client(address).list_jobs() if (j.metadata or {}).get(JOB_TAG)]
    if sweep:
        jobs = [j for j in jobs if (j.metadata or {}).get("sweep") == sweep or (j.metadata or {}).get("name") == sweep
                or (j.submission_id or "").startswith(sweep)]
    return sorted(jobs, key=lambda j: j.start_time or 0)


def latest_job(address: str, sweep: str):
    jobs = sweep_jobs(address, sweep)
    if not jobs:
        raise InputError(f"no tl-sweep job for {sweep!r} on {address}; see tl-sweep status --address {address}")
    return jobs[-1]


def watch_start(address: str, submission_id: str, printer, timeout: float = 900) -> int:
    """Follow a submitted job's output until its sweep has started (0), or the job ended first:
    then its output is shown and its exit code returned (2 for the user's input)."""
    c = client(address)
    shown, deadline = 0, time.time() + timeout
    while time.time() < deadline:
        info = c.get_job_info(submission_id)
        logs = c.get_job_logs(submission_id)
        for line in logs.splitlines()[shown:]:
            printer.line(line)
        shown = len(logs.splitlines())
        if info.status in DONE:
            return 0 if info.status == "SUCCEEDED" else _exit_code(info.message)
        if any(ln.startswith(("sweep ", "resuming sweep ")) for ln in logs.splitlines()):
            return 0
        time.sleep(2)
    printer.line(f"the job is {c.get_job_status(submission_id)} still; follow it with tl-sweep status / logs")
    return 0


def _exit_code(message: Optional[str]) -> int:
    import re

    m = re.search(r"exit code (\d+)", message or "")
    return int(m.group(1)) if m else 1

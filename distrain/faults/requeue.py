"""SLURM requeue after a preemption checkpoint, and which attempt of a job this process is."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from typing import Any, Dict, Mapping, Optional

def slurm_job_id(environ: Mapping[str, str]) -> Optional[str]:
    """The id `scontrol` knows this job by (array tasks: ARRAYID_TASKID), or None outside SLURM."""
    if environ.get("SLURM_ARRAY_JOB_ID") and environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{environ['SLURM_ARRAY_JOB_ID']}_{environ['SLURM_ARRAY_TASK_ID']}"
    return environ.get("SLURM_JOB_ID") or None


def requeue_slurm_job(job_id: str, log: logging.Logger) -> bool:
    """`scontrol requeue JOB`; logs and returns False when SLURM refuses (e.g. a job submitted with --no-requeue)."""
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        log.warning(f"cannot requeue SLURM job {job_id}: scontrol is not on PATH")
        return False
    try:
        proc = subprocess.run([scontrol, "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as err:
        log.warning(f"cannot requeue SLURM job {job_id}: {err}")
        return False
    if proc.returncode != 0:
        log.warning(f"`scontrol requeue {job_id}` failed (exit {proc.returncode}): "
                    f"{(proc.stderr or proc.stdout).strip()}. Submit with --requeue to let a job requeue itself.")
        return False
    log.info(f"requeued SLURM job {job_id}: it resumes from the checkpoint just committed")
    return True


def attempt_info(environ: Mapping[str, str] = os.environ) -> Dict[str, Any]:
    """Which run of the job this is: SLURM job id and restart count, torchelastic run id and restart count."""
    info: Dict[str, Any] = {}
    if slurm_job_id(environ):
        info["slurm_job_id"] = slurm_job_id(environ)
        info["slurm_restart_count"] = int(environ.get("SLURM_RESTART_COUNT") or 0)  # unset on the first run
    if environ.get("TORCHELASTIC_RUN_ID"):
        info["torchelastic_run_id"] = environ["TORCHELASTIC_RUN_ID"]
        info["torchelastic_restart_count"] = int(environ.get("TORCHELASTIC_RESTART_COUNT") or 0)
    return info

"""Faults: preemption signals and the step every rank stops at, SLURM requeue, the hang watchdog, error reports."""

from distrain.faults.error_file import record_error_file
from distrain.faults.preemption import PreemptionHandler, parse_signal
from distrain.faults.requeue import attempt_info, requeue_slurm_job, slurm_job_id
from distrain.faults.tolerance import FaultTolerance

__all__ = ["FaultTolerance", "PreemptionHandler", "attempt_info", "parse_signal", "record_error_file",
           "requeue_slurm_job", "slurm_job_id"]

"""A user's script, as tests/test_exit_paths.py runs it: `python exit_script.py MODE RUN_DIR OUT [key=value ...]`.

A TensorDataset, a user model and loss, DataLoader workers forced on (data.num_workers=2). MODE is how the script
uses (or leaves) the Trainer: plain (fit, no close), with, close, raise / sysexit / interrupt (from the loss_fn at
step 2), metric_exit (sys.exit from an eval metric), after_fit (fit, then wait: the test signals it), busy (the
workers stay busy in the dataset: the test kills the training process). Every rank writes its pid to
OUT/pid-rank<R>, its DataLoader workers' pids to OUT/workers-rank<R>.txt and OUT/ready-rank<R> when it reaches
the point the test waits for.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

import distrain

MODE, RUN_DIR, OUT = sys.argv[1], sys.argv[2], Path(sys.argv[3])
RANK = os.environ.get("RANK", "0")
FAIL_AT = 2  # the loss_fn's call (a micro-batch) at which the failing modes act


def record_workers() -> None:
    pids = [p.pid for p in multiprocessing.active_children()]
    (OUT / f"workers-rank{RANK}.txt").write_text(" ".join(map(str, pids)))
    (OUT / f"ready-rank{RANK}").touch()


calls = []


def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    calls.append(1)
    if len(calls) == FAIL_AT:
        if MODE in ("raise", "sysexit", "interrupt"):
            record_workers()
        if MODE == "raise":
            raise ValueError("a bug in the user's loss")
        if MODE == "sysexit":
            sys.exit(3)
        if MODE == "interrupt":
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: a real SIGINT, KeyboardInterrupt follows
            time.sleep(30)
    return torch.nn.functional.mse_loss(output, target)


def leaving_metric(output: torch.Tensor, batch) -> tuple:
    record_workers()
    sys.exit(4)


class Busy(TensorDataset):
    """A dataset whose workers are busy for minutes (a slow decode): they never look up from it to see their
    training process gone."""

    def __getitem__(self, index: int):
        if torch.utils.data.get_worker_info() is not None:
            with open(OUT / f"workers-rank{RANK}.txt", "a") as pids:
                pids.write(f"{os.getpid()} ")
            (OUT / f"ready-rank{RANK}").touch()
            time.sleep(600)
        return super().__getitem__(index)


# Ctrl-C as in an interactive shell: a job started in the background by a non-interactive shell inherits SIGINT
# ignored, and Python then never raises KeyboardInterrupt
signal.signal(signal.SIGINT, signal.default_int_handler)
(OUT / f"pid-rank{RANK}").write_text(str(os.getpid()))
torch.manual_seed(0)
data = (Busy if MODE == "busy" else TensorDataset)(torch.randn(64, 4), torch.randn(64, 1))
cfg = {"run": {"dir": RUN_DIR, "name": "exit"}, "train": {"steps": 6, "global_batch": 8, "log_every": 1},
       "data": {"num_workers": 2}, "metrics": {"progress": "none"}, "checkpoint": {"at_end": False},
       "dist": {"timeout_s": 60}}
kwargs = dict(model=torch.nn.Linear(4, 1), train_data=data, loss_fn=loss_fn, overrides=sys.argv[4:])
if MODE == "metric_exit":
    kwargs.update(eval_data=data, metrics={"leave": leaving_metric})

if MODE == "with":
    with distrain.Trainer(cfg, **kwargs) as trainer:
        trainer.fit()
        record_workers()
elif MODE == "close":
    trainer = distrain.Trainer(cfg, **kwargs)
    trainer.fit()
    record_workers()
    trainer.close()
else:
    trainer = distrain.Trainer(cfg, **kwargs)
    trainer.fit()
    weights = trainer.full_state_dict()  # what a user does next: save the weights
    if RANK == "0":
        torch.save(weights, OUT / "weights.pt")
    record_workers()
    if MODE == "after_fit":
        print("trained", flush=True)
        time.sleep(600)  # stuck after training: the test's SIGTERM must end it
print(f"rank {RANK}: end of script", flush=True)

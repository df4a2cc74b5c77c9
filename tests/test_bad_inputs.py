"""Every bad input, end to end through the CLI: the exit code, one paragraph naming the offending key or thing,
no Python traceback, and no file of an earlier run damaged.

Each case runs `python -m distrain ...` in a child process in a workspace that holds a finished earlier run
(runs/earlier). After every case, the earlier run's files must be byte-identical, except its per-rank logs, which
may only grow (a refused attempt is worth a line in the log, never a rewrite). Most cases fail before torch is
imported; docs/troubleshooting.md explains each one.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import pytest

from conftest import REPO, child_env

QUICK = str(REPO / "configs" / "quickstart.yaml")
MLP = str(REPO / "configs" / "mlp.yaml")
GPT = str(REPO / "configs" / "gpt.yaml")
EARLIER_CKPT = "{ws}/runs/earlier/checkpoints/step_00000020"

FILES = {
    "malformed.yaml": "train:\n  steps: 3\n   global_batch: [1, 2\n",
    "list.yaml": "- run\n- train\n",
    "section.yaml": "trian:\n  steps: 3\n",
    "nested.yaml": "train:\n  stepz: 3\n",
    "type.yaml": "train:\n  global_batch: sixty-four\n",
    "a_file": "a file where a directory should be\n",
    "unset_env.yaml": "run:\n  name: ${oc.env:DISTRAIN_TEST_UNSET_VARIABLE}\n",
    "empty.yaml": "# nothing but a comment\n",
}
DIRS = ["adir.safetensors"]


@dataclass
class Case:
    id: str
    args: List[str]
    expect: List[str]  # fragments the error paragraph must contain: the key, the value, the thing
    code: int = 2
    env: Dict[str, str] = field(default_factory=dict)
    file_limit: Optional[int] = None  # RLIMIT_FSIZE in bytes for the child: a disk that fills up mid-save
    absent: List[str] = field(default_factory=list)  # paths the refused command must not have created


def R(*overrides: str) -> List[str]:
    return ["run.dir={ws}/runs", *overrides]


CASES = [
    # --- the config file ----------------------------------------------------------------------------------
    Case("malformed-yaml", ["train", "{ws}/malformed.yaml"], ["malformed.yaml", "not valid YAML", "line 3"]),
    Case("yaml-not-a-mapping", ["train", "{ws}/list.yaml"], ["list.yaml", "must hold a mapping"]),
    Case("unknown-section", ["train", "{ws}/section.yaml"], ["'trian'", "Allowed keys", "train"]),
    Case("unknown-key-in-file", ["train", "{ws}/nested.yaml"], ["'train.stepz'", "nested.yaml", "steps"]),
    Case("wrong-type-in-file", ["train", "{ws}/type.yaml"], ["'train.global_batch'", "'sixty-four'", "valid int"]),
    Case("missing-config", ["train", "{ws}/nope.yaml"], ["nope.yaml", "does not exist"]),
    Case("config-is-a-directory", ["train", "{ws}"], ["is a directory"]),
    Case("empty-config", ["train", "{ws}/empty.yaml"], ["empty.yaml", "is empty", "defaults"]),
    Case("unset-env-variable-in-file", ["train", "{ws}/unset_env.yaml"],
         ["'run.name'", "does not resolve", "DISTRAIN_TEST_UNSET_VARIABLE", "oc.env:VAR,default"]),
    # --- overrides: unknown keys, wrong types, out of range ---------------------------------------------------
    Case("unknown-key-override", ["train", QUICK, *R("train.stepz=3")], ["'train.stepz'", "command-line", "steps"]),
    Case("yaml-special-character-in-override", ["train", QUICK, *R("train.prune.exclude=[*]")],
         ["Override 'train.prune.exclude=[*]'", "could not be parsed", "quote"]),
    Case("wrong-type-override", ["train", QUICK, *R("train.steps=abc")], ["'train.steps'", "'abc'", "valid int"]),
    Case("override-without-value", ["train", QUICK, *R("train.steps")], ["train.steps", "key=value"]),
    Case("negative-steps", ["train", QUICK, *R("train.steps=-5")], ["'train.steps'", "-5", "positive integer"]),
    Case("zero-global-batch", ["train", QUICK, *R("train.global_batch=0")], ["'train.global_batch'", "positive"]),
    Case("zero-micro-batch", ["train", QUICK, *R("train.micro_batch=0")], ["'train.micro_batch'", "positive"]),
    Case("negative-lr", ["train", QUICK, *R("train.lr=-0.1")], ["'train.lr'", "-0.1", "positive"]),
    Case("zero-log-every", ["train", QUICK, *R("train.log_every=0")], ["'train.log_every'", "positive"]),
    Case("eval-fraction-above-one", ["train", QUICK, *R("data.eval_fraction=1.5")], ["'data.eval_fraction'", "[0, 1)"]),
    Case("one-beta", ["train", QUICK, *R("train.betas=[0.9]")], ["'train.betas'", "two numbers"]),
    Case("unknown-lr-schedule", ["train", QUICK, *R("train.lr_schedule=linear")], ["'train.lr_schedule'", "cosine"]),
    Case("unknown-progress-mode", ["train", QUICK, *R("metrics.progress=fancy")], ["'metrics.progress'", "plain"]),
    Case("keep-no-checkpoint", ["train", QUICK, *R("checkpoint.keep_last=0")], ["'checkpoint.keep_last'", "at least 1"]),
    Case("unknown-signal", ["train", QUICK, *R("faults.signals=[KILL]")], ["'faults.signals'", "USR1"]),
    Case("run-name-with-slash", ["train", QUICK, *R("run.name=a/b")], ["'run.name'", "one plain directory name"]),
    Case("run-name-parent", ["train", QUICK, *R("run.name=..")], ["'run.name'", "'..'", "one plain directory name"]),
    Case("infinite-lr", ["train", QUICK, *R("train.lr=inf")], ["'train.lr'", "inf", "finite"]),
    Case("interpolation-does-not-resolve", ["train", QUICK, *R("run.name=${nope.key}")],
         ["'run.name'", "does not resolve", "'nope.key' not found"]),
    Case("section-given-a-value", ["train", QUICK, *R("train=5")], ["'train' is a section", "5", "train.global_batch=", "steps"]),
    Case("infinite-timeout", ["train", QUICK, *R("dist.timeout_s=inf")], ["'dist.timeout_s'", "inf", "finite"]),
    # --- the batch arithmetic ---------------------------------------------------------------------------------
    Case("micro-batch-does-not-divide", ["train", QUICK, *R("train.micro_batch=48")],
         ["train.micro_batch=48", "does not divide", "e.g. 64"]),
    Case("global-batch-not-multiple-of-world", ["launch", "--nproc-per-node", "3", QUICK, *R()],
         ["train.global_batch=64", "world_size=3", "multiple"]),
    Case("more-workers-than-samples", ["launch", "--nproc-per-node", "4", QUICK, *R("train.global_batch=2",
                                                                                    "train.micro_batch=null")],
         ["train.global_batch=2", "smaller than world_size=4", "at least one sample"]),
    Case("global-batch-larger-than-dataset", ["train", QUICK, *R("train.global_batch=4096", "train.micro_batch=null",
                                                                 "run.name=big")],
         ["train.global_batch=4096", "larger than the training set"]),
    # --- unknown names, and names that do not fit together ---------------------------------------------------
    Case("unknown-model", ["train", QUICK, *R("model.name=resnet")], ["model.name='resnet'", "cnn, gpt, lstm, mlp"]),
    Case("unknown-dataset", ["train", QUICK, *R("data.name=imagenet")], ["data.name='imagenet'", "digits"]),
    Case("unknown-strategy", ["train", QUICK, *R("strategy.name=zero9")], ["strategy.name='zero9'", "fsdp"]),
    Case("unknown-optimizer", ["train", QUICK, *R("train.optimizer=lamb")], ["'train.optimizer'", "adamw"]),
    Case("model-does-not-fit-data", ["train", QUICK, *R("model.name=gpt")], ["'gpt'", "data.name=text"]),
    Case("unknown-model-kwarg", ["train", QUICK, *R("model.kwargs.hiden=3")], ["model.kwargs.hiden", "hidden"]),
    Case("negative-model-size", ["train", QUICK, *R("model.kwargs.hidden=-5", "run.name=neg")],
         ["'model.kwargs.hidden'", "-5", "model 'cnn'", "integer >= 1"], absent=["runs/neg"]),
    Case("unknown-dataset-kwarg", ["train", QUICK, *R("data.kwargs.foo=1")], ["data.kwargs.foo", "split_seed"]),
    Case("zero-block-size", ["train", GPT, *R("data.kwargs.block_size=0")],
         ["'data.kwargs.block_size'", "value 0", "dataset 'text'", "integer >= 1"]),
    Case("negative-bucket-size", ["train", QUICK, *R("strategy.kwargs.bucket_cap_mb=-5", "run.name=bk")],
         ["'strategy.kwargs.bucket_cap_mb'", "-5.0", "strategy 'ddp'", "number > 0"]),
    Case("deepspeed-stage-out-of-range", ["train", QUICK, *R("strategy.name=deepspeed", "strategy.kwargs.stage=4",
                                                                  "run.name=ds")],
         ["'strategy.kwargs.stage'", "value 4", "one of 0, 1, 2, 3"]),
    Case("seed-out-of-range", ["train", QUICK, *R("data.kwargs.split_seed=-1")],
         ["'data.kwargs.split_seed'", "-1", "dataset 'digits'", "in [0, 2**32)"]),
    Case("unknown-strategy-kwarg", ["train", QUICK, *R("strategy.kwargs.bucket_mb=3")],
         ["strategy.kwargs.bucket_mb", "bucket_cap_mb"]),
    Case("collate-fn-that-cannot-collate", ["train", QUICK, *R("data.collate_fn=os:getcwd", "run.name=co")],
         ["data.collate_fn (getcwd) failed", "32 samples", "TypeError", "step 0"]),
    Case("collate-fn-that-returns-no-batch", ["train", QUICK, *R("data.collate_fn=builtins:len", "run.name=cl")],
         ["(input, target) pair", "got a int", "data.collate_fn"]),
    Case("unknown-optimizer-impl", ["train", QUICK, *R("train.optimizer_impl=apex")],
         ["'train.optimizer_impl'", "'apex'", "fused"]),
    Case("unknown-checkpointing-mode", ["train", QUICK, *R("train.activation_checkpointing=half")],
         ["'train.activation_checkpointing'", "'half'", "every:N"]),
    Case("checkpointing-without-blocks", ["train", QUICK, *R("train.activation_checkpointing=full", "run.name=ac")],
         ["train.activation_checkpointing=full", "Sequential", "train.blocks"]),
    Case("unknown-block-class", ["train", QUICK, *R("train.compile=true", "train.blocks=[Block]", "run.name=bl")],
         ["train.blocks", "['Block']", "Conv2d"]),
    Case("unknown-compile-option", ["train", QUICK, *R("train.compile_options.backends=eager")],
         ["'train.compile_options'", "backends", "backend, mode"]),
    # --- devices and backends this machine does not have -----------------------------------------------------
    Case("fp16-on-cpu", ["train", QUICK, *R("train.precision=fp16", "dist.device=cpu")],
         ["train.precision=fp16", "bf16"]),
    Case("nccl-on-cpu", ["train", QUICK, *R("dist.backend=nccl", "dist.device=cpu")], ["dist.backend=nccl", "gloo"]),
    # --- the launcher ---------------------------------------------------------------------------------------
    Case("zero-workers", ["launch", "--nproc-per-node", "0", QUICK], ["--nproc-per-node 0", "at least 1"]),
    Case("workers-not-a-number", ["launch", "--nproc-per-node", "two", QUICK], ["--nproc-per-node", "'two'"]),
    Case("nodes-not-a-number", ["launch", "--nnodes", "abc", QUICK], ["--nnodes 'abc'", "MIN:MAX"]),
    Case("nodes-without-endpoint", ["launch", "--nnodes", "2", QUICK], ["--nnodes 2", "--rdzv-endpoint"]),
    Case("negative-restarts", ["launch", "--max-restarts", "-1", QUICK], ["--max-restarts -1"]),
    Case("endpoint-without-port", ["launch", "--nnodes", "2", "--rdzv-endpoint", "node0", QUICK],
         ["--rdzv-endpoint 'node0'", "HOST:PORT"]),
    Case("rendezvous-port-in-use", ["launch", "--nnodes", "2", "--rdzv-endpoint", "127.0.0.1:{busy}", QUICK, *R()],
         ["port {busy}", "already in use", "process {pid}"]),
    Case("master-port-in-use", ["train", QUICK, *R("run.name=mp")], ["MASTER_PORT", "{busy}", "already in use"],
         code=1, env={"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                      "MASTER_PORT": "{busy}"}),
    Case("unknown-command", ["trian", QUICK], ["'trian'", "train"]),
    # --- half-set launcher environments ---------------------------------------------------------------------
    Case("slurm-without-nodelist", ["train", QUICK, *R()], ["SLURM_JOB_NODELIST", "half set"],
         env={"SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "123"}),
    Case("slurm-without-ntasks", ["train", QUICK, *R()], ["SLURM_NTASKS", "half set"],
         env={"SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "123", "SLURM_JOB_NODELIST": "node1"}),
    Case("rank-without-world-size", ["train", QUICK, *R()], ["WORLD_SIZE", "half set"], env={"RANK": "0"}),
    Case("rank-outside-world", ["train", QUICK, *R()], ["rank 3 of world size 2"],
         env={"RANK": "3", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}),
    # --- run directories and checkpoints ----------------------------------------------------------------------
    Case("unwritable-run-dir", ["train", QUICK, "run.dir={ws}/a_file/sub"], ["a_file/sub", "cannot be written",
                                                                           "Not a directory"]),
    Case("plot-missing-run", ["plot", "{ws}/runs/nope"], ["runs/nope", "does not exist"]),
    Case("plot-not-a-run", ["plot", "{ws}"], ["not a run directory"]),
    Case("plot-unknown-format", ["plot", "{ws}/runs/earlier", "--out", "{ws}/x.xyz"], ["'xyz'", "png"]),
    Case("plot-out-in-missing-dir", ["plot", "{ws}/runs/earlier", "--out", "{ws}/nodir/x.png"], ["nodir", "does not exist"]),
    Case("runs-ls-missing-dir", ["runs", "ls", "{ws}/nowhere"], ["nowhere", "does not exist"]),
    Case("ckpt-ls-missing-run", ["ckpt", "ls", "{ws}/runs/nope"], ["runs/nope", "not a directory"]),
    Case("resume-missing-checkpoint", ["train", QUICK, *R("run.name=r2", "train.resume={ws}/none")],
         ["train.resume=", "does not exist"]),
    Case("resume-corrupt-checkpoint", ["train", QUICK, *R("run.name=r3", "train.resume={ws}/corrupt/step_00000020")],
         ["train.resume=", "not a valid checkpoint"]),
    Case("checkpoint-of-another-model", ["train", MLP, *R("run.name=x1", "train.resume=" + EARLIER_CKPT)],
         ["Cannot resume", "model.name: 'cnn' in the checkpoint, 'mlp' now"]),
    Case("resume-with-changed-global-batch", ["train", QUICK, *R("run.name=earlier", "train.global_batch=32",
                                                                 "train.micro_batch=16", "train.steps=40")],
         ["Cannot resume", "train.global_batch: 64 in the checkpoint, 32 now", "may change only", "train.steps"]),
    Case("export-wrong-extension", ["ckpt", "export", "{ws}/runs/earlier", "--out", "{ws}/w.pt"],
         ["--out", ".safetensors"]),
    Case("export-out-under-a-file", ["ckpt", "export", "{ws}/runs/earlier", "--out", "{ws}/a_file/w.safetensors"],
         ["--out", "a_file/w.safetensors", "Not a directory"]),
    Case("export-out-is-a-directory", ["ckpt", "export", "{ws}/runs/earlier", "--out", "{ws}/adir.safetensors"],
         ["--out", "adir.safetensors", "Is a directory"]),
    Case("disk-full-during-save", ["train", QUICK, *R("run.name=full", "train.steps=3")],
         ["Saving checkpoint step 3", "RLIMIT_FSIZE", "ulimit -f"], code=1, file_limit=1 << 20),
]


def _snapshot(root: Path) -> Dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Tuple[Path, Dict[str, bytes]]:
    """A workspace with bad config files and a finished earlier run, plus a corrupt copy of its checkpoint."""
    ws = tmp_path_factory.mktemp("bad")
    for name, text in FILES.items():
        (ws / name).write_text(text)
    for name in DIRS:
        (ws / name).mkdir()
    proc = subprocess.run([sys.executable, "-m", "distrain", "train", QUICK, "train.steps=20", "run.name=earlier",
                           f"run.dir={ws}/runs"], cwd=ws, capture_output=True, text=True, env=child_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shutil.copytree(ws / "runs" / "earlier" / "checkpoints", ws / "corrupt")
    shard = next((ws / "corrupt" / "step_00000020").rglob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # a save cut short, e.g. by a crash
    return ws, _snapshot(ws / "runs" / "earlier")


@pytest.fixture(scope="module")
def busy_port():
    """A port this test process listens on, as a program that is not a rendezvous would."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        yield sock.getsockname()[1]


def _fill(text: str, ws: Path, port: int) -> str:
    return text.replace("{ws}", str(ws)).replace("{busy}", str(port)).replace("{pid}", str(os.getpid()))


def _limit(nbytes: Optional[int]) -> Optional[Callable[[], None]]:
    if nbytes is None:
        return None
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))


def test_every_case_is_explained_in_the_troubleshooting_guide():
    """docs/troubleshooting.md has an entry for every case, with its exit code (its title is the case id)."""
    guide = (REPO / "docs" / "troubleshooting.md").read_text()
    missing = [c.id for c in CASES if f"**{c.id.replace('-', ' ')}** (exit {c.code})" not in guide]
    assert not missing, f"cases without an entry in docs/troubleshooting.md: {missing}"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, workspace, busy_port):
    ws, earlier = workspace
    env = {k: _fill(v, ws, busy_port) for k, v in case.env.items()}
    proc = subprocess.run([sys.executable, "-m", "distrain", *[_fill(a, ws, busy_port) for a in case.args]],
                          cwd=ws, capture_output=True, text=True, env=child_env(env), timeout=240,
                          preexec_fn=_limit(case.file_limit))
    output = proc.stdout + proc.stderr
    assert proc.returncode == case.code, (proc.returncode, output[-3000:])
    assert "Traceback" not in output, output[-3000:]
    assert "distrain: error:" in proc.stderr, output[-3000:]
    message = proc.stderr[proc.stderr.index("distrain: error:"):].strip()
    assert "\n\n" not in message, message  # one paragraph
    flat = " ".join(message.split())
    for fragment in case.expect:
        assert _fill(fragment, ws, busy_port) in flat, (fragment, flat)

    for path in case.absent:
        assert not (ws / path).exists(), f"the refused command left {path} behind"
    after = _snapshot(ws / "runs" / "earlier")
    assert sorted(after) == sorted(earlier), "files of the earlier run appeared or vanished"
    for name, before in earlier.items():
        if name.startswith("logs/"):
            assert after[name].startswith(before), f"{name} of the earlier run was rewritten"
        else:
            assert after[name] == before, f"{name} of the earlier run changed"


def test_disk_full_while_resuming_keeps_the_last_good_checkpoint(workspace, tmp_path):
    """The earlier run, copied, resumes and fills the disk at its next save: the step-20 checkpoint stays latest."""
    ws, _ = workspace
    shutil.copytree(ws / "runs" / "earlier", tmp_path / "resumed")
    proc = subprocess.run([sys.executable, "-m", "distrain", "train", QUICK, "run.name=resumed", f"run.dir={tmp_path}",
                           "train.steps=25"], cwd=ws, capture_output=True, text=True, env=child_env(), timeout=240,
                          preexec_fn=_limit(1 << 20))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "Saving checkpoint step 25" in proc.stderr and "RLIMIT_FSIZE" in " ".join(proc.stderr.split())
    listing = subprocess.run([sys.executable, "-m", "distrain", "ckpt", "ls", str(tmp_path / "resumed")], cwd=ws,
                             capture_output=True, text=True, env=child_env(), timeout=120)
    assert listing.returncode == 0, listing.stderr
    valid = [line.split() for line in listing.stdout.splitlines() if line.startswith("step_") and " yes" in line]
    assert [row[1] for row in valid] == ["20"] and "(latest)" in valid[0], listing.stdout  # 25 never committed


# A disk that fills up exactly at the commit: the ``latest`` pointer's temporary file is /dev/full, so the kernel
# itself answers ENOSPC to the commit's own write (the shards were written, the manifest too).
DISK_FULL_AT_COMMIT = """
import os, sys
from pathlib import Path
root = Path(sys.argv[1]) / "full" / "checkpoints"
root.mkdir(parents=True)
os.symlink("/dev/full", root / f".latest.tmp-{os.getpid()}")
from distrain.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_disk_full_during_commit_is_a_runtime_failure_and_the_run_record_says_failed(tmp_path):
    proc = subprocess.run([sys.executable, "-c", DISK_FULL_AT_COMMIT, str(tmp_path), "train", QUICK, "run.name=full",
                           f"run.dir={tmp_path}", "train.steps=2", "metrics.progress=none"],
                          capture_output=True, text=True, env=child_env(), timeout=240)
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])  # like a full disk during the write
    assert "Traceback" not in proc.stderr
    message = " ".join(proc.stderr[proc.stderr.index("distrain: error:"):].split())
    assert "Committing checkpoint step 2" in message and "No space left on device" in message
    record = json.loads((tmp_path / "full" / "run.json").read_text())
    assert record["status"] == "failed" and "No space left" in record["error"]
    assert not (tmp_path / "full" / "run.json.tmp").exists()


def test_run_record_on_a_full_disk_leaves_no_temporary_file_and_does_not_stay_running(tmp_path):
    """The disk refuses run.json.tmp (here it is /dev/full): the record is rewritten in place, compactly."""
    from distrain.telemetry.run_record import RunRecord

    record = RunRecord(tmp_path)
    record.start(world_size=1, plan={"global_batch": 64}, start_step=0)
    (tmp_path / "run.json.tmp").symlink_to("/dev/full")
    record.update(status="failed", error="OSError: [Errno 28] No space left on device")
    assert not (tmp_path / "run.json.tmp").exists() and not (tmp_path / "run.json.tmp").is_symlink()
    saved = json.loads((tmp_path / "run.json").read_text())
    assert saved["status"] == "failed" and saved["plan"] == {"global_batch": 64}

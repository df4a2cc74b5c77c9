"""Bad data inputs end to end through the CLI: one paragraph naming the thing, exit 2 for the user's data or
config, exit 1 when a dataset's own code fails or a DataLoader worker is killed outright, never a traceback, never a
hang. (The shard checks one by one, in one process: tests/test_tokens.py; inconsistent keys and a raising dataset
with and without workers: tests/test_data_loading.py.)"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path
from typing import List

from conftest import run_cli
from data_fixtures import render_digits, token_shards
from fault_helpers import launch_command, steps_logged, wait_until, worker_env


def _paragraph(stderr: str) -> str:
    return " ".join(stderr.split())


GPT = "{name: gpt, kwargs: {embed: 16, heads: 2, layers: 1}}"


def _config(path: Path, data: str, model: str = GPT) -> Path:
    path.write_text(f"run: {{name: bad, dir: {path.parent / 'runs'}}}\nmodel: {model}\ndata: {data}\n"
                    f"train: {{global_batch: 8, micro_batch: 4, steps: 4}}\nmetrics: {{progress: none}}\n")
    return path


def test_negative_num_workers_and_an_unimportable_collate_fn(tmp_path):
    config = _config(tmp_path / "c.yaml", "{name: text, kwargs: {max_chars: 5000, block_size: 16}}")
    proc = run_cli(["train", str(config), "data.num_workers=-1"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "'data.num_workers' has value -1" in _paragraph(proc.stderr)
    proc = run_cli(["launch", "--nproc-per-node", "2", str(config), "data.collate_fn=no_such_pkg.collate:pad"])
    message = _paragraph(proc.stderr)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "data.collate_fn='no_such_pkg.collate:pad' does not import: ModuleNotFoundError" in message


def test_a_bad_shard_is_one_paragraph_naming_the_file(tmp_path):
    shards = token_shards(tmp_path / "shards", max_bytes=20_000, shard_tokens=5_000)
    index = json.loads((shards / "index.json").read_text())
    index["dtype"] = "uint32"
    (shards / "index.json").write_text(json.dumps(index))
    config = _config(tmp_path / "c.yaml", f"{{name: tokens, kwargs: {{path: {shards}, block_size: 16}}}}")
    proc = run_cli(["train", str(config)])
    message = _paragraph(proc.stderr)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and message.count("distrain: error:") == 1
    assert f"Token shard {shards / 'train-000000.bin'} has 10,000 bytes" in message and "dtype" in message


def test_a_dataset_that_raises_in_a_worker_stops_every_rank_naming_the_sample(tmp_path):
    images = render_digits(tmp_path / "png", size=16, limit=40)
    broken = sorted((images / "train").rglob("*.png"))[7]
    broken.write_text("not a png")
    config = _config(tmp_path / "c.yaml", f"{{name: images, kwargs: {{path: {images}, size: 16, channels: 1}}, "
                                          f"num_workers: 2}}", "{name: cnn, kwargs: {channels: 4, hidden: 8}}")
    proc = run_cli(["launch", "--nproc-per-node", "2", str(config), "train.steps=20"], timeout=240)
    message = _paragraph(proc.stderr)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert f"cannot identify image file '{broken}'" in message and "in DataLoader worker" in message
    assert "Loading sample " in message and "of the training data (ImageFolder) for step " in message


def _children(pid: int) -> List[int]:
    """The live child processes of ``pid`` (a rank's are its DataLoader workers)."""
    kids: List[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


def test_a_dataloader_worker_killed_by_the_oom_killer_names_the_step_and_the_worker_on_every_rank(tmp_path):
    """kill -9 of one of rank 0's DataLoader workers mid-training (what the OOM killer does): one paragraph naming
    the step and the worker, exit 1, the traceback in rank 0's log only, and rank 1 names the same step."""
    run_dir, out = tmp_path / "runs", tmp_path / "out"
    proc = subprocess.Popen(launch_command(2, run_dir, ["train.steps=100000", "data.num_workers=2"]),
                            env=worker_env(out, DISTRAIN_TEST_STEP_DELAY="0.2"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_until(lambda: steps_logged(run_dir) >= 3, 240, "training to start", proc)
        workers = _children(int((out / "pid.rank0").read_text()))
        assert len(workers) == 2, workers  # data.num_workers=2, persistent
        os.kill(workers[1], signal.SIGKILL)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    paragraph = re.search(rf"distrain: error: (DataLoader worker ([01]) \(pid {workers[1]}\) loading the training "
                          rf"data \(\w+\) on rank 0 was killed by signal SIGKILL \(Killed\) in training step (\d+) "
                          rf".*?this rank's log\.)", _paragraph(stderr))
    assert paragraph, stderr[-3000:]
    step = int(paragraph.group(3))
    assert "data.num_workers (now 2)" in paragraph.group(1) and "out-of-memory" in paragraph.group(1)
    assert _paragraph(stderr).count("distrain: error: DataLoader worker") == 1  # rank 0's, once
    logs = run_dir / "quickstart" / "logs"
    rank0 = (logs / "rank0.log").read_text()
    assert "Traceback (most recent call last)" in rank0 and "is killed by signal: Killed" in rank0
    # rank 1 blames rank 0 with rank 0's own step, not the step of rank 0's last heartbeat
    blame = [line for line in (logs / "rank1.log").read_text().splitlines() if " ERROR " in line and "rank 0" in line]
    assert blame, (logs / "rank1.log").read_text()[-3000:]
    steps = {int(s) for line in blame for s in re.findall(r"\bstep (\d+)", line)}
    assert steps == {step}, blame

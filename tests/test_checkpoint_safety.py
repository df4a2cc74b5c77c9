"""Loading a checkpoint never runs code: a pickle payload planted in one is refused with a clear error.

The payload writes a marker file when unpickled. Each test first proves the payload is live (a naive pickle
load does create the marker), then that every distrain path refuses it and the marker never appears. The
manifest is rewritten to match, as an attacker with write access would, so the checksums do not catch it first.
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch

from conftest import REPO, run_cli_here
from distrain.checkpoint.paths import step_name
from distrain.checkpoint.manifest import write_manifest
from distrain.checkpoint.safe_load import load_full_state
from distrain.errors import CheckpointError
from distrain.training.trainer import Trainer

# DCP warns on every single-process save/load (strategy single), even when asked for one explicitly.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is (disabled, )?unavailable")

MLP = str(REPO / "configs" / "mlp.yaml")
FAST = ["strategy.name=single", "metrics.progress=none", "train.eval_every=0", "train.optimizer=adamw"]


class Payload:
    """Unpickling this runs ``exec``, which creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("safety")
    with Trainer(MLP, overrides=[f"run.dir={root}", "run.name=src", "train.steps=4", "checkpoint.every=4", *FAST]) as t:
        t.fit()
    return root / "src" / "checkpoints" / step_name(4)


def _reseal(ckpt: Path) -> None:
    """Rewrite the manifest so sizes and checksums match the tampered files."""
    manifest = (ckpt / "manifest.json")
    manifest.unlink()
    write_manifest(ckpt, step=4, world_size=1, strategy="single", reason="tampered")


def _refusals(ckpt: Path, tmp_path: Path, marker: Path, commands: tuple, must_fail: tuple, capsys) -> None:
    """Every way of loading ``ckpt`` either refuses it (CheckpointError, exit 2, no traceback) or, for commands in
    no need of the tampered part, succeeds; none ever creates ``marker``."""
    with pytest.raises(CheckpointError, match="[Rr]efused"):
        Trainer(MLP, overrides=[f"run.dir={tmp_path}", "run.name=victim", f"train.resume={ckpt}", *FAST])
    assert not marker.exists()
    every = {"ckpt": ["ckpt", "inspect", str(ckpt)], "predict": ["predict", str(ckpt), "--index", "0"],
             "eval": ["eval", str(ckpt), "metrics.progress=none"]}
    for args in (every[name] for name in commands):
        code, _, err = run_cli_here(args, capsys)
        assert not marker.exists(), args
        if args[0] in must_fail:
            assert code == 2 and "efused" in err and "Traceback" not in err, (args, err)
        else:
            assert code == 0, (args, err[-2000:])


def test_pickle_payload_in_dcp_metadata_is_refused(checkpoint, tmp_path, capsys):
    ckpt = Path(shutil.copytree(checkpoint, tmp_path / step_name(4)))
    marker = tmp_path / "PWNED"
    evil = pickle.dumps(Payload(marker))
    (ckpt / "dcp" / ".metadata").write_bytes(evil)
    _reseal(ckpt)
    _refusals(ckpt, tmp_path, marker, commands=("ckpt", "predict"), must_fail=("ckpt", "predict"), capsys=capsys)
    code, _, err = run_cli_here(["ckpt", "export", ckpt, "--out", tmp_path / "x.safetensors"], capsys)
    assert code == 2 and "builtins.exec" in err and not marker.exists()
    pickle.loads(evil)  # the payload is live: a naive load runs it
    assert marker.read_text() == "pwned"


def test_pickle_payload_in_a_dcp_value_is_refused(checkpoint, tmp_path, capsys):
    import torch.distributed.checkpoint as dcp

    ckpt = Path(shutil.copytree(checkpoint, tmp_path / step_name(4)))
    marker = tmp_path / "PWNED"
    state = load_full_state(ckpt / "dcp")
    state["optim"]["param_groups"][0]["lr"] = Payload(marker)  # a non-tensor value: DCP stores it pickled
    shutil.rmtree(ckpt / "dcp")
    dcp.save(state, checkpoint_id=str(ckpt / "dcp"), no_dist=True)
    _reseal(ckpt)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="optim.param_groups.0.lr"):
        Trainer(MLP, overrides=[f"run.dir={tmp_path}", "run.name=victim", f"train.resume={ckpt}", *FAST])
    # predict and eval read only the model's entries, so they never touch the tampered optimizer value; a resume
    # reads everything, and refuses.
    _refusals(ckpt, tmp_path, marker, commands=("predict", "eval"), must_fail=(), capsys=capsys)
    with pytest.raises(CheckpointError, match="asks to import exec"):
        load_full_state(ckpt / "dcp")
    assert not marker.exists()
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(ckpt / "dcp", tmp_path / "naive.pt")  # torch's own converter unpickles: the payload is live
    assert marker.read_text() == "pwned"
    assert torch.load(tmp_path / "naive.pt", weights_only=False) is not None

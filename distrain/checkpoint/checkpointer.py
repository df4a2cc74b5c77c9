"""The Checkpointer: when to save, how a save is committed atomically, and how a run resumes.

A save, on every rank at the same step:
    0. the check it was handed at construction (``before_save``: the trainer's divergence guard) settles the steps
       since the last check and says whether the weights may be saved: non-finite ones never are;
    1. every rank writes its RNG states, rank 0 the trainer state, into ``step_XXXXXXXX.tmp-<id>/``;
    2. every rank writes its own shard of model and optimizer with DCP (``dcp.save``, or ``dcp.async_save`` in
       a background thread when ``checkpoint.async_save``) - or the engine saves itself (DeepSpeed): what a
       strategy writes is its own (``Strategy.save_checkpoint``, ``load_checkpoint``);
    3. every rank hashes the files it wrote (size + sha256), the digests are gathered to rank 0 (the default group,
       or an async save's own group in its thread); that gather is also the point where every rank's files are on disk;
    4. rank 0 writes the manifest from the digests, renames the directory to ``step_XXXXXXXX/`` in one os.rename,
       points ``latest`` at it (atomic replace), and applies retention to this run's checkpoints only.
A save killed anywhere before the rename leaves only a ``.tmp-`` directory, which nothing ever reads.

A run is one lineage of checkpoints (``run_id``, in the trainer state and the manifest): a fresh start draws a new
id, a resume carries on the checkpoint's. Retention (and removing what a resume from an earlier step left behind)
only ever deletes checkpoints of this lineage.

A resume verifies the checkpoint it loads on every rank at once: rank 0 checks the manifest, files and sizes, and
every rank hashes the files its rank wrote (``manifest.share_of``), so no rank waits in a collective while another
hashes everybody's shards.
"""

from __future__ import annotations

import datetime
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional

import torch.distributed as torch_dist
from omegaconf import DictConfig, OmegaConf
from torch import nn

from distrain import dist
from distrain.checkpoint.compat import check_resume_config
from distrain.checkpoint.conversion import StrategyKind, check_strategy_change, record, running_kind, saved_kind
from distrain.checkpoint.fault_injection import STALL_ENV, stall_if_asked
from distrain.checkpoint.data_check import check_resume_data
from distrain.checkpoint.export import not_a_checkpoint
from distrain.checkpoint.discovery import PATH_HELP, describe_fallback, describe_skipped, resume_candidates
from distrain.checkpoint.paths import (checkpoints_root, committed, fsync_dir, kept_name, parse_step,
                                       remove_leftovers, step_name, temp_name, trash_name, write_latest)
from distrain.checkpoint.manifest import (checksum_problem, own_digests, read_manifest, share_of, structure_problem,
                                          write_manifest)
from distrain.checkpoint.retention import apply_retention
from distrain.checkpoint.safe_load import first_line
from distrain.checkpoint.trainer_state import (TrainerState, model_description, read_rng, restore_rng, spec_dict,
                                               write_rng)
from distrain.config import config_hash, to_container
from distrain.data import GlobalStepSampler
from distrain.env import ProcessInfo
from distrain.errors import CheckpointError, StorageError
from distrain.storage_errors import write_failure_hint
from distrain.telemetry.logs import get_logger
from distrain.telemetry.profiling import label
from distrain.telemetry.run_record import versions
from distrain.telemetry.units import format_bytes

if TYPE_CHECKING:  # annotations only: strategies write into checkpoints, so they import this folder, not it them
    from distrain.strategies.base import Strategy


# The check a save runs first (every rank): (step, scheduled) -> whether the weights may be saved. It raises
# (DivergenceError) rather than return False, except for a scheduled save the run's policy lets it skip.
SaveCheck = Callable[[int, bool], bool]


@dataclass
class _PendingSave:
    """An async save in flight: DCP's future, then (every rank) hashing, the gather and rank 0's commit."""

    step: int
    tmp: Path
    final: Path
    reason: str
    started: float
    blocked_s: float  # the loop was held this long: waiting for the previous save, then staging this one
    waited_s: float  # of which waiting for the previous save
    future: Any
    done: threading.Event = field(default_factory=threading.Event)
    error: Optional[BaseException] = None


class Checkpointer:
    """Saves, commits, retains and loads the checkpoints of one run (``<run_dir>/checkpoints``).

    It is handed what it saves (the strategy's model and optimizer state, the sampler's data position, how the
    model and data were built) and ``before_save``, the check every save runs first; it knows nothing of the
    trainer."""

    def __init__(self, run_dir: Path, cfg: DictConfig, strategy: Strategy, info: ProcessInfo,
                 sampler: GlobalStepSampler, *, before_save: SaveCheck, model_object: Optional[nn.Module] = None,
                 data_spec: Any = None, data_fingerprint: Optional[Dict[str, Any]] = None,
                 extra_state: Optional[Any] = None):
        self.root = checkpoints_root(run_dir)
        self.cfg = cfg
        self.strategy = strategy
        self.info = info
        self.sampler = sampler
        self.model_info = model_description(cfg, model_object)
        self.data_spec = spec_dict(data_spec)
        self.data_fingerprint = data_fingerprint  # recorded in every checkpoint; a resume compares it
        self.log = get_logger()
        self.last_saved_step: Optional[int] = None
        self.last_blocked_s = 0.0  # how long the latest save held the training loop (waiting for the previous one too)
        self.last_wait_s = 0.0  # of which waiting for the previous async save to finish
        self.last_save_s = 0.0  # rank 0: start of the latest committed save to its commit (async: in the background)
        self.last_save_bytes = 0  # rank 0: its size on disk
        self._last_save_time = time.monotonic()  # every_minutes counts from here: a save's start (async) or commit
        self._cadence = OmegaConf.to_object(cfg.checkpoint)  # due() per step: a DictConfig read costs ~10 us
        self._pending: Optional[_PendingSave] = None
        self.run_id = uuid.uuid4().hex[:12]  # this run's lineage of checkpoints; a resume carries on the checkpoint's
        self._owns_unnamed = False  # resumed from a checkpoint written before lineages were recorded
        self.before_save = before_save
        self.extra_state = extra_state  # per-rank state saved beside the RNG (distrain.compression.state)
        self._group = self._async_group()
        if info.is_main and (stale := remove_leftovers(self.root)):
            self.log.info(f"checkpoint: removed {len(stale)} uncommitted leftover(s) of an earlier run: "
                          f"{', '.join(stale)}")

    # --- cadence -----------------------------------------------------------------------------------
    def due(self, step: int) -> Optional[str]:
        """Why a checkpoint is due after ``step`` steps ("every" / "every_minutes"), or None; same on all ranks."""
        c = self._cadence
        if c.every and step % c.every == 0:
            return "every"
        if c.every_minutes > 0:
            elapsed = time.monotonic() - self._last_save_time
            if dist.broadcast_object(elapsed >= c.every_minutes * 60):  # clocks differ: rank 0 decides for all
                return "every_minutes"
        return None

    def maybe_save(self, step: int) -> Optional[Path]:
        """Save if the cadence says so (asynchronously when checkpoint.async_save); call on every rank. Returns None
        when not due, or when ``before_save`` lets the run skip this scheduled save."""
        reason = self.due(step)
        if reason is None:
            return None
        with label("checkpoint"):  # a named range in metrics.profile traces
            return self._save(step, reason, blocking=not self.cfg.checkpoint.async_save, scheduled=True)

    # --- saving ------------------------------------------------------------------------------------
    def save(self, step: int, reason: str = "manual", blocking: bool = True) -> Path:
        """Save the state after ``step`` steps; returns the committed directory. Call on every rank at the same step.

        ``blocking=False`` (async) returns once the state is staged in memory; the write and the commit finish
        in the background, and the next save, ``wait`` or ``close`` waits for them. Weights that ``before_save``
        refuses are never committed: it raises.
        """
        path = self._save(step, reason, blocking, scheduled=False)
        assert path is not None
        return path

    def _save(self, step: int, reason: str, blocking: bool, scheduled: bool) -> Optional[Path]:
        loop_held = time.perf_counter()
        waited = self._wait_for_previous(step)
        final = self.root / step_name(step)
        if self.last_saved_step == step:  # e.g. a preemption save, then the end-of-training save
            return final
        if not self.before_save(step, scheduled):  # e.g. non-finite weights: never saved
            return None
        started = time.perf_counter()
        save_began = time.monotonic()
        token = dist.broadcast_object(uuid.uuid4().hex[:8] if self.info.is_main else None)
        tmp = self.root / temp_name(step, str(token))
        tmp.mkdir(parents=True, exist_ok=True)
        write_rng(tmp, self.info.rank)
        if self.extra_state is not None:
            self.extra_state.write(tmp, self.info.rank)
        if self.info.is_main:
            self._trainer_state(step, reason).write(tmp)
        stall_if_asked(step)
        use_async = not blocking and not self.strategy.engine_checkpoint
        # the strategy writes its model and optimizer state: DCP shards (maybe in the background), or its engine's
        future = self.strategy.save_checkpoint(tmp, step, asynchronous=use_async, group=self._group)
        if future is not None:
            blocked = time.perf_counter() - loop_held
            pending = self._pending = _PendingSave(step, tmp, final, reason, started, blocked, waited, future)
            future.add_done_callback(lambda fut: self._after_async_write(pending, fut))  # every rank: hash, gather
            self.last_saved_step = step
            self.last_blocked_s = blocked
            self._last_save_time = save_began  # the cadence counts from the start of an async save, not its end
            return final
        # Every rank hashes what it wrote; the gather is also the barrier: every rank's files are on disk.
        gathered = dist.all_gather_object(self._own_digests(tmp))
        failure = None
        if self.info.is_main:
            try:
                self._commit(step, tmp, final, reason, started, gathered, blocked_s=None, waited_s=waited)
            except OSError as err:  # disk full, permissions: every rank must hear of it, not wait forever
                failure = _commit_failure(err, step, tmp, final)
        # Nobody returns (and perhaps exits, on preemption) before the checkpoint is committed, and all agree on it.
        failure = dist.broadcast_object(failure)
        if failure:
            raise StorageError(failure)  # runtime I/O (exit 1), as a failed write of the shards is
        self.last_saved_step = step
        self._last_save_time = time.monotonic()
        self.last_blocked_s = time.perf_counter() - loop_held
        return final

    def _wait_for_previous(self, step: int) -> float:
        """Finish an async save still in flight; returns (and reports) how long the training loop waited for it."""
        previous = self._pending.step if self._pending is not None else None
        waited = self.wait()
        self.last_wait_s = waited
        if previous not in (None, step) and waited >= 0.01 and self.info.is_main:
            self.log.info(f"checkpoint: the training loop waited {waited:.2f} s for the async save of step {previous} "
                          f"to finish before saving step {step} (saves come faster than they are written: space "
                          f"them out with checkpoint.every / every_minutes)")
        return waited

    def _own_digests(self, tmp: Path) -> tuple:
        """(size + sha256 of the files this rank wrote, None) or ({}, what went wrong): for the gather to rank 0."""
        try:
            return own_digests(tmp, self.info.rank, self.info.world_size), None
        except OSError as err:
            return {}, f"rank {self.info.rank} could not hash its files: {err}"

    def _trainer_state(self, step: int, reason: str) -> TrainerState:
        epoch, offset = self.sampler.epoch_and_offset(step)
        config, kind = to_container(self.cfg), self._strategy_kind()
        return TrainerState(
            step=step, data_epoch=int(epoch), data_offset=int(offset), world_size=self.info.world_size,
            strategy=self.strategy.name, engine_checkpoint=bool(self.strategy.engine_checkpoint),
            config=config, config_hash=config_hash(self.cfg, bool(kind.exact)), model=self.model_info,
            data_spec=self.data_spec, versions=versions(), reason=reason, run_id=self.run_id,
            data_fingerprint=self.data_fingerprint, micro_batch=self.strategy.ctx.plan.micro_batch, **record(kind))

    def _strategy_kind(self) -> StrategyKind:
        return running_kind(self.strategy, to_container(self.cfg)["strategy"])

    def _commit(self, step: int, tmp: Path, final: Path, reason: str, started: float, gathered: List[tuple],
                blocked_s: Optional[float], waited_s: float) -> None:
        """Rank 0, with every rank's (digests, error): manifest, one rename, the ``latest`` pointer, retention."""
        errors = [error for _, error in gathered if error]
        if errors:
            raise OSError(errors[0])
        digests: Dict[str, Any] = {}
        for rank_digests, _ in gathered:
            digests.update(rank_digests)
        manifest = write_manifest(tmp, digests, step=step, world_size=self.info.world_size,
                                  strategy=self.strategy.name, reason=reason, run_id=self.run_id)
        kept = None
        if final.exists():
            if self._owns(final):  # the same step saved again (a resume from an earlier step): replace it
                self._delete(final)
            else:  # another run's checkpoint (never this run's to delete): keep it, out of the way
                kept = self.root / kept_name(step, uuid.uuid4().hex[:8])
                os.rename(final, kept)
        os.rename(tmp, final)
        fsync_dir(self.root)
        write_latest(self.root, final.name)
        # A resume from an earlier step started a new trajectory: this run's later checkpoints belong to the
        # abandoned one.
        superseded = [p for s, p in committed(self.root) if s > step and self._owns(p)]
        for path in superseded:
            self._delete(path)
        deleted = apply_retention(self.root, self.cfg.checkpoint.keep_last, self.cfg.checkpoint.keep_every,
                                  owned=self._owns)
        seconds = time.perf_counter() - started
        self.last_save_s, self.last_save_bytes = seconds, int(manifest["total_bytes"])
        mode = ""
        if blocked_s is not None:
            mode = f", async: training blocked {blocked_s:.2f} s"
            mode += f" ({waited_s:.2f} s of it waiting for the previous save)" if waited_s >= 0.01 else ""
        extra = f"; removed {', '.join(p.name for p in superseded + deleted)}" if superseded or deleted else ""
        extra += f"; kept another run's {final.name} as {kept.name}" if kept else ""
        self.log.info(f"checkpoint: saved step {step} ({reason}) to {final}: {format_bytes(manifest['total_bytes'])} "
                      f"in {seconds:.2f} s{mode}{extra}")

    def _owns(self, checkpoint: Path) -> bool:
        """Whether a committed checkpoint belongs to this run's lineage (only those may ever be deleted)."""
        run_id = (read_manifest(checkpoint) or {}).get("run_id")
        return run_id == self.run_id or (run_id is None and self._owns_unnamed)

    def _delete(self, checkpoint: Path) -> None:
        doomed = self.root / trash_name(parse_step(checkpoint.name) or 0, uuid.uuid4().hex[:8])
        os.rename(checkpoint, doomed)  # out of the committed namespace first: a deletion cut short is a leftover
        shutil.rmtree(doomed, ignore_errors=True)

    def _after_async_write(self, pending: _PendingSave, future: Any) -> None:
        """Every rank, in DCP's background thread once its write finished: hash this rank's files, gather the
        digests on the save's own group, and rank 0 commits."""
        try:
            try:
                future.result()
                mine = self._own_digests(pending.tmp)
            except BaseException as err:  # noqa: BLE001 - still join the gather: the peers must not wait for us
                mine = ({}, f"rank {self.info.rank}: {first_line(err)}")
            gathered = dist.all_gather_object(mine, group=self._group)
            if self.info.is_main:
                self._commit(pending.step, pending.tmp, pending.final, pending.reason, pending.started, gathered,
                             pending.blocked_s, pending.waited_s)
            elif mine[1]:
                pending.error = OSError(mine[1])
        except BaseException as err:  # noqa: BLE001 - reported at wait(); the previous checkpoint stays the latest
            pending.error = err
        finally:
            pending.done.set()

    def wait(self, collective: bool = True) -> float:
        """Finish an async save in flight (write, hashing and commit); returns the seconds spent waiting.
        ``collective``: every rank calls it at this point, so they also agree on whether it succeeded."""
        pending, self._pending = self._pending, None
        if pending is None:
            return 0.0
        began = time.perf_counter()
        pending.done.wait()
        ok = pending.error is None
        if self.info.is_main and not ok:
            self.log.error(f"checkpoint: async save of step {pending.step} failed: {first_line(pending.error)}; "
                           f"the previous checkpoint stays the latest")
        if collective:
            ok = bool(dist.broadcast_object(ok))  # rank 0 committed, or did not: its word
        if not ok and self.last_saved_step == pending.step:
            self.last_saved_step = None
        return time.perf_counter() - began

    def close(self) -> None:
        """Let an async save in flight finish (so the final checkpoint is complete before the process exits)."""
        self.wait(collective=False)
        if self._group is not None and torch_dist.is_initialized():
            torch_dist.destroy_process_group(self._group)
        self._group = None

    # --- resuming ----------------------------------------------------------------------------------
    def resolve(self, resume: str) -> Optional[Path]:
        """The checkpoint ``train.resume`` selects (auto | never | PATH), validated; the same on all ranks.

        Collective: rank 0 lists the candidates and checks each one's manifest, files and sizes; every rank hashes
        its share of the files (``manifest.share_of``: the files its rank wrote), so the verification takes a
        1/world share of the time on every rank at once and no rank waits on another's hashing.
        """
        if resume == "never":
            return None
        plan: Any = None
        if self.info.is_main:
            try:
                if resume != "auto" and Path(resume).is_file():  # e.g. an (int8) export: weights only
                    raise not_a_checkpoint(Path(resume), "train.resume")
                plan = ("ok", *resume_candidates(resume, self.root))
            except CheckpointError as err:
                plan = ("error", str(err), err.key)
        plan = dist.broadcast_object(plan)
        if plan[0] == "error":
            raise CheckpointError(plan[1], key=plan[2])
        _, candidates, strict = plan
        skipped: List[tuple] = []
        for path in map(Path, candidates):
            reason = self._verify(path)
            if reason is None:
                if skipped and self.info.is_main:
                    self.log.warning(f"resume: {describe_fallback(skipped, path)}")
                return path
            if strict:
                raise CheckpointError(f"train.resume={resume!r} is not a valid checkpoint: {reason}. Resume from "
                                      f"another one (`distrain ckpt ls` lists them) or use train.resume=auto.",
                                      key="train.resume")
            skipped.append((path.name, reason))
        if resume == "auto":
            if skipped and self.info.is_main:
                self.log.warning(f"resume: {describe_fallback(skipped, None)}, starting from step 0")
            return None
        raise CheckpointError(f"train.resume={resume!r} holds no valid checkpoint"
                              + (f" (invalid: {describe_skipped(skipped)})" if skipped else "")
                              + f". Use auto, never, or {PATH_HELP}.", key="train.resume")

    def resolve_path(self, path: Path) -> Path:
        """A validated checkpoint directory from a checkpoint, checkpoints or run directory; same on all ranks."""
        found = self.resolve(str(path)) if str(path) not in ("auto", "never") else None
        if found is None:
            raise CheckpointError(f"{str(path)!r} is not a checkpoint path; give {PATH_HELP}.")
        return found

    def _verify(self, path: Path) -> Optional[str]:
        """Collective: why ``path`` is not an intact checkpoint, or None; every rank hashes its share of the files."""
        head = dist.broadcast_object(structure_problem(path) if self.info.is_main else None)
        reason, files = head
        if reason is not None:
            return reason
        try:
            mine = checksum_problem(path, files, share_of(files, self.info.rank, self.info.world_size))
        except OSError as err:
            mine = f"a file cannot be read ({err})"
        return next((found for found in dist.all_gather_object(mine) if found), None)

    def load(self, path: Path) -> TrainerState:
        """Load model, optimizer, RNG and scaler state from ``path`` into this run (every rank); returns the
        trainer state. Raises CheckpointError if the config changed in a way that breaks the trajectory."""
        path = Path(path)
        state = TrainerState.read(path)
        # a change of strategy converts through DCP (or is refused) before the other keys are compared
        converted = check_strategy_change(saved_kind(state), self._strategy_kind(), str(path))
        notes = [converted] if converted else []
        notes += check_resume_config(state.config, to_container(self.cfg), str(path), bool(converted))
        notes += check_resume_data(state.data_fingerprint, self.data_fingerprint, self.cfg.train.resume_data,
                                   str(path), self.log)
        self.strategy.load_checkpoint(path)
        notes += self._restore_extras(path, state)
        self.last_saved_step = state.step
        self._last_save_time = time.monotonic()
        self.run_id = state.run_id or self.run_id  # carry on this lineage: retention may delete its checkpoints
        self._owns_unnamed = state.run_id is None  # a checkpoint from before lineages: its unnamed peers are ours
        self.log.info(f"resume: loaded {path} at step {state.step} (data epoch {state.data_epoch}, offset "
                      f"{state.data_offset}; saved at world size {state.world_size}, now {self.info.world_size})"
                      + "".join(f"; {n}" for n in notes))
        return state

    def _restore_extras(self, path: Path, state: TrainerState) -> List[str]:
        notes = []
        rng = read_rng(path, self.info.rank) if state.world_size == self.info.world_size else None
        if rng is not None:
            restore_rng(rng)
        else:
            notes.append("RNG states not restored (saved at another world size; each rank keeps its seeded state)")
        if self.extra_state is not None:
            notes += self.extra_state.load(path, self.info.rank, state.world_size, self.info.world_size, state.step)
        return notes

    # --- housekeeping ------------------------------------------------------------------------------
    def _async_group(self) -> Any:
        """A gloo group of its own for async saves: DCP's background collectives must not interleave with the
        training loop's on the default group (and async staging needs a CPU backend even on NCCL runs)."""
        if not self.cfg.checkpoint.async_save:
            return None
        if self.strategy.engine_checkpoint:
            self.log.info(f"checkpoint.async_save is ignored for strategy {self.strategy.name!r}: its engine saves "
                          f"synchronously")
            return None
        if not torch_dist.is_initialized():
            return None
        return torch_dist.new_group(backend="gloo",
                                    timeout=datetime.timedelta(seconds=float(self.cfg.dist.timeout_s)))


def _commit_failure(err: OSError, step: int, tmp: Path, final: Path) -> str:
    """What to say when the commit's own writes (manifest, rename, ``latest``) fail: the storage's reason first."""
    hint = write_failure_hint(tmp)
    return (f"Committing checkpoint step {step} ({tmp} -> {final}) failed: {err}"
            + (f", because {hint}" if hint else "") + ". The previous checkpoint stays the latest.")


__all__ = ["Checkpointer", "STALL_ENV", "SaveCheck", "model_description"]

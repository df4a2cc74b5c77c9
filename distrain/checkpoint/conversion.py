"""Resume under another strategy: which strategy changes a checkpoint survives, and what the console says about it.

Every strategy with a portable checkpoint (``Strategy.portable_checkpoint``: single, ddp, zero1, fsdp on any mesh,
accelerate) writes its DCP state as torch's FQN-keyed ``get_state_dict`` view: ``{"model": {fqn: tensor},
"optim": {"state": {fqn: {"exp_avg": ..., ...}}, "param_groups": [...]}}``, holding whole tensors (ddp), DTensor
shards (fsdp) or only the entries of the parameters a rank owns (zero1). DCP records each tensor's global shape
and where every saved chunk lies in it, and on load reads whatever the loading strategy's own view asks for
(``set_state_dict`` then puts it in place), so such a checkpoint loads under any of them at any world size: the
conversion *is* the ordinary DCP load, and needs no copy of the state in another format.

A change of strategy (its name or its kwargs) is accepted when both the checkpoint's strategy and this run's are
exact (``Strategy.exact_for``: W ranks reproduce one rank) and portable. The trajectory is then one-rank training's
on either side, so the strategy section is not part of it (``config_hash`` counts it as "exact") and the resume
check lets it change. Refused, each in one paragraph: an engine checkpoint (DeepSpeed) on either side, with the
route that exists (export the weights, start a new run from them); a layout of its own (local SGD); a strategy
that is not exact (its lossy options shape the trajectory); a checkpoint written before this was recorded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Optional

from distrain.checkpoint.trainer_state import TrainerState
from distrain.errors import CheckpointError

if TYPE_CHECKING:
    from distrain.strategies.base import Strategy

# What this run is refused for, in the key a user changes.
KEY = "strategy.name"


@dataclass(frozen=True)
class StrategyKind:
    """What a resume needs to know of a strategy: its config section, and whether its state converts."""

    name: str
    kwargs: Dict[str, Any]
    exact: Optional[bool]  # reproduces one rank with these kwargs; None: a checkpoint that did not record it
    portable: Optional[bool]  # DCP state in the FQN-keyed layout (see the module docstring); None: not recorded
    engine: bool  # an engine checkpoint (DeepSpeed's own format)

    def label(self) -> str:
        return self.name + (f" (strategy.kwargs {self.kwargs})" if self.kwargs else "")


def running_kind(strategy: "Strategy", strategy_cfg: Dict[str, Any]) -> StrategyKind:
    """This run's strategy, built from ``strategy_cfg`` (the config's strategy section, as plain data)."""
    kwargs = dict(strategy_cfg.get("kwargs") or {})
    engine = bool(strategy.engine_checkpoint)
    return StrategyKind(str(strategy_cfg["name"]), kwargs, bool(strategy.exact_for(kwargs)),
                        bool(strategy.portable_checkpoint) and not engine, engine)


def saved_kind(state: TrainerState) -> StrategyKind:
    """The strategy that wrote a checkpoint, from its trainer state (and the config it recorded)."""
    section = state.config.get("strategy") or {}
    return StrategyKind(str(section.get("name", state.strategy)), dict(section.get("kwargs") or {}),
                        state.strategy_exact, state.portable_checkpoint, bool(state.engine_checkpoint))


def record(kind: StrategyKind) -> Dict[str, Any]:
    """The TrainerState fields a save records about its strategy, so a later resume can decide on a conversion."""
    return {"strategy_exact": kind.exact, "portable_checkpoint": kind.portable}


def check_strategy_change(saved: StrategyKind, current: StrategyKind, where: str) -> Optional[str]:
    """None when the strategy did not change; the line the console says when it changed and the state converts.

    Raises CheckpointError (key strategy.name) for a change that cannot be carried exactly.
    """
    if (saved.name, saved.kwargs) == (current.name, current.kwargs):
        return None
    if saved.engine and current.engine:
        return None  # the engine's own options changed: the resume check names them (its format is the engine's)
    if saved.engine or current.engine:
        raise CheckpointError(_engine_paragraph(saved, current, where), key=KEY)
    if saved.exact is None or saved.portable is None:
        raise CheckpointError(
            f"Cannot resume {where}, written by strategy {saved.label()}, under strategy {current.label()}: it was "
            f"written before distrain recorded whether a checkpoint's strategy state converts. Resume it under "
            f"strategy.name={saved.name} (and its strategy.kwargs) until its next save, then change the strategy.",
            key=KEY)
    for side, kind in (("the checkpoint's", saved), ("this run's", current)):
        if not kind.portable:
            raise CheckpointError(
                f"Cannot resume {where}, written by strategy {saved.label()}, under strategy {current.label()}: "
                f"{side} strategy {kind.name!r} keeps a checkpoint layout of its own (Strategy.portable_checkpoint is "
                f"false), which no other strategy loads. Resume with strategy.name={saved.name} and its "
                f"strategy.kwargs.", key=KEY)
        if not kind.exact:
            raise CheckpointError(
                f"Cannot resume {where}, written by strategy {saved.label()}, under strategy {current.label()}: "
                f"{side} strategy is not exact with those strategy.kwargs (it does not reproduce one rank), so the "
                f"strategy shapes this run's trajectory. A resume may change the strategy only between exact ones; "
                f"resume with strategy.name={saved.name} and its strategy.kwargs, or start a new run.", key=KEY)
    return (f"resuming a {saved.label()} checkpoint under {current.label()}: model and optimizer state converted "
            f"through DCP")


def _engine_paragraph(saved: StrategyKind, current: StrategyKind, where: str) -> str:
    engine = saved if saved.engine else current
    return (f"Cannot resume {where}, written by strategy {saved.label()}, under strategy {current.label()}: "
            f"{engine.name!r} keeps its model and optimizer in its engine's own checkpoint format, and distrain "
            f"converts optimizer state only between the DCP strategies (single, ddp, zero1, fsdp, accelerate). The "
            f"route that exists carries the weights, not the optimizer state: export them (distrain ckpt export "
            f"{where} --out model.safetensors) and start a new run from them (distrain.Trainer(config, "
            f"model=distrain.load_model('model.safetensors')) under strategy.name={current.name}, with fresh "
            f"optimizer state and step 0). Or resume under strategy.name={saved.name}.")


__all__ = ["StrategyKind", "check_strategy_change", "record", "running_kind", "saved_kind"]

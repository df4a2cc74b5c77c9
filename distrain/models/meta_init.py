"""Sharded from birth: build a model on the meta device, let the strategy wrap or shard it, then bring it to life
one parameter at a time with the modules' own initialisers, so no rank holds more of it than its share.

How the values stay exact
-------------------------
An eager build, ``torch.manual_seed(seed); factory()``, draws its random numbers while the constructors run: each
torch layer (``nn.Linear``, ``nn.Embedding``, ...) calls its own ``reset_parameters()`` at the end of its
``__init__``, after its children were built. The replay does the same: it visits the modules children first (the
order in which constructors finish) and calls each one's initialiser - ``init_weights()`` when the module defines
one, else ``reset_parameters()`` (or torch's ``_reset_parameters()``) - on full-size CPU tensors, starting from the
random-number state the eager build started from. Every rank replays the same draws, sees the same full values
and keeps its shard of them: the weights equal an eager one-rank build bit for bit, at any world size and on any
device (the draws are always the CPU generator's, as in an eager CPU build).

A parameter becomes a full CPU tensor at the first initialiser that touches it and is handed to the strategy's
storage (the device tensor, or this rank's DTensor shard) right after the last one. With torch's layers that is
one module at a time, so the peak is one module's parameters; an ``init_weights()`` that re-initialises a whole
subtree keeps that subtree's parameters alive while it runs.

When the replay would not be exact
----------------------------------
It equals the eager build only if the constructors do what the initialisers do. That is checked before it is
relied on, at no memory cost: the construction runs under a recorder that notes every random draw and every
write into a parameter (operation, parameter, shape, arguments); a dry run of the replay on the meta device is
recorded the same way, and the two lists must be equal. They differ when a constructor initialises parameters
outside an initialiser (``nn.Parameter(torch.randn(...))``, or nanoGPT's ``self.apply(self._init_weights)`` at
the end of ``__init__``) or a parameter has no initialiser at all; ``MetaBuildRefused`` then names the first
difference, and the caller builds the model eagerly instead.

Only parameters go to the meta device. Buffers (causal masks, rotary tables, BatchNorm statistics) are small and
are often computed in ``__init__`` rather than by an initialiser, so they are built for real, kept, and copied
to the device after ``to_empty``.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Set, Tuple

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from distrain.errors import DistrainError

# A module's own initialiser, in order of preference: torchtitan's convention, torch's, torch's private one
# (nn.MultiheadAttention and nn.Transformer).
INITIALISERS = ("init_weights", "reset_parameters", "_reset_parameters")
DISCARDED = "a discarded tensor"  # a parameter that is not the model's any more (replaced, e.g. by weight tying)
TEMPORARY = "a temporary"  # a tensor an initialiser creates for itself (orthogonal_ draws into one)
ATTRIBUTE = "_distrain_meta_init"  # where a meta-built model carries its MetaInit (see meta_init_of)


class MetaBuildRefused(Exception):
    """The model cannot be built on the meta device and keep its eager values; the message says why."""


@dataclass(frozen=True)
class InitOp:
    """One recorded initialisation operation: what ran, on which parameter, with which arguments."""

    op: str
    target: str  # parameter name, DISCARDED, TEMPORARY, or "" for a draw that writes no tensor of the model
    shape: Tuple[int, ...]
    args: str

    def __str__(self) -> str:
        return f"{self.op}({self.args}) on {self.target or 'a new tensor'} of shape {list(self.shape)}"


@dataclass
class _Step:
    """One initialiser call of the replay, and what the dry run saw it touch."""

    path: str  # the module's name in the model ("" = the root)
    method: str
    touched: Set[str] = field(default_factory=set)  # parameter names it read or wrote
    discarded: List[Tuple[str, str]] = field(default_factory=list)  # (holder path, attribute) given scratch


@dataclass
class MetaInit:
    """How a meta-built model comes to life: the factory, the replay's steps and the generator state to start from."""

    factory: Callable[[], nn.Module]
    steps: List[_Step]
    rng_state: torch.Tensor
    claims: Dict[str, str]  # parameter name -> the module path that owns (created) it


def meta_init_of(model: nn.Module) -> Optional[MetaInit]:
    """The MetaInit of a model ``build_on_meta`` made (while it is still unmaterialised), else None."""
    return model.__dict__.get(ATTRIBUTE)


def is_meta(model: nn.Module) -> bool:
    """Whether ``model`` still waits for ``materialise``."""
    return meta_init_of(model) is not None


# --- recording ---------------------------------------------------------------------------------------------
def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _written(func: Any, args: tuple, kwargs: dict) -> List[torch.Tensor]:
    """The tensors an aten op writes into (its schema's mutable arguments)."""
    out = []
    for i, arg in enumerate(func._schema.arguments):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        value = args[i] if i < len(args) else kwargs.get(arg.name)
        out += [t for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]
    return out


def _plain_args(args: tuple, kwargs: dict) -> str:
    """The non-tensor arguments of an op, as comparable text (a generator counts as one, whichever it is)."""
    def show(v: Any) -> str:
        if isinstance(v, torch.Tensor):
            return "T"
        if isinstance(v, torch.Generator):
            return "generator"
        return repr(v)

    parts = [show(a) for a in args] + [f"{k}={show(v)}" for k, v in sorted(kwargs.items())]
    return ", ".join(parts)


class _Recorder(TorchDispatchMode):
    """Notes every random draw and every write into a meta tensor, and every meta tensor an op touches."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: List[Tuple[str, Optional[torch.Tensor], Tuple[int, ...], str]] = []
        self.touched: List[torch.Tensor] = []  # strong references: a storage id must not be reused meanwhile

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        self.touched += [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.is_meta]
        written = [t for t in _written(func, args, kwargs) if t.is_meta]
        if written or torch.Tag.nondeterministic_seeded in func.tags:
            target = written[0] if written else None
            shape_of = target if target is not None else result
            shape = tuple(shape_of.shape) if isinstance(shape_of, torch.Tensor) else ()
            self.ops.append((str(func), target, shape, _plain_args(args, kwargs)))
        return result


class _Names:
    """Resolves a tensor to the model parameter whose storage it shares (views and ``.data`` included)."""

    def __init__(self, model: nn.Module, discarded: Set[int]):
        self.by_storage = {_storage(p): name for name, p in model.named_parameters()}
        self.discarded = discarded

    def __call__(self, t: Optional[torch.Tensor]) -> str:
        if t is None:
            return ""
        key = _storage(t)
        if key in self.by_storage:
            return self.by_storage[key]
        return DISCARDED if key in self.discarded else TEMPORARY

    def ops(self, recorder: _Recorder) -> List[InitOp]:
        return [InitOp(op, self(target), shape, args) for op, target, shape, args in recorder.ops]


# --- building ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _parameters_on_meta(creators: Dict[int, nn.Module], registered: Set[int]) -> Iterator[None]:
    """While constructing: every new parameter goes to the meta device as it is registered (torch's own
    registration hook), remembering which module created it. Buffers stay real."""
    # id(original) -> (weak reference to it, its meta twin): the same parameter registered twice gets the same
    # twin, and the CPU originals are freed as soon as the constructors drop them
    converted: Dict[int, Tuple[weakref.ref, nn.Parameter]] = {}

    def to_meta(module: nn.Module, name: str, param: nn.Parameter) -> Optional[nn.Parameter]:
        if param is None or param.is_meta:
            return None  # already meta (weight tying re-registers the same parameter): keep its identity
        if type(param) is not nn.Parameter:
            raise MetaBuildRefused(f"its parameter {name!r} of {type(module).__name__} is a "
                                   f"{type(param).__name__}, not a plain nn.Parameter")
        known = converted.get(id(param))
        if known is None or known[0]() is not param:  # (a dead original's id may be reused)
            meta = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
            known = converted[id(param)] = (weakref.ref(param), meta)
            creators[_storage(meta)] = module
            registered.add(_storage(meta))
        return known[1]

    handle = torch.nn.modules.module.register_module_parameter_registration_hook(to_meta)
    try:
        yield
    finally:
        handle.remove()


def _initialiser(module: nn.Module) -> Optional[str]:
    for name in INITIALISERS:
        if callable(getattr(type(module), name, None)):
            return name
    return None


def _post_order(module: nn.Module, prefix: str = "", seen: Optional[Set[int]] = None
                ) -> Iterator[Tuple[str, nn.Module]]:
    """Modules children first, each once: the order in which their constructors finish in an eager build."""
    seen = set() if seen is None else seen
    if id(module) in seen:
        return
    seen.add(id(module))
    for name, child in module.named_children():
        yield from _post_order(child, f"{prefix}{name}.", seen)
    yield prefix.rstrip("."), module


def _holders(module: nn.Module, prefix: str) -> Iterator[Tuple[str, nn.Module, str, nn.Parameter]]:
    """(holder path, holder, attribute, parameter) for every parameter slot in ``module``'s subtree."""
    for path, holder in module.named_modules(prefix=prefix, remove_duplicate=False):
        for attr, param in holder._parameters.items():
            if param is not None:
                yield path, holder, attr, param


def build_on_meta(factory: Callable[[], nn.Module]) -> nn.Module:
    """``factory()`` with its parameters on the meta device, checked to replay into its eager values.

    Returns the model carrying its MetaInit (``materialise`` brings it to life); raises MetaBuildRefused when the
    replay would not reproduce ``factory()``'s eager values, with the generator state left as it was.
    """
    rng_state = torch.get_rng_state()
    creators: Dict[int, nn.Module] = {}
    registered: Set[int] = set()
    recorder = _Recorder()
    try:
        with _parameters_on_meta(creators, registered), recorder:
            model = factory()
    except (MetaBuildRefused, DistrainError):
        torch.set_rng_state(rng_state)
        raise
    except Exception as err:  # a factory that reads data, moves itself to a device, or calls .item()
        torch.set_rng_state(rng_state)
        raise MetaBuildRefused(f"constructing it with parameters on the meta device failed "
                               f"({type(err).__name__}: {err})") from None
    if not isinstance(model, nn.Module):
        return model  # the caller explains what a factory must return
    try:
        init = _plan(model, factory, rng_state, creators)
        eager = _Names(model, registered).ops(recorder)
        replay = _dry_run(model, init, registered)
        _compare(eager, replay)
        initialised = set().union(*(step.touched for step in init.steps))
        untouched = [name for name, _ in model.named_parameters() if name not in initialised]
        if untouched:
            raise MetaBuildRefused(f"no reset_parameters() or init_weights() initialises its parameter "
                                   f"{untouched[0]!r}" + (f" (and {len(untouched) - 1} more)" if len(untouched) > 1
                                                          else "") + " (its values were set in a constructor)")
    finally:
        torch.set_rng_state(rng_state)  # the eager build (or the replay) starts from here
    model.__dict__[ATTRIBUTE] = init
    return model


def _plan(model: nn.Module, factory: Callable[[], nn.Module], rng_state: torch.Tensor,
          creators: Dict[int, nn.Module]) -> MetaInit:
    paths = {id(m): path for path, m in model.named_modules()}
    claims: Dict[str, str] = {}
    for name, param in model.named_parameters():
        if not param.is_meta:
            raise MetaBuildRefused(f"its parameter {name!r} did not go through nn.Module.register_parameter, so it "
                                   f"was allocated for real")
        holder = name.rpartition(".")[0]  # where named_parameters() first finds it, if its creator is gone
        claims[name] = paths.get(id(creators.get(_storage(param))), holder)
    steps = [_Step(path, method) for path, module in _post_order(model) if (method := _initialiser(module))]
    return MetaInit(factory=factory, steps=steps, rng_state=rng_state, claims=claims)


def _dry_run(model: nn.Module, init: MetaInit, registered: Set[int]) -> List[InitOp]:
    """Run the replay on the meta device (no memory, no draws), recording it; fills in each step's touches."""
    modules = dict(model.named_modules())
    resolve = _Names(model, registered)  # sees the scratch twins added to ``registered`` below
    names = resolve.by_storage
    ops: List[InitOp] = []
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        for step in init.steps:
            scratch: Dict[int, Tuple[str, str]] = {}
            swaps = []
            for path, holder, attr, param in _holders(modules[step.path], step.path):
                name = names[_storage(param)]
                if init.claims[name] != path:  # another module owns it: this one initialised a tensor later discarded
                    twin = nn.Parameter(torch.empty_like(param), requires_grad=param.requires_grad)
                    scratch[_storage(twin)] = (path, attr)
                    registered.add(_storage(twin))
                    swaps.append((holder, attr, param))
                    holder._parameters[attr] = twin
            recorder = _Recorder()
            try:
                with recorder:
                    getattr(modules[step.path], step.method)()
            except Exception as err:
                raise MetaBuildRefused(f"{type(modules[step.path]).__name__}.{step.method}() "
                                       f"({step.path or 'the model'}) fails on the meta device "
                                       f"({type(err).__name__}: {err})") from None
            finally:
                for holder, attr, param in swaps:
                    holder._parameters[attr] = param
            storages = {_storage(t) for t in recorder.touched}
            step.touched = {names[s] for s in storages if s in names}
            step.discarded = [scratch[s] for s in storages if s in scratch]
            owned = {names[_storage(p)] for path, _, _, p in _holders(modules[step.path], step.path)
                     if init.claims[names[_storage(p)]] == path}
            outside = sorted(step.touched - owned)
            if outside:  # the replay only swaps in full tensors for the parameters of the module's own subtree
                raise MetaBuildRefused(f"{type(modules[step.path]).__name__}.{step.method}() "
                                       f"({step.path or 'the model'}) touches {outside[0]!r}, a parameter outside "
                                       f"its own submodules")
            ops += resolve.ops(recorder)
    return ops


def _compare(eager: List[InitOp], replay: List[InitOp]) -> None:
    for i, (a, b) in enumerate(zip(eager, replay)):
        if a != b:
            raise MetaBuildRefused(f"its constructors and its modules' initialisers disagree at initialisation "
                                   f"operation {i + 1}: the eager build runs {a}, the modules' reset_parameters()/"
                                   f"init_weights() run {b}")
    if len(eager) != len(replay):
        longer, which = (eager, "the eager build also runs") if len(eager) > len(replay) else \
            (replay, "the initialisers also run")
        raise MetaBuildRefused(f"its constructors and its modules' initialisers disagree: {which} "
                               f"{longer[min(len(eager), len(replay))]} (after {min(len(eager), len(replay))} "
                               f"operations in common)")


# --- materialising -----------------------------------------------------------------------------------------
def materialise(model: nn.Module, device: torch.device) -> None:
    """Bring a meta-built (and possibly sharded) model to life on ``device`` with its eager initial values.

    Call it on every rank after the strategy wrapped or sharded the model (``fully_shard`` on the meta device):
    ``to_empty`` allocates each rank's storage, the buffers built in the constructors are copied back, and the
    replay writes every parameter's full value into it - whole for a replicated tensor, this rank's shard for a
    DTensor. The global generator ends where an eager build would have left it.
    """
    init = meta_init_of(model)
    if init is None:
        raise ValueError("materialise() needs a model made by build_on_meta() that was not materialised yet")
    buffers = [(m, name, b) for m in model.modules() for name, b in m._buffers.items() if b is not None]
    slots = [(holder, attr, id(p)) for _, holder, attr, p in _holders(model, "")]
    model.to_empty(device=device)
    _retie(slots)
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    name_of = {id(p): n for n, p in params.items()}
    last = {name: i for i, step in enumerate(init.steps) for name in step.touched}
    live: Dict[str, nn.Parameter] = {}
    with torch.no_grad():
        for module, name, kept in buffers:
            module._buffers[name].copy_(kept)
        torch.set_rng_state(init.rng_state)
        for i, step in enumerate(init.steps):
            for name in step.touched:
                if name not in live:
                    p = params[name]
                    live[name] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype), requires_grad=p.requires_grad)
            discarded = set(step.discarded)
            swaps = []
            for path, holder, attr, param in _holders(modules[step.path], step.path):
                name = name_of[id(param)]
                if (path, attr) in discarded:
                    replacement = nn.Parameter(torch.empty(param.shape, dtype=param.dtype),
                                               requires_grad=param.requires_grad)
                elif name in live and init.claims[name] == path:
                    replacement = live[name]
                else:
                    continue
                swaps.append((holder, attr, param))
                holder._parameters[attr] = replacement
            try:
                getattr(modules[step.path], step.method)()
            finally:
                for holder, attr, param in swaps:
                    holder._parameters[attr] = param
            for name in [n for n in step.touched if last[n] == i]:
                _place(params[name], live.pop(name))
    del model.__dict__[ATTRIBUTE]


def _retie(slots: List[Tuple[nn.Module, str, int]]) -> None:
    """Give every slot that held one shared (tied) parameter before ``to_empty`` the same parameter again:
    moving off the meta device makes a new parameter per slot."""
    first: Dict[int, nn.Parameter] = {}
    for holder, attr, old in slots:
        if old in first:
            holder._parameters[attr] = first[old]
        else:
            first[old] = holder._parameters[attr]


def _place(param: torch.Tensor, full: torch.Tensor) -> None:
    """Write a parameter's full value into its storage: all of it, or this rank's shard of a DTensor."""
    full = full.detach()
    if isinstance(param, DTensor):
        # src_data_rank=None: every rank has the full value already; each just cuts out its own shard.
        shard = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(shard.to_local())
    else:
        param.copy_(full)

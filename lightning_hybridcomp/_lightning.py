"""Lightning plumbing shared by the compression callbacks.

Finding the network to compress inside any LightningModule, getting example inputs for it, and
keeping the Trainer consistent after a callback replaced parameters (optimizers, schedulers, DDP).
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import inspect
import itertools
import math
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from lightning_hybridcomp._io import read_checkpoint

_BATCH_INPUT_KEYS = ("x", "input", "inputs", "image", "images", "pixel_values")
_BATCH_LABEL_KEYS = ("y", "label", "labels", "target", "targets")


def resolve_module(root: nn.Module, name: str | None, *, arg_name: str = "module") -> nn.Module:
    """Return ``root`` itself for ``None``/``""``, else the submodule with fully qualified ``name``.

    Raises:
        ValueError: if no submodule has that name; the message lists the valid names.
    """
    if not name:
        return root
    modules = dict(root.named_modules())
    if name not in modules:
        candidates = [n for n, m in root.named_children()]
        close = [n for n in modules if n and (name in n or n in name)][:5]
        hint = f" Did you mean one of {close}?" if close else ""
        raise ValueError(
            f"Expected `{arg_name}` to be the fully qualified name of a submodule of"
            f" {type(root).__name__}, got {name!r}. Top-level submodules: {candidates}.{hint}"
        )
    return modules[name]


def replace_module_(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule called ``name`` (fully qualified) of ``root`` by ``new``, in place."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def match_names(candidates: Sequence[str], patterns: Sequence[str], *, arg_name: str, what: str) -> list[str]:
    """The ``candidates`` matching fully qualified names or glob patterns, in pattern order, each once.

    Every pattern must match at least one candidate, so that a typo cannot silently select nothing.

    Args:
        candidates: fully qualified module names.
        patterns: names or ``fnmatch`` patterns (case-sensitive).
        arg_name: the user's argument the patterns come from, for the error message.
        what: what a pattern should match, for the error message, e.g. ``"a layer of the pruned network"``.

    Raises:
        ValueError: naming the first pattern that matches nothing.
    """
    selected: list[str] = []
    for pattern in patterns:
        hits = [n for n in candidates if n == pattern or fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ValueError(
                f"Expected every entry of `{arg_name}` to match {what}, but {pattern!r} matches nothing. Names"
                " are fully qualified in the LightningModule (as `named_modules()` prints them) and look like"
                f" {list(candidates)[:6]}; glob patterns such as 'net.layer4.*' are accepted."
            )
        selected.extend(h for h in hits if h not in selected)
    return selected


class CheckpointLoadInterceptor:
    """Runs a callback's restore step inside ``pl_module.on_load_checkpoint``, for one run.

    Lightning reads a checkpoint only after every ``setup`` ran and loads its weights right after the
    LightningModule's ``on_load_checkpoint``, so a callback that changes the network's structure must
    rebuild it there. :meth:`install` wraps the hook on the instance (the class is not touched);
    :meth:`remove`, called from ``teardown``, puts the class's hook back.
    """

    def __init__(self) -> None:
        self._installed: tuple[pl.LightningModule, Callable[[dict[str, Any]], None]] | None = None

    def install(self, pl_module: pl.LightningModule, restore: Callable[[dict[str, Any]], None]) -> None:
        """Call ``restore(checkpoint)`` before ``pl_module``'s own ``on_load_checkpoint``; once per module."""
        if self._installed is not None and self._installed[0] is pl_module:
            return
        original = pl_module.on_load_checkpoint

        def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
            restore(checkpoint)
            original(checkpoint)

        pl_module.on_load_checkpoint = on_load_checkpoint  # type: ignore[method-assign]
        self._installed = (pl_module, on_load_checkpoint)

    def remove(self) -> None:
        """Undo :meth:`install`, unless something wrapped the hook again since."""
        if self._installed is None:
            return
        pl_module, wrapper = self._installed
        if pl_module.__dict__.get("on_load_checkpoint") is wrapper:
            del pl_module.__dict__["on_load_checkpoint"]
        self._installed = None


@contextlib.contextmanager
def training_mode(module: nn.Module, mode: bool) -> Iterator[nn.Module]:
    """Put ``module`` in train (``True``) or eval (``False``) mode for the block, then back in its own mode.

    Example::

        >>> net = nn.Dropout()
        >>> with training_mode(net, False):
        ...     net.training
        False
        >>> net.training
        True
    """
    was_training = module.training
    module.train(mode)
    try:
        yield module
    finally:
        module.train(was_training)


def inputs_from_batch(batch: Any) -> Tensor:
    """Pick the model input out of a training batch.

    The layouts understood are a tensor, a ``(input, target, ...)`` tuple or list, and a mapping
    with one of the keys ``x``, ``input``, ``inputs``, ``image``, ``images`` or ``pixel_values``.
    Any other layout should pass example inputs to the callback explicitly.

    Raises:
        RuntimeError: if no input tensor can be found in the batch.
    """
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Mapping):
        for key in _BATCH_INPUT_KEYS:
            if isinstance(batch.get(key), Tensor):
                return batch[key]
    elif isinstance(batch, Sequence) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    raise RuntimeError(
        f"Could not find the input tensor in a training batch of type {type(batch).__name__}. Batches are"
        f" read as a tensor, an (input, target) sequence or a mapping with one of the keys {_BATCH_INPUT_KEYS};"
        " for another layout pass `example_input_shape` to the callback."
    )


def labels_from_batch(batch: Any) -> Tensor:
    """Pick the class labels out of a batch: the second item of a sequence, or a mapping's ``y``, ``label``,
    ``labels``, ``target`` or ``targets``.

    Raises:
        RuntimeError: if no label tensor can be found in the batch.
    """
    if isinstance(batch, Mapping):
        for key in _BATCH_LABEL_KEYS:
            if isinstance(batch.get(key), Tensor):
                return batch[key]
    elif isinstance(batch, Sequence) and len(batch) >= 2 and isinstance(batch[1], Tensor):
        return batch[1]
    raise RuntimeError(
        f"Could not find the labels in a batch of type {type(batch).__name__}. Batches are read as an"
        f" (input, target) sequence or a mapping with one of the keys {_BATCH_LABEL_KEYS}."
    )


#: Samples in an example batch: two, so that ``torch.export`` keeps the batch dimension dynamic.
EXAMPLE_BATCH = 2


def make_example(
    shape: Sequence[int], dtype: str | torch.dtype = "torch.float32", device: torch.device | str = "cpu"
) -> Tensor:
    """The package's one stand-in for a network's input: a fixed normal sample (integers: zeros).

    Callbacks trace, rebuild and export networks on it when only the input's shape and dtype are known
    (from an argument or a checkpoint). It is the same tensor every time and draws nothing from the global
    random generator, so that rebuilding or exporting never changes a run's random stream; integer inputs
    are zeros, valid indices for an embedding.

    Raises:
        ValueError: for a dtype name torch does not have.

    Example::

        >>> torch.equal(make_example([2, 3]), make_example([2, 3])), make_example([1, 2], "torch.int64")
        (True, tensor([[0, 0]]))
    """
    torch_dtype = (
        dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype).rsplit(".", 1)[-1], None)
    )
    if not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"Expected a torch dtype name such as 'torch.float32', got {dtype!r}.")
    if not torch_dtype.is_floating_point:
        return torch.zeros(*shape, dtype=torch_dtype, device=device)
    generator = torch.Generator().manual_seed(0)
    return torch.randn(*shape, generator=generator, dtype=torch_dtype).to(device)


def example_from_batch(batch: Any) -> Tensor:
    """The example inputs taken from a training batch: its first :data:`EXAMPLE_BATCH` samples, detached."""
    return inputs_from_batch(batch)[:EXAMPLE_BATCH].detach()


def declared_example_input(module: nn.Module) -> Tensor | None:
    """A module's ``example_input_array`` as the one input tensor the package traces networks with.

    A one-item tuple, list or mapping is unwrapped. ``None`` when the module declares none.

    Raises:
        TypeError: if it declares several inputs (a tuple, list or mapping for a ``forward`` with more than one
            argument) or something that is not a tensor.
    """
    declared = getattr(module, "example_input_array", None)
    if isinstance(declared, (tuple, list)) and len(declared) == 1:
        declared = declared[0]
    elif isinstance(declared, Mapping) and len(declared) == 1:
        declared = next(iter(declared.values()))
    if declared is None or isinstance(declared, Tensor):
        return declared
    what = (
        f"a {type(declared).__name__} of {len(declared)}"
        if isinstance(declared, (tuple, list, Mapping))
        else (f"a {type(declared).__name__}")
    )
    raise TypeError(
        f"Expected `{type(module).__name__}.example_input_array` to be one input tensor, got {what}. The"
        " package's callbacks trace, prune and quantize networks whose forward takes one image tensor; wrap a"
        " network with several inputs so that it takes one, set `example_input_array` to that tensor, or pass"
        " the callback `example_input_shape=[...]`."
    )


def example_inputs(
    pl_module: pl.LightningModule,
    *,
    device: torch.device,
    shape: Sequence[int] | None = None,
    recorded: tuple[Sequence[int], str] | None = None,
    whole_network: bool = True,
    batch: Any = None,
) -> Tensor | None:
    """The example inputs a callback traces its network with, by the one precedence rule of the package.

    An explicit ``shape`` (the callback's ``example_input_shape``) first, then the ``(shape, dtype)`` a
    checkpoint ``recorded``, then, for a network that takes the LightningModule's own inputs
    (``whole_network``), its ``example_input_array`` and the first samples of a training ``batch``.
    ``None`` when none of them is known yet.
    """
    if shape is not None:
        return make_example(shape, device=device)
    if recorded is not None:
        return make_example(*recorded, device=device)
    if whole_network:
        declared = declared_example_input(pl_module)
        if declared is not None:
            return declared.to(device)
        if batch is not None:
            return example_from_batch(batch).to(device)
    return None


def peek_training_inputs(trainer: pl.Trainer) -> Tensor | None:
    """The example inputs of the first training batch, read without changing what training will see.

    Meant for ``on_train_start`` (the training dataloader exists, no batch was drawn yet). The random
    states a sampler or transform may consume (torch, NumPy, Python) are put back, so the run's batches and
    a resumed run's batches are those they would have been. ``None`` if there is no dataloader.
    """
    loader = trainer.train_dataloader
    if isinstance(loader, Mapping):
        loader = next(iter(loader.values()), None)
    elif isinstance(loader, Sequence):
        loader = loader[0] if loader else None
    if loader is None:
        return None
    python_state = random.getstate()
    numpy_state = _numpy_random_state()
    try:
        with torch.random.fork_rng(devices=[]):
            batch = next(iter(loader))
    except StopIteration:
        return None
    finally:
        random.setstate(python_state)
        if numpy_state is not None:
            import numpy

            numpy.random.set_state(numpy_state)
    return example_from_batch(batch)


def _numpy_random_state() -> Any:
    try:
        import numpy
    except ImportError:  # numpy is optional for torch
        return None
    return numpy.random.get_state()


def copy_network(network: nn.Module) -> nn.Module:
    """A deep copy of ``network`` for a trial run, eager even if it was compiled; the Trainer is not copied."""
    memo: dict[int, Any] = {}
    for module in network.modules():
        for attr in ("_trainer", "_fabric"):
            owner = module.__dict__.get(attr)
            if owner is not None:
                memo[id(owner)] = owner
    trial = copy.deepcopy(network, memo)
    for module in trial.modules():
        # Lightning's `from_compiled` wraps the original's bound hooks, which a copy cannot rebind: the copy
        # runs its own (eager) methods.
        context = module.__dict__.pop("_compiler_ctx", None)
        if isinstance(context, Mapping):
            for key in context:
                if key.startswith("original_"):
                    module.__dict__.pop(key.removeprefix("original_"), None)
    return trial


class TimeLimitExceeded(RuntimeError):
    """A step given a time limit by :func:`time_limit` ran past it."""


@contextlib.contextmanager
def time_limit(seconds: float | None, what: str) -> Iterator[None]:
    """Interrupt the block with :class:`TimeLimitExceeded` after ``seconds`` of wall-clock time.

    Uses ``SIGALRM``, so it limits only pure-Python work on the main thread of a POSIX process; elsewhere
    (or with ``seconds=None``) the block runs unlimited.
    """
    usable = (
        seconds is not None
        and hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
    )
    if not usable:
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise TimeLimitExceeded(f"{what} did not finish within {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, float(seconds))  # type: ignore[arg-type]
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def init_arguments(hparams: Mapping[str, Any] | None) -> dict[str, Any]:
    """The constructor arguments among a checkpoint's ``hyper_parameters``.

    LightningCLI records its own keys (``_instantiator``, ``_class_path``) beside the arguments.

    Example::

        >>> init_arguments({"width": 8, "_instantiator": "lightning.pytorch.cli.instantiate_module"})
        {'width': 8}
    """
    return {str(k): v for k, v in (hparams or {}).items() if not str(k).startswith("_")}


def required_init_parameters(cls: type) -> list[str]:
    """The names of the ``__init__`` parameters of ``cls`` that have no default (``self`` and ``*args`` aside).

    Example::

        >>> class Net:
        ...     def __init__(self, width, depth=2, *args, **kwargs): ...
        >>> required_init_parameters(Net)
        ['width']
    """
    parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]  # type: ignore[misc]
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return [p.name for p in parameters if p.default is inspect.Parameter.empty and p.kind not in variadic]


#: The module's hooks that may build its network after the callbacks' ``setup``, in the order Lightning calls them.
_LATE_BUILD_HOOKS = ("setup", "configure_sharded_model", "configure_model")


def late_build_hooks(pl_module: pl.LightningModule) -> list[str]:
    """The hooks of :data:`_LATE_BUILD_HOOKS` that the module overrides, in Lightning's order."""
    return [hook for hook in _LATE_BUILD_HOOKS if is_overridden(hook, pl_module)]


def network_built_later(pl_module: pl.LightningModule) -> bool:
    """Whether the module overrides a hook that may build its network after the callbacks' ``setup``.

    Lightning calls the module's own ``setup``, then ``configure_model``, after every callback's ``setup``
    and before it restores a checkpoint, so callbacks resolve layer names of such a module at
    ``on_fit_start`` (or when the checkpoint is restored) instead.
    """
    return bool(late_build_hooks(pl_module))


def forward_network(pl_module: pl.LightningModule) -> nn.Module | None:
    """The single child module of a LightningModule that only wraps one network, else ``None``."""
    children = [m for m in pl_module.children() if any(p.requires_grad for p in m.parameters())]
    return children[0] if len(children) == 1 else None


def device_of(module: nn.Module, fallback: nn.Module | None = None) -> torch.device:
    """The device of ``module``'s first parameter or buffer, else ``fallback.device``, else the CPU."""
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        return tensor.device
    device = getattr(fallback, "device", None)
    return device if isinstance(device, torch.device) else torch.device("cpu")


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer behind a ``LightningOptimizer``."""
    return getattr(optimizer, "_optimizer", optimizer)


@dataclass
class TrainingStateSnapshot:
    """Optimizer and scheduler state captured before a structural change of the network.

    After parameters were replaced, :meth:`restore_` rebuilds the optimizers from
    ``configure_optimizers``, puts back each param group's current hyperparameters (the learning
    rate a scheduler has decayed to), the schedulers' positions, and the optimizer state of every
    parameter whose name and shape survived the change. State of resized parameters starts afresh.
    """

    param_groups: list[list[dict[str, Any]]] = field(default_factory=list)
    scheduler_states: list[dict[str, Any]] = field(default_factory=list)
    state_by_name: list[dict[str, dict[str, Any]]] = field(default_factory=list)

    @classmethod
    def capture(cls, trainer: pl.Trainer, pl_module: pl.LightningModule) -> TrainingStateSnapshot:
        names = {id(p): n for n, p in pl_module.named_parameters()}
        snapshot = cls()
        for opt in map(unwrap_optimizer, trainer.optimizers):
            snapshot.param_groups.append(
                [{k: v for k, v in group.items() if k != "params"} for group in opt.param_groups]
            )
            by_name: dict[str, dict[str, Any]] = {}
            for group in opt.param_groups:
                for p in group["params"]:
                    if p in opt.state and id(p) in names:
                        by_name[names[id(p)]] = {
                            "shape": tuple(p.shape),
                            "state": {k: v for k, v in opt.state[p].items()},
                        }
            snapshot.state_by_name.append(by_name)
        snapshot.scheduler_states = [cfg.scheduler.state_dict() for cfg in trainer.lr_scheduler_configs]
        return snapshot

    def restore_(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Rewrap DDP, rebuild optimizers and schedulers, then carry the captured state over."""
        strategy = trainer.strategy
        if isinstance(strategy.model, DistributedDataParallel):
            # The old wrapper holds buckets of the replaced parameters.
            strategy.model = strategy._setup_model(pl_module)  # type: ignore[attr-defined]
            register_hooks = getattr(strategy, "_register_ddp_hooks", None)
            if register_hooks is not None:
                register_hooks()
        strategy.setup_optimizers(trainer)
        params = dict(pl_module.named_parameters())
        for opt, groups, by_name in zip(
            map(unwrap_optimizer, strategy.optimizers), self.param_groups, self.state_by_name
        ):
            if len(groups) == len(opt.param_groups):
                for new_group, old_group in zip(opt.param_groups, groups):
                    new_group.update({k: v for k, v in old_group.items() if k in new_group})
            for name, saved in by_name.items():
                param = params.get(name)
                if param is not None and tuple(param.shape) == saved["shape"]:
                    opt.state[param] = {
                        k: v.to(param.device) if isinstance(v, Tensor) else v
                        for k, v in saved["state"].items()
                    }
        for cfg, state in zip(trainer.lr_scheduler_configs, self.scheduler_states):
            cfg.scheduler.load_state_dict(state)


def optimizer_parameters(trainer: pl.Trainer) -> list[Tensor]:
    """Every parameter held by the Trainer's optimizers, in order."""
    return [
        p for opt in map(unwrap_optimizer, trainer.optimizers) for g in opt.param_groups for p in g["params"]
    ]


def close_process_group() -> None:
    """Destroy the default ``torch.distributed`` process group, if one is up, before the process exits.

    A process that leaves a gloo process group to the interpreter's shutdown can abort with
    ``terminate called without an active exception`` (gloo's worker threads outlive Python), and a
    finished DDP run then exits with SIGABRT. Call this once per process after a *successful* run:
    after a failure other ranks may still wait in a collective, and destroying the group could hang.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_tensors_(module: nn.Module) -> None:
    """Copy global rank zero's parameters and buffers of ``module`` into every rank's (no-op without DDP).

    For state that each rank computed from its own data, such as the activation ranges of fake-quant
    observers, right before it is baked into a program that every rank must share bit for bit.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=0)


def refuse_spawning_strategy(trainer: pl.Trainer, stage: str, why: str) -> None:
    """Raise if ``fit`` would run in spawned worker processes (``ddp_spawn``, ``ddp_fork``, notebooks).

    Lightning copies the weights trained in the workers back into the main process's model, which still
    has the original structure; ``why`` says what cannot hold them.
    """
    from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

    launcher = getattr(trainer.strategy, "launcher", None)
    if stage == "fit" and isinstance(launcher, _MultiProcessingLauncher):
        raise ValueError(
            "Expected a `strategy` that does not spawn worker processes (e.g. 'ddp'), got one with the"
            f" {launcher._start_method!r} start method ('ddp_spawn', 'ddp_fork', 'ddp_notebook'): Lightning"
            f" copies the trained weights back into the main process's {why}."
        )


def reset_monitors(trainer: pl.Trainer) -> None:
    """Restart EarlyStopping patience and ModelCheckpoint's best-model tracking (the model just changed)."""
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    for cb in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(cb, EarlyStopping):
            cb.wait_count = 0
            cb.best_score = torch.tensor(math.inf if cb.monitor_op == torch.lt else -math.inf)
        elif isinstance(cb, ModelCheckpoint) and cb.monitor is not None:
            cb.best_k_models = {}
            cb.kth_best_model_path = ""
            cb.best_model_score = None
            cb.best_model_path = ""
            cb.kth_value = torch.tensor(math.inf if cb.mode == "min" else -math.inf)


# ------------------------------------------------------------------ phases of a longer job


def completed_epochs(checkpoint_path: str | os.PathLike[str]) -> int:
    """Training epochs whose batches were all trained when the checkpoint was written.

    The epoch checkpoint is written at the end of validation, before the fit loop counts its epoch as
    "completed"; "processed" already counts it (and a checkpoint of the final epoch is a finished fit).
    """
    checkpoint = read_checkpoint(checkpoint_path, what="the phase's last checkpoint")
    try:
        return int(checkpoint["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"])
    except (KeyError, TypeError, ValueError):
        return int(checkpoint.get("epoch", 0))


class PhaseProgress(pl.Callback):
    """Prints the estimated time left in a phase after each training epoch (rank zero)."""

    def __init__(self, label: str, say: Callable[[str], None]) -> None:
        self.label = label
        self.say = say
        self._start = 0.0
        self._first_epoch = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.monotonic()
        self._first_epoch = trainer.current_epoch

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        done = trainer.current_epoch + 1 - self._first_epoch
        left = (trainer.max_epochs or 0) - trainer.current_epoch - 1
        per_epoch = (time.monotonic() - self._start) / max(done, 1)
        self.say(
            f"[{self.label}] epoch {trainer.current_epoch + 1}/{trainer.max_epochs} done;"
            f" about {per_epoch * left:.0f}s left in this phase"
        )

"""The pipeline's configuration: typed sections read from YAML, checked key by key.

Every section rejects unknown keys with the list of valid ones, and component arguments are checked
against the component's constructor, so a typo fails before any training starts.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import json
from collections.abc import Collection
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from lightning_hybridcomp._validation import is_int

__all__ = [
    "MOE_VARIANTS",
    "PHASE_TRAINER_ARGUMENTS",
    "PIPELINE_MOE_OPTIONS",
    "BaselineConfig",
    "ComponentConfig",
    "EvaluationConfig",
    "ExpertConfig",
    "MoEConfig",
    "MoERun",
    "PipelineConfig",
    "PipelineConfigError",
    "PipelineError",
    "load_pipeline_config",
    "parse_pipeline_config",
    "trainer_callbacks",
]


class PipelineError(RuntimeError):
    """A pipeline run cannot go on: a run directory of another configuration, or a phase that failed."""


class PipelineConfigError(ValueError):
    """Every problem found in a pipeline configuration, each with the YAML path of the value it is about.

    Attributes:
        problems: ``(yaml_path, message)`` pairs, e.g. ``("experts[2].pruning.start_epoch", "Expected ...")``.
        errors: the exceptions behind the problems, where each came from one (their tracebacks say where).
    """

    def __init__(self, problems: list[tuple[str, str]], *, errors: list[BaseException] | None = None) -> None:
        self.problems = list(problems)
        self.errors = list(errors or [])
        if len(self.problems) == 1:
            path, message = self.problems[0]
            text = f"{path}: {message}"
        else:
            lines = "".join(f"\n  {path}: {message}" for path, message in self.problems)
            text = (
                f"{len(self.problems)} problems in the pipeline configuration, found before training:{lines}"
            )
        super().__init__(text)


def _check_keys(section: str, given: dict[str, Any], valid: list[str]) -> None:
    unknown = sorted(set(given) - set(valid))
    if unknown:
        where = f"`{section}`" if section else "the pipeline config"
        raise ValueError(f"Unknown key(s) {unknown} in {where}. Valid keys: {valid}.")


def import_class(class_path: str, *, section: str) -> type:
    """Import ``package.module.Class``; errors name the section and the class path."""
    module_name, _, name = class_path.rpartition(".")
    if not module_name:
        raise ValueError(f"Expected `{section}.class_path` to be 'package.module.Class', got {class_path!r}.")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"Cannot import module {module_name!r} of `{section}.class_path` ({err}).") from err
    cls = getattr(module, name, None)
    if not isinstance(cls, type):
        public = [n for n, v in vars(module).items() if isinstance(v, type) and not n.startswith("_")]
        raise ValueError(
            f"Unknown component {name!r} in `{section}.class_path`: {module_name} has no such class."
            f" Classes there: {sorted(public)}."
        )
    return cls


def check_init_args(
    cls: type, init_args: dict[str, Any], *, section: str, owned: Collection[str] = ()
) -> None:
    """Reject keyword arguments that ``cls.__init__`` does not take, listing the ones it does.

    ``owned`` names arguments the caller sets itself: they are left out of the list.
    """
    params = inspect.signature(cls.__init__).parameters  # type: ignore[misc]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    valid = [n for n in params if n != "self" and n not in owned]
    _check_keys(section, init_args, valid)


@dataclass
class ComponentConfig:
    """A class given by import path with its constructor arguments, as in LightningCLI YAML."""

    class_path: str
    init_args: dict[str, Any] = field(default_factory=dict)

    def resolve(self, base: type, *, section: str) -> type:
        cls = import_class(self.class_path, section=section)
        if not issubclass(cls, base):
            raise ValueError(
                f"Expected `{section}.class_path` to name a subclass of {base.__name__}, got {self.class_path!r}."
            )
        check_init_args(cls, self.init_args, section=f"{section}.init_args")
        return cls

    def instantiate(self, base: type, *, section: str) -> Any:
        return self.resolve(base, section=section)(**self.init_args)


@dataclass
class BaselineConfig:
    """Phase 0: the uncompressed model.

    Attributes:
        model: the LightningModule to train (any class path; ``ImageClassifier`` by default).
        checkpoint: a Lightning checkpoint to start from instead of training (its weights must fit
            ``model``); ``max_epochs`` then fine-tunes it further when positive.
        max_epochs: training epochs.
    """

    model: ComponentConfig = field(
        default_factory=lambda: ComponentConfig(
            "lightning_hybridcomp.models.ImageClassifier",
            {"backbone": "small_cnn", "num_classes": 10, "in_channels": 1, "image_size": 16, "lr": 3e-3},
        )
    )
    checkpoint: str | None = None
    max_epochs: int = 10


@dataclass
class ExpertConfig:
    """Phase 1: one expert, a copy of the baseline put through pruning and then QAT.

    Attributes:
        name: folder and table name of the expert.
        pruning: ``StructuredPruning`` arguments, or ``None`` to skip pruning.
        quantization: ``QuantizationAwareTraining`` arguments, or ``None`` to keep fp32.
        max_epochs: fine-tuning epochs of this expert (pruning steps and QAT happen within them).
        seed: seed of this expert's fine-tuning (data order, random importance).
        lr: learning rate for the fine-tuning, overriding the baseline model's ``lr`` when set.
        distillation: ``KnowledgeDistillation`` arguments (``alpha``, ``temperature``; the teacher is the
            baseline), or ``None`` to fine-tune on the labels alone.
        emphasis: ``ClassEmphasis`` arguments (``classes``, ``weight``): the expert's training draws the
            samples of ``classes`` ``weight`` times as often as the others; ``None`` draws all alike.
    """

    name: str
    pruning: dict[str, Any] | None = None
    quantization: dict[str, Any] | None = None
    max_epochs: int = 6
    seed: int = 0
    lr: float | None = None
    distillation: dict[str, Any] | None = None
    emphasis: dict[str, Any] | None = None


#: How a MoE phase uses the experts: ``"frozen"`` routes the int8 expert artifacts as they are;
#: ``"tuned"`` fine-tunes each expert's fp32 network, in fake-quant form, on the samples routed to it and
#: converts it to int8 when the phase ends (complementary experts, ``MoELightningModule.quantize_experts``).
MOE_VARIANTS = ("frozen", "tuned")


@dataclass(frozen=True)
class MoERun:
    """One MoE phase: a ``top_k`` and a variant (one of :data:`MOE_VARIANTS`)."""

    k: int
    variant: str = "frozen"

    @property
    def label(self) -> str:
        """``k2`` for a frozen MoE, ``k2-tuned`` for a tuned one."""
        return f"k{self.k}" if self.variant == "frozen" else f"k{self.k}-{self.variant}"

    @property
    def key(self) -> str:
        """The phase (and folder) name, e.g. ``moe/k2-tuned``."""
        return f"moe/{self.label}"

    @property
    def name(self) -> str:
        """The report's row name, e.g. ``moe-k2-tuned``."""
        return f"moe-{self.label}"


@dataclass
class MoEConfig:
    """Phase 2: the Mixture of Experts over the experts, one run per ``top_k`` and variant.

    Attributes:
        top_k: the k values to train and report.
        max_epochs: gate training epochs.
        options: further ``MoELightningModule`` arguments (gate, coefficients, ...).
        variants: ``"frozen"`` (the int8 expert artifacts, as they are) and/or ``"tuned"`` (the experts
            fine-tuned on their routed samples in fake-quant form, then converted; needs every expert to
            use one PT2E QAT backend, ``x86_pt2e`` or ``xnnpack``).
        distillation: ``KnowledgeDistillation`` arguments (``alpha``, ``temperature``; the teacher is the
            baseline) for the MoE's training: the mixture learns from the baseline's soft targets too.
            ``None`` trains on the labels alone.
    """

    top_k: list[int] = field(default_factory=lambda: [1, 2])
    max_epochs: int = 6
    options: dict[str, Any] = field(default_factory=lambda: {"balance_coefficient": 0.05})
    variants: list[str] = field(default_factory=lambda: ["frozen"])
    distillation: dict[str, Any] | None = None

    def runs(self) -> list[MoERun]:
        """Every MoE phase, variant by variant, each at every ``top_k``."""
        return [MoERun(k, variant) for variant in self.variants for k in self.top_k]

    def training_top_k(self, k: int) -> int:
        """The ``top_k`` the MoE routed at ``k`` trains at: ``options["top_k"]``, else ``max(k, 2)``.

        The task loss tells a router which expert is better only through competing weights (k >= 2; at
        k = 1 it only rewards confidence in whatever won), so a top-1 MoE trains at k = 2 and routes at 1.
        """
        value = self.options.get("top_k")
        return value if is_int(value) else max(k, 2)  # a wrong value is refused with the options

    def eval_top_k(self, k: int) -> int | None:
        """The ``eval_top_k`` of the MoE routed at ``k``: ``options["eval_top_k"]``, else ``k``."""
        value = self.options.get("eval_top_k", k)
        return value if value is None or is_int(value) else k

    def trained_by(self, run: MoERun) -> MoERun:
        """The run whose training ``run`` shares: the first of :meth:`runs` of its variant and training ``top_k``.

        Runs that differ only in ``eval_top_k`` train the identical MoE (validation, the only place
        ``eval_top_k`` acts during a fit, decides nothing in a pipeline phase), so the later ones take the
        first one's training and route it at their own k. ``run`` itself when no earlier run shares it.

        Example::

            >>> moe = MoEConfig(top_k=[1, 2, 3], variants=["frozen"])
            >>> [moe.trained_by(run).label for run in moe.runs()]
            ['k1', 'k1', 'k3']
        """
        k = self.training_top_k(run.k)
        return next(r for r in self.runs() if r.variant == run.variant and self.training_top_k(r.k) == k)


def _expert_backends(config: PipelineConfig) -> list[str | None]:
    """Each expert's QAT backend (``QuantizationAwareTraining``'s default when unset), ``None`` for fp32."""
    return [
        None if e.quantization is None else str(e.quantization.get("backend", "x86_pt2e")).lower()
        for e in config.experts
    ]


def tuned_backend(config: PipelineConfig) -> str | None:
    """The one PT2E QAT backend every expert uses, which a ``"tuned"`` MoE fine-tunes them with, else ``None``."""
    from lightning_hybridcomp.callbacks.qat_backends import PT2E_BACKENDS  # torch: not at import time

    backends = set(_expert_backends(config))
    backend = backends.pop() if len(backends) == 1 else None
    return backend if backend in PT2E_BACKENDS else None


@dataclass
class EvaluationConfig:
    """Phase 3: how every model is measured on the test split.

    Attributes:
        latency_batch_sizes: the batch sizes timed (the report shows 1 and 64).
        repeats: timed forward passes per measurement (median reported).
        warmup: untimed calls first.
        compile: time ``torch.compile``-d programs (inductor freezing), where int8 kernels are fast.
        edge: export every model as an ExecuTorch ``.pte`` and time it at batch 1 (the edge column; needs
            the ``edge`` extra, and says once why it is skipped without it).
    """

    latency_batch_sizes: list[int] = field(default_factory=lambda: [1, 64])
    repeats: int = 20
    warmup: int = 5
    compile: bool = True
    edge: bool = True


def default_qat_backend() -> str:
    """The default experts' QAT backend: ``"xnnpack"`` (int8 programs for ExecuTorch, the edge runtime) when
    the ``edge`` extra is installed, else ``"x86_pt2e"`` (the report's edge column then says once why it is
    skipped)."""
    return "xnnpack" if importlib.util.find_spec("executorch") is not None else "x86_pt2e"


def _default_experts() -> list[ExpertConfig]:
    # Four differently compressed experts: different criteria, targets and seeds, each small enough that
    # two of them together cost well under half the baseline's MACs.
    qat = {"backend": default_qat_backend()}
    steps = {"iterative_steps": 2, "epochs_between_steps": 2}
    return [
        ExpertConfig(
            "l2-macs20", {"pruning_ratio": 0.8, "target": "macs", "importance": "l2", **steps}, qat, 8, seed=1
        ),
        ExpertConfig("lamp-60", {"pruning_ratio": 0.6, "importance": "lamp", **steps}, qat, 8, seed=2),
        ExpertConfig(
            "fpgm-macs15",
            {"pruning_ratio": 0.85, "target": "macs", "importance": "fpgm", **steps},
            qat,
            8,
            seed=3,
        ),
        ExpertConfig(
            "taylor-55",
            {"pruning_ratio": 0.55, "importance": "taylor", "start_epoch": 1, **steps},
            qat,
            8,
            seed=4,
        ),
    ]


#: ``Trainer`` arguments every phase sets itself, each with the reason.
PHASE_TRAINER_ARGUMENTS = {
    "max_epochs": "each phase trains for its own `max_epochs` (`baseline.max_epochs`, `experts[i].max_epochs`,"
    " `moe.max_epochs`)",
    "default_root_dir": "every phase writes into its folder under `run_dir`",
    "enable_checkpointing": "every phase checkpoints its last epoch, so that an interrupted run resumes",
}

#: ``MoELightningModule`` arguments the MoE phases set themselves, each with the reason.
PIPELINE_MOE_OPTIONS = {
    "experts": "the MoE routes the run's own `experts`",
    **dict.fromkeys(
        ("freeze_experts", "quantize_experts"),
        "`moe.variants` decides it ('frozen' routes the int8 experts as they are, 'tuned' fine-tunes them in"
        " fake-quant form and converts them)",
    ),
}


@dataclass
class PipelineConfig:
    """The whole run: data, baseline, experts, MoE, evaluation.

    Attributes:
        run_dir: folder of everything the run writes; re-running resumes from it.
        seed: global seed.
        data: the datamodule (any class path; the embedded digits by default).
        baseline: phase 0.
        experts: phase 1, one entry per expert (at least two: the MoE routes between them).
        moe: phase 2.
        evaluation: phase 3.
        trainer: extra ``Trainer`` arguments for every phase (``accelerator``, ``devices``,
            ``precision``, ``enable_progress_bar``, ``limit_train_batches``, ...); ``callbacks`` are
            ``class_path`` entries (or class paths), built anew for every phase and run after the phase's
            own; ``logger`` is ``true`` or ``false`` (every phase logs under ``run_dir/logs``). The
            arguments each phase sets itself (:data:`PHASE_TRAINER_ARGUMENTS`) are refused.
    """

    run_dir: str = "runs/pipeline"
    seed: int = 0
    data: ComponentConfig = field(
        default_factory=lambda: ComponentConfig(
            "lightning_hybridcomp.data.DigitsDataModule",
            {"batch_size": 64, "image_size": 16, "val_fraction": 0.15, "test_fraction": 0.3},
        )
    )
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    experts: list[ExpertConfig] = field(default_factory=_default_experts)
    moe: MoEConfig = field(default_factory=MoEConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    trainer: dict[str, Any] = field(default_factory=dict)

    def fingerprint(self) -> str:
        """Hash of everything that decides the results (``run_dir`` excluded)."""
        content = {k: v for k, v in asdict(self).items() if k != "run_dir"}
        return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_SECTIONS: dict[str, type] = {
    "baseline": BaselineConfig,
    "moe": MoEConfig,
    "evaluation": EvaluationConfig,
}


#: Mapping fields whose ``null`` means their default: an empty ``trainer``, the default MoE ``options``.
_NULL_IS_DEFAULT = frozenset({"trainer", "options"})


def _component(value: Any, section: str) -> ComponentConfig:
    if isinstance(value, str):
        return ComponentConfig(value)
    if not isinstance(value, dict):
        raise ValueError(
            f"Expected `{section}` to be a mapping with `class_path` and `init_args`, got {value!r}."
        )
    _check_keys(section, value, ["class_path", "init_args"])
    if "class_path" not in value:
        raise ValueError(f"Expected `{section}.class_path`, got only {sorted(value)}.")
    init_args = value.get("init_args") or {}
    if not isinstance(init_args, dict):
        raise ValueError(f"Expected `{section}.init_args` to be a mapping of arguments, got {init_args!r}.")
    return ComponentConfig(str(value["class_path"]), dict(init_args))


def _build(cls: type, value: Any, section: str) -> Any:
    if not isinstance(value, dict):
        raise ValueError(f"Expected `{section}` to be a mapping, got {value!r}.")
    names = [f.name for f in fields(cls)]
    _check_keys(section, value, names)
    kwargs: dict[str, Any] = {}
    for f in fields(cls):
        if f.name not in value:
            if f.default is MISSING and f.default_factory is MISSING:
                raise ValueError(f"Missing required key `{section}.{f.name}`.")
            continue
        item = value[f.name]
        if item is None and f.name in _NULL_IS_DEFAULT:
            continue  # `trainer: null` (as Lightning's printed configs write it) is the default
        if f.name in ("model", "data"):
            item = _component(item, f"{section}.{f.name}" if section else f.name)
        elif f.name in _SECTIONS and cls is PipelineConfig:
            item = _build(_SECTIONS[f.name], item, f.name)
        elif f.name == "experts" and cls is PipelineConfig:
            if not isinstance(item, list) or not item:
                raise ValueError(
                    f"Expected `experts` to be a non-empty list of expert entries, got {item!r}."
                )
            item = [_build(ExpertConfig, e, f"experts[{i}]") for i, e in enumerate(item)]
        kwargs[f.name] = item
    return cls(**kwargs)


def _not_a_mapping(arguments: Any, section: str, kind: str) -> list[tuple[str, str]]:
    """The problem of a component's ``arguments`` that are set but not a mapping (none when fine)."""
    if arguments is None or isinstance(arguments, dict):
        return []
    return [(f"{section}.{kind}", f"Expected `{kind}` to be a mapping of arguments, got {arguments!r}.")]


def _problems(config: PipelineConfig) -> list[tuple[str, str]]:
    """The inconsistent values of ``config``, each with its YAML path."""
    problems: list[tuple[str, str]] = []
    names = [e.name for e in config.experts]
    if len(set(names)) != len(names):
        problems.append(("experts", f"Expected unique expert names, got {names}."))
    if len(config.experts) < 2:
        problems.append(
            (
                "experts",
                f"Expected at least two experts, got {len(config.experts)}: the MoE phase routes between them"
                " (a single compressed model needs no gate; train it with `hybridcomp fit` and the callbacks).",
            )
        )
    for i, e in enumerate(config.experts):
        if (
            not isinstance(e.name, str)
            or not e.name
            or any(c in e.name for c in "/\\ ")
            or e.name.startswith(".")
        ):
            problems.append(
                (f"experts[{i}].name", f"Expected expert `name` to be a plain folder name, got {e.name!r}.")
            )
        for kind in ("pruning", "quantization", "distillation", "emphasis"):
            problems += _not_a_mapping(getattr(e, kind), f"experts[{i}]", kind)
        if isinstance(e.emphasis, dict) and not set(e.emphasis) <= {"classes", "weight"}:
            problems.append(
                (
                    f"experts[{i}].emphasis",
                    f"Expected `emphasis` to hold `classes` and optionally `weight`, got {sorted(e.emphasis)}"
                    " (its seed is the expert's `seed`).",
                )
            )
        if not is_int(e.max_epochs) or e.max_epochs < 1:
            problems.append(
                (f"experts[{i}].max_epochs", f"Expected `max_epochs` >= 1, got {e.max_epochs!r}.")
            )
    baseline = config.baseline
    if (
        not is_int(baseline.max_epochs)
        or baseline.max_epochs < 0
        or (baseline.max_epochs == 0 and not baseline.checkpoint)
    ):
        problems.append(
            (
                "baseline.max_epochs",
                "Expected `baseline.max_epochs` >= 1 (or 0 together with `baseline.checkpoint`), got"
                f" {baseline.max_epochs!r}.",
            )
        )
    top_k = config.moe.top_k
    if not isinstance(top_k, list) or not top_k or any(not is_int(k) or k < 1 for k in top_k):
        problems.append(
            ("moe.top_k", f"Expected `moe.top_k` to be a list of positive integers, got {top_k!r}.")
        )
    elif len(config.experts) >= 2 and max(top_k) > len(config.experts):
        problems.append(
            (
                "moe.top_k",
                f"Expected every `moe.top_k` to be at most the number of experts ({len(config.experts)}),"
                f" got {top_k}.",
            )
        )
    problems += _not_a_mapping(config.moe.distillation, "moe", "distillation")
    variants = config.moe.variants
    if (
        not isinstance(variants, list)
        or not variants
        or any(v not in MOE_VARIANTS for v in variants)
        or len(set(variants)) != len(variants)
    ):
        problems.append(
            (
                "moe.variants",
                f"Expected `moe.variants` to be a list of distinct values from {list(MOE_VARIANTS)}, got"
                f" {variants!r}.",
            )
        )
    elif "tuned" in variants and len(config.experts) >= 2 and tuned_backend(config) is None:
        problems.append(
            (
                "moe.variants",
                "Expected every expert to have `quantization` with one PT2E backend ('x86_pt2e' or 'xnnpack')"
                " for the 'tuned' MoE, which fine-tunes their fp32 networks in fake-quant form, got backends"
                f" {_expert_backends(config)}.",
            )
        )
    problems += _pipeline_owned(config.moe.options, "moe.options", PIPELINE_MOE_OPTIONS)
    problems += _trainer_problems(config.trainer)
    sizes = config.evaluation.latency_batch_sizes
    if not isinstance(sizes, list) or any(not is_int(b) or b < 1 for b in sizes):
        problems.append(
            (
                "evaluation.latency_batch_sizes",
                f"Expected positive `evaluation.latency_batch_sizes`, got {sizes}.",
            )
        )
    return problems


def _pipeline_owned(given: Any, section: str, owned: dict[str, str]) -> list[tuple[str, str]]:
    """The problems of a mapping of component arguments: not a mapping, or keys the pipeline sets itself."""
    if not isinstance(given, dict):
        return [(section, f"Expected `{section}` to be a mapping of arguments, got {given!r}.")]
    key = section.rpartition(".")[2]
    return [
        (
            f"{section}.{name}",
            f"Expected no `{name}` in `{key}`: {reason}.",
        )
        for name, reason in owned.items()
        if name in given
    ]


#: ``trainer`` keys whose ``null`` means "not given".
_TRAINER_NULL_IS_UNSET = frozenset({*PHASE_TRAINER_ARGUMENTS, "callbacks", "logger"})


def _given(trainer: dict[str, Any]) -> dict[str, Any]:
    """``trainer`` without the keys of :data:`_TRAINER_NULL_IS_UNSET` that are ``null`` (not given)."""
    return {k: v for k, v in trainer.items() if not (v is None and k in _TRAINER_NULL_IS_UNSET)}


def _trainer_problems(trainer: Any) -> list[tuple[str, str]]:
    """The problems of ``trainer``: the arguments a phase sets itself, ``callbacks`` and ``logger`` entries.

    A ``null`` value of those is "not given", as in the configurations Lightning prints.
    """
    if isinstance(trainer, dict):
        trainer = _given(trainer)
    problems = _pipeline_owned(trainer, "trainer", PHASE_TRAINER_ARGUMENTS)
    if not isinstance(trainer, dict):
        return problems
    if "logger" in trainer and not isinstance(trainer["logger"], bool):
        problems.append(
            (
                "trainer.logger",
                "Expected `trainer.logger` to be true or false (every phase logs CSV and TensorBoard under"
                f" `run_dir/logs`), got {trainer['logger']!r}.",
            )
        )
    callbacks = trainer.get("callbacks", [])
    if not isinstance(callbacks, list):
        problems.append(
            (
                "trainer.callbacks",
                "Expected `trainer.callbacks` to be a list of `class_path` entries (or class paths), got"
                f" {callbacks!r}.",
            )
        )
        return problems
    for i, entry in enumerate(callbacks):
        try:
            _component(entry, f"trainer.callbacks[{i}]")
        except ValueError as err:
            problems.append((f"trainer.callbacks[{i}]", str(err)))
    return problems


def _normalised_trainer(trainer: dict[str, Any]) -> dict[str, Any]:
    """``trainer`` as the phases use and fingerprint it: without "not given" values and empty ``callbacks``,
    each callback as ``{class_path, init_args}`` (a class path and its mapping then fingerprint alike)."""
    normalised = _given(trainer)
    callbacks = normalised.pop("callbacks", [])
    if callbacks:
        normalised["callbacks"] = [
            asdict(_component(entry, f"trainer.callbacks[{i}]")) for i, entry in enumerate(callbacks)
        ]
    return normalised


def trainer_callbacks(entries: list[Any], base: type, refused: dict[type, str] | None = None) -> list[Any]:
    """The callbacks of ``trainer.callbacks`` (``class_path`` entries or class paths), newly built.

    Each phase builds its own, so no state passes from one phase's Trainer to the next.

    Args:
        entries: the ``trainer.callbacks`` list.
        base: the class every entry must name a subclass of (Lightning's ``Callback``).
        refused: classes the phases add themselves where the configuration asks for them, each with where.

    Raises:
        PipelineConfigError: the first entry that cannot be built, under its YAML path.
    """
    from lightning.fabric.utilities.exceptions import MisconfigurationException  # lightning: not at import

    built = []
    for i, entry in enumerate(entries):
        section = f"trainer.callbacks[{i}]"
        try:
            component = _component(entry, section)
            cls = component.resolve(base, section=section)
            owner = next((where for kind, where in (refused or {}).items() if issubclass(cls, kind)), None)
            if owner is not None:
                raise ValueError(
                    f"Expected no {cls.__name__} in `trainer.callbacks`: the pipeline adds it to the phases that"
                    f" ask for it ({owner})."
                )
            built.append(cls(**component.init_args))
        except (ValueError, TypeError, MisconfigurationException) as err:  # a constructor's refusal
            raise PipelineConfigError([(section, " ".join(str(err).split()))]) from err
    return built


def parse_pipeline_config(raw: dict[str, Any] | None) -> PipelineConfig:
    """Build and check a :class:`PipelineConfig` from a plain mapping (``None`` gives the defaults).

    Raises:
        ValueError: for unknown keys (the message lists the valid ones), unknown components, arguments a
            component does not take, or an empty expert list (the first such error); a
            :class:`PipelineConfigError` listing every inconsistent value (fewer than two experts, a
            ``top_k`` above their number, ...) with its YAML path.

    Example::

        >>> parse_pipeline_config({"moe": {"top_k": [2]}}).moe.top_k
        [2]
    """
    config = _build(PipelineConfig, raw or {}, "")
    problems = _problems(config)
    if problems:
        raise PipelineConfigError(problems)
    config.trainer = _normalised_trainer(config.trainer)
    return config


def load_pipeline_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Read a pipeline YAML file (``None`` for the embedded default) and apply top-level overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError as err:
            raise ValueError(f"Expected `--config` to be an existing YAML file, got {str(path)!r}.") from err
        except yaml.YAMLError as err:
            raise ValueError(f"Could not parse the pipeline config {str(path)!r}: {err}") from err
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(
                f"Expected the pipeline config {str(path)!r} to be a mapping, got {type(loaded).__name__}."
            )
        raw = loaded or {}
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return parse_pipeline_config(raw)

"""What a pipeline run directory holds and what a run will do there: phase fingerprints and the plan.

Each phase is fingerprinted by exactly the configuration it depends on (its own settings and the
fingerprints of the phases it reads), so a re-run redoes only what changed and what follows from it.
Separate processes may share a run directory: shared files are written under file locks, atomically.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lightning_hybridcomp._io import file_lock, write_bytes_atomic
from lightning_hybridcomp.pipeline_config import (
    PipelineConfig,
    PipelineError,
    parse_pipeline_config,
)

__all__ = [
    "CONFIG_FILE",
    "DONE_FILE",
    "PHASE_FILE",
    "PhaseSpec",
    "PlannedPhase",
    "format_plan",
    "phase_lock",
    "phase_specs",
    "plan_phases",
    "plan_run",
    "prepare_run_dir",
    "read_json",
    "run_dir_problem",
    "select_phases",
    "write_json",
]

DONE_FILE = "done.json"
#: Written when a phase starts: the fingerprint its checkpoints belong to (a resume needs the same one).
PHASE_FILE = "phase.json"
CONFIG_FILE = "config.json"
_LOCKS = "locks"
_FORMAT = 2
_OWNED = (
    "baseline",
    "experts",
    "moe",
    "evaluation",
    "logs",
    "report.md",
    "results.json",
    "pareto.png",
    CONFIG_FILE,
)
#: Trainer options that change how a run looks, not what it computes: changing them redoes nothing.
_COSMETIC_TRAINER_OPTIONS = frozenset({"enable_progress_bar", "enable_model_summary", "log_every_n_steps"})


def write_json(path: Path, content: dict[str, Any]) -> None:
    write_bytes_atomic(path, json.dumps(content, indent=2, default=str).encode())


def read_json(path: Path) -> dict[str, Any] | None:
    """The mapping in ``path``, or ``None`` when it is missing or unreadable (a damaged marker is no marker)."""
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return content if isinstance(content, dict) else None


def _fingerprint(content: Any) -> str:
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class PhaseSpec:
    """One phase: its key (also its folder under the run directory), what it reads and what it depends on.

    Attributes:
        key: ``"baseline"``, ``"experts/<name>"``, ``"moe/k<k>"`` or ``"evaluation"``.
        label: how progress lines name it.
        inputs: the configuration the phase depends on, with the fingerprints of the phases it reads.
        upstream: keys of the phases it reads.
        epochs: its training epochs (for the time estimate).
        yaml_prefix: ``(input key, YAML path)`` to name a changed input as the YAML names it.
    """

    key: str
    label: str
    inputs: dict[str, Any]
    upstream: tuple[str, ...] = ()
    epochs: int = 0
    yaml_prefix: tuple[str, str] | None = None

    @property
    def fingerprint(self) -> str:
        return _fingerprint(self.inputs)


def _settings(section: Any, *, optional: tuple[str, ...], omitted: tuple[str, ...] = ()) -> dict[str, Any]:
    """A config section's fields for a fingerprint, less ``omitted`` and the ``optional`` ones left ``None``.

    Optional keys added after runs were made are left out while unset, so those runs' fingerprints, and
    their done phases, stay as they were.
    """
    return {
        k: v for k, v in asdict(section).items() if k not in omitted and not (k in optional and v is None)
    }


def phase_specs(config: PipelineConfig) -> list[PhaseSpec]:
    """The phases of ``config`` in running order, each fingerprinted by exactly what it depends on."""
    trainer = {k: v for k, v in config.trainer.items() if k not in _COSMETIC_TRAINER_OPTIONS}
    baseline = PhaseSpec(
        "baseline",
        "baseline",
        {
            "seed": config.seed,
            "data": asdict(config.data),
            "baseline": asdict(config.baseline),
            "trainer": trainer,
        },
        epochs=config.baseline.max_epochs,
    )
    experts = [
        PhaseSpec(
            f"experts/{e.name}",
            f"expert {i + 1}/{len(config.experts)} '{e.name}'",
            {"baseline": baseline.fingerprint, "expert": _settings(e, optional=("distillation", "emphasis"))},
            ("baseline",),
            e.max_epochs,
            ("expert", f"experts[{i}]"),
        )
        for i, e in enumerate(config.experts)
    ]
    routed = {"experts": {e.key: e.fingerprint for e in experts}, "expert_order": [e.key for e in experts]}
    moe_settings = _settings(config.moe, optional=("distillation",), omitted=("top_k", "variants"))
    # A distilled MoE learns from the baseline's artifact: it depends on the baseline phase.
    teacher = {} if config.moe.distillation is None else {"teacher": baseline.fingerprint}
    moe_upstream = ("baseline",) if teacher else ()
    moes: list[PhaseSpec] = []
    for run in config.moe.runs():
        label = f"MoE top-{run.k}" + ("" if run.variant == "frozen" else f" ({run.variant} experts)")
        source = config.moe.trained_by(run)
        if source != run:
            # The same training as an earlier phase's, routed at another k: that phase's MoE, re-routed.
            trained = next(m for m in moes if m.key == source.key)
            moes.append(
                PhaseSpec(
                    run.key,
                    f"{label}, the {source.key} training",
                    {"trained": trained.fingerprint, "eval_top_k": config.moe.eval_top_k(run.k)},
                    (source.key,),
                )
            )
            continue
        moes.append(
            PhaseSpec(
                run.key,
                label,
                # A frozen MoE's fingerprint is the same as before variants existed, so old runs stay done.
                {**routed, "top_k": run.k, "moe": moe_settings, **teacher}
                | ({} if run.variant == "frozen" else {"variant": run.variant}),
                (*moe_upstream, *(e.key for e in experts)),
                config.moe.max_epochs,
            )
        )
    evaluation = PhaseSpec(
        "evaluation",
        "evaluation",
        {
            "baseline": baseline.fingerprint,
            **routed,
            "moe": {m.key: m.fingerprint for m in moes},
            "evaluation": asdict(config.evaluation),
        },
        tuple(p.key for p in [baseline, *experts, *moes]),
    )
    return [baseline, *experts, *moes, evaluation]


def _changed(old: Any, new: Any, path: str = "") -> list[str]:
    """Dotted paths at which ``old`` and ``new`` differ (a key added or removed counts)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            out += _changed(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))
        return out
    return [] if old == new else [path or "(all)"]


@dataclass
class PlannedPhase:
    """What a run does with one phase: ``skip``, ``resume`` (from its last checkpoint), ``redo`` or ``run``."""

    spec: PhaseSpec
    action: str
    reason: str
    seen_done: dict[str, Any] | None = None


def _describe_change(spec: PhaseSpec, recorded: dict[str, Any]) -> str:
    inputs = recorded.get("inputs")
    if not isinstance(inputs, dict):
        return "configuration changed"
    paths = _changed(inputs, spec.inputs)
    if spec.yaml_prefix is not None:
        key, yaml_path = spec.yaml_prefix
        paths = [yaml_path + p[len(key) :] if p.split(".")[0] == key else p for p in paths]
    shown = ", ".join(paths[:4]) + (f" and {len(paths) - 4} more" if len(paths) > 4 else "")
    return f"configuration changed: {shown}"


def _recorded(record: dict[str, Any] | None, legacy: PhaseSpec | None) -> dict[str, Any] | None:
    """A marker with its fingerprint; a marker of the earlier format gets the one its configuration gives."""
    if record is None or "fingerprint" in record or legacy is None:
        return record
    return {**record, "fingerprint": legacy.fingerprint, "inputs": legacy.inputs}


def decide(
    spec: PhaseSpec,
    folder: Path,
    upstream_pending: Sequence[str],
    *,
    force: bool = False,
    legacy: PhaseSpec | None = None,
) -> PlannedPhase:
    """The action for one phase from what its folder holds and whether a phase it reads runs first.

    Args:
        spec: the phase.
        folder: its folder.
        upstream_pending: the phases it reads that run (again) before it.
        force: redo it whatever its folder holds.
        legacy: the phase as a run directory of the earlier format (one fingerprint per run) recorded it.
    """
    has_files = folder.is_dir() and any(folder.iterdir())
    done = _recorded(read_json(folder / DONE_FILE), legacy)
    started = read_json(folder / PHASE_FILE)
    if started is None and has_files and legacy is not None:
        started = {"fingerprint": legacy.fingerprint, "inputs": legacy.inputs}
    started = started or {}
    if force:
        return PlannedPhase(spec, "redo" if has_files else "run", "--force", done)
    if upstream_pending:
        more = ", ..." if len(upstream_pending) > 3 else ""
        reason = f"it reads {', '.join(upstream_pending[:3])}{more}, which run first"
        return PlannedPhase(spec, "redo" if has_files else "run", reason, done)
    if done is not None:
        if done.get("fingerprint") == spec.fingerprint:
            return PlannedPhase(spec, "skip", "finished earlier", done)
        return PlannedPhase(spec, "redo", f"its {_describe_change(spec, done)}", done)
    if started.get("fingerprint") == spec.fingerprint and (folder / "checkpoints" / "last.ckpt").is_file():
        return PlannedPhase(spec, "resume", "interrupted earlier; continues from its last checkpoint")
    if started and started.get("fingerprint") != spec.fingerprint:
        return PlannedPhase(
            spec, "redo", f"interrupted under another configuration ({_describe_change(spec, started)})"
        )
    return PlannedPhase(spec, "run", "not run yet")


def plan_phases(run_dir: Path, specs: Sequence[PhaseSpec], *, force: bool = False) -> list[PlannedPhase]:
    """The action for every phase, in running order; a phase that reads a phase that runs runs too.

    Only reads ``run_dir``. A run directory of the earlier format (one fingerprint for the whole run) is
    read with the phase fingerprints its recorded configuration gives.

    Raises:
        PipelineError: for a run directory of the earlier format whose configuration cannot be read.
    """
    stored = read_json(run_dir / CONFIG_FILE)
    legacy = _legacy_fingerprints(run_dir, stored) if stored and stored.get("format") != _FORMAT else {}
    plan: list[PlannedPhase] = []
    for spec in specs:
        pending = [p.spec.key for p in plan if p.spec.key in spec.upstream and p.action != "skip"]
        plan.append(decide(spec, run_dir / spec.key, pending, force=force, legacy=legacy.get(spec.key)))
    return plan


def select_phases(plan: list[PlannedPhase], only: Sequence[str]) -> list[PlannedPhase]:
    """The planned phases named by ``--only``; each needs every phase it reads finished already.

    Raises:
        ValueError: for a name that is no phase of the configuration (the message lists them).
        PipelineError: when a phase it reads is not finished with this configuration.
    """
    by_key = {p.spec.key: p for p in plan}
    unknown = [name for name in only if name.strip("/") not in by_key]
    if unknown:
        raise ValueError(
            f"Expected `--only` to name phases of this configuration, got {unknown}. Phases: {list(by_key)}."
        )
    selected = [p for p in plan if p.spec.key in {name.strip("/") for name in only}]
    for phase in selected:
        missing = [
            by_key[u] for u in phase.spec.upstream if by_key[u].action != "skip" and by_key[u] not in selected
        ]
        if missing:
            names = ", ".join(f"{p.spec.key} ({p.action}: {p.reason})" for p in missing[:3])
            raise PipelineError(
                f"`--only {phase.spec.key}` reads phases that are not finished with this configuration: {names}."
                f" Run them first (e.g. `--only {missing[0].spec.key}`, or the whole pipeline without --only)."
            )
    return selected


def plan_run(
    run_dir: Path, specs: Sequence[PhaseSpec], *, force: bool = False, only: Sequence[str] = ()
) -> list[PlannedPhase]:
    """The plan of one run: every phase, or the phases ``only`` names; ``force`` redoes those it runs.

    Raises:
        PipelineError: if ``run_dir`` cannot be created or written, or ``only`` names a phase whose inputs
            are not finished.
        ValueError: if ``only`` names no phase of the configuration.
    """
    problem = run_dir_problem(run_dir) or (None if force and not only else _foreign_files_problem(run_dir))
    if problem is not None:
        raise PipelineError(problem)
    plan = plan_phases(run_dir, specs, force=force and not only)
    if not only:
        return plan
    selected = {p.spec.key for p in select_phases(plan, only)}
    forced = plan_phases(run_dir, specs, force=True) if force else plan
    return [f for p, f in zip(plan, forced, strict=True) if p.spec.key in selected]


def format_plan(plan: Sequence[PlannedPhase]) -> str:
    width = max(len(p.spec.key) for p in plan)
    return "\n".join(f"  {p.action:<6}  {p.spec.key:<{width}}  {p.reason}" for p in plan)


@contextlib.contextmanager
def phase_lock(run_dir: Path, key: str) -> Iterator[None]:
    """Hold the lock of one phase: two processes never run, delete or finish the same phase at once."""
    with file_lock(run_dir / _LOCKS / f"{key}.lock"):
        yield


# ---------------------------------------------------------------------------------- the run directory


def run_dir_problem(run_dir: Path) -> str | None:
    """Why ``run_dir`` cannot be created or written, or ``None``; nothing is created."""
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    where = f"The run directory {str(run_dir)!r}"
    if not existing.is_dir():
        inside = "is" if existing == run_dir else f"would be inside {str(existing)!r}, which is"
        return (
            f"{where} {inside} a file, not a folder. Choose another --run_dir (or `run_dir` in the config)."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        inside = (
            "is not writable"
            if existing == run_dir
            else f"cannot be created: {str(existing)!r} is not writable"
        )
        return f"{where} {inside}. Choose a --run_dir you can write to (or `run_dir` in the config)."
    return None


def _foreign_files_problem(run_dir: Path) -> str | None:
    """Why a run may not write into ``run_dir`` without ``--force``: files but no pipeline run; else ``None``."""
    if read_json(run_dir / CONFIG_FILE) is not None or not run_dir.is_dir():
        return None
    if any(p.name != _LOCKS for p in run_dir.iterdir()):
        return (
            f"The run directory {str(run_dir)!r} is not empty and holds no pipeline run. Choose"
            " another --run_dir, or pass --force to use it anyway (only the pipeline's own files are"
            " replaced)."
        )
    return None


def _legacy_fingerprints(run_dir: Path, stored: dict[str, Any]) -> dict[str, PhaseSpec]:
    """The phase fingerprints of a run directory written with one fingerprint for the whole run."""
    try:
        old = parse_pipeline_config(stored["config"])
        if old.fingerprint() != stored.get("fingerprint"):
            raise ValueError("its fingerprint does not match its configuration")
    except (KeyError, TypeError, ValueError) as err:
        raise PipelineError(
            f"The run directory {str(run_dir)!r} was written with one fingerprint for the whole run, and its"
            f" configuration cannot be read to fingerprint each phase ({err}). Pass --force to redo everything"
            " there, or choose another --run_dir."
        ) from err
    return {spec.key: spec for spec in phase_specs(old)}


def _migrate(run_dir: Path, stored: dict[str, Any]) -> None:
    """Record each phase's fingerprint in a run directory of the earlier format, as its configuration gives it."""
    for key, spec in _legacy_fingerprints(run_dir, stored).items():
        folder = run_dir / key
        if not folder.is_dir():
            continue
        record = {"fingerprint": spec.fingerprint, "inputs": spec.inputs}
        if not (folder / PHASE_FILE).is_file():
            write_json(folder / PHASE_FILE, record)
        done = read_json(folder / DONE_FILE)
        if done is not None and "fingerprint" not in done:
            write_json(folder / DONE_FILE, {**done, **record})


def _prepare_locked(run_dir: Path, config: PipelineConfig, *, force: bool) -> None:
    marker = run_dir / CONFIG_FILE
    stored = read_json(marker)
    if force:
        for name in _OWNED:
            target = run_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    elif stored is not None and stored.get("format") != _FORMAT:
        _migrate(run_dir, stored)
    elif (problem := _foreign_files_problem(run_dir)) is not None:
        raise PipelineError(problem)
    phases = {spec.key: spec.fingerprint for spec in phase_specs(config)}
    write_json(
        marker,
        {
            "format": _FORMAT,
            "fingerprint": config.fingerprint(),
            "phases": phases,
            "config": config.to_dict(),
        },
    )


def prepare_run_dir(run_dir: Path, config: PipelineConfig, *, force: bool = False) -> None:
    """Create ``run_dir`` (or check an earlier run's), migrate the earlier format, record the configuration.

    ``force`` deletes the pipeline's own files there first (never other files). ``config.json`` holds the
    configuration of the latest run started there and the fingerprint of each of its phases.

    Raises:
        PipelineError: if ``run_dir`` cannot be created or written, holds files of something else, or is of
            the earlier format with a configuration that cannot be read.
    """
    problem = run_dir_problem(run_dir)
    if problem is not None:
        raise PipelineError(problem)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with file_lock(run_dir / _LOCKS / "run.lock"):
            _prepare_locked(run_dir, config, force=force)
    except OSError as err:
        raise PipelineError(
            f"The run directory {str(run_dir)!r} cannot be written ({err}). Choose a --run_dir you can write to."
        ) from err

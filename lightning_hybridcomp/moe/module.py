"""``MoELightningModule``: a learned top-k gate routing each image to a few whole-classifier experts.

Experts (modules, compressed ``*.pt2`` artifacts, ``*.ckpt`` checkpoints) become exported programs at
construction (:mod:`~lightning_hybridcomp.moe.experts`), so a trained MoE checkpoint reloads with
:func:`load_moe` or ``MoELightningModule.load_from_checkpoint`` without their classes or files.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.export import ExportedProgram
from typing_extensions import override

from lightning_hybridcomp._graph_passes import signed_int8_activations
from lightning_hybridcomp._io import read_checkpoint
from lightning_hybridcomp._lightning import (
    init_arguments,
    inputs_from_batch,
    labels_from_batch,
    training_mode,
)
from lightning_hybridcomp._validation import expect_bool, expect_int
from lightning_hybridcomp.artifacts import InferenceOnly, compile_artifact
from lightning_hybridcomp.moe._arguments import (
    check_expert_classes,
    check_expert_count,
    check_moe_arguments,
    check_top_k,
)
from lightning_hybridcomp.moe.checkpoint import (
    CHECKPOINT_KEY,
    check_same_experts,
    checkpoint_entry,
    read_expert_stage,
    read_moe_entry,
)
from lightning_hybridcomp.moe.dispatch import (
    BucketedExpert,
    DispatchResult,
    capacity_keep,
    dense_dispatch,
    log_mixture,
    sparse_dispatch,
)
from lightning_hybridcomp.moe.expert_tuning import ExpertStages, check_quantize_experts
from lightning_hybridcomp.moe.experts import (
    Expert,
    ExpertSource,
    build_expert,
    check_class_counts,
    load_expert_source,
    resolve_input_shape,
)
from lightning_hybridcomp.moe.gate import (
    GATE_CHOICES,
    ExpertFeatureGate,
    TopKGating,
    assignment_loss,
    balanced_assignment,
    build_gate,
    check_gate_options,
    dense_gates,
    feature_expert_index,
    gate_hyperparameters,
    importance_loss,
    load_balancing_loss,
    router_z_loss,
    routing_mask,
    top_k_gate,
    with_other_owners,
)
from lightning_hybridcomp.moe.metrics import RoutingStatistics
from lightning_hybridcomp.profiling import serialized_size

__all__ = ["DispatchResult", "MoELightningModule", "load_moe"]


class _Routed(NamedTuple):
    """One training-mode forward's routing: the decision, the clean router logits and the dispatch."""

    gating: TopKGating
    clean_logits: Tensor
    result: DispatchResult


class MoELightningModule(ExpertStages, pl.LightningModule):
    r"""Mixture of Experts over whole classifiers: a small gate picks the top-k experts for each image.

    Only the chosen experts run on an image (each expert runs once per batch, on exactly the samples
    routed to it), and their class probabilities are mixed by the gate weights. Training fits the gate
    (and, with ``freeze_experts=False``, the fp32 experts) on the negative log-likelihood of the mixture
    plus the auxiliary losses of :mod:`lightning_hybridcomp.moe.gate`, each logged on its own
    (``moe/loss/task``, ``moe/loss/balance``, ``moe/loss/importance``, ``moe/loss/z``).

    ``forward(x)`` returns the **log** of the mixed probabilities ``[B, num_classes]``: ``argmax`` is the
    prediction and ``exp`` the mixture. Outside training the mixture is normalised at every k
    (:func:`~lightning_hybridcomp.moe.dispatch.mix_expert_probabilities`: the kept gate weights are divided
    by their sum, so at ``k = 1`` it is the chosen expert's own distribution); in training, top-1 keeps the
    router's raw probability as the weight (Switch), so the training mixture sums to that probability.
    ``training_step`` computes its mixture through ``self(x)``, so callbacks that hook the module's forward
    see it: ``KnowledgeDistillation`` distills a teacher into the whole mixture (gate and tuned experts).

    Every expert becomes an exported program the MoE owns (:func:`~lightning_hybridcomp.moe.experts.build_expert`),
    run with eval semantics (BatchNorm on running statistics, no dropout) also while the gate trains.
    Checkpoints carry the serialized programs next to the ``state_dict``, so :func:`load_moe` and
    ``load_from_checkpoint(path)`` rebuild the MoE with ``torch.load(weights_only=True)`` and neither the
    expert files nor their classes. Resuming ``fit`` needs the MoE built from the same experts.

    Validation logs the figures of :class:`~lightning_hybridcomp.moe.metrics.RoutingStatistics` (reduced over
    all ranks, so every rank logs the same) as ``moe/<figure>``: ``moe/expected_macs``,
    ``moe/expert_load/{i}``, ``moe/routing_entropy``, ``moe/gate_entropy``, ``moe/dead_expert_share``,
    ``moe/dropped_fraction`` and ``moe/samples``, with ``val/acc`` and ``val/loss``; the test stage logs the
    same under ``moe/test/...`` and ``test/...``.

    Args:
        experts: at least two classifiers that map ``[B, *input_shape]`` images to ``[B, num_classes]``
            logits: ``nn.Module`` instances, ``torch.export.ExportedProgram``\ s, paths to compressed
            ``*.pt2`` artifacts (``lightning_hybridcomp.artifacts``), ``*.ckpt`` checkpoints of
            ``lightning_hybridcomp.models.ImageClassifier`` (pruned ones are rebuilt with their pruned
            structure) or :class:`~lightning_hybridcomp.moe.experts.ExpertSource` records (a program with
            its recorded figures, as :func:`load_moe` passes them). ``None`` only for
            ``load_from_checkpoint``, whose checkpoint supplies the experts.
        top_k: experts per image during training, from 1 to the number of experts.
        input_shape: image shape without the batch dimension, e.g. ``[1, 16, 16]``. Taken from the first
            artifact or checkpoint that records it when ``None``; required for module experts.
        gate: ``"cnn"`` (a :class:`~lightning_hybridcomp.moe.gate.GateNetwork` on the input),
            ``"expert:<index>"`` (linear heads on the frozen penultimate features of that expert: its graph
            is cut at the input of its last linear layer; the gate then costs about that expert's MACs, and
            the cut is not shared with the expert's own run), a :class:`~lightning_hybridcomp.moe.gate.Gate`
            such as a ``GateNetwork`` (used as it is; a ``GateNetwork`` is recorded as ``"cnn"`` with its
            width and input size), or an ``nn.Module`` returning ``[B, N]`` logits (or
            ``(logits, noise_logits)``), exported for checkpoints.
        gate_channels: filters of the first convolution of the ``"cnn"`` gate; only with ``gate="cnn"``.
        gate_input_size: downsample the input of the ``"cnn"`` gate to this side first, or ``None``; only
            with ``gate="cnn"``.
        freeze_experts: keep every expert frozen (default); ``False`` fine-tunes the fp32 ones (int8
            experts always stay frozen). Under DDP, fine-tuning needs ``find_unused_parameters=True``,
            because an expert that gets no sample of a batch has no gradient.
        quantize_experts: ``None`` (default), or the QAT backend (``"x86_pt2e"``, ``"xnnpack"``) that turns
            fp32 experts into fake-quant networks at ``setup("fit")`` (BatchNorm folded into the convolutions)
            and into int8 programs when ``fit`` ends (:mod:`~lightning_hybridcomp.moe.expert_tuning`). With
            ``freeze_experts=False`` each expert is then fine-tuned, in fake-quant form, on the samples the
            gate routes to it: complementary experts. Every expert must be fp32.
        balance_coefficient: :math:`\alpha` of the Switch load-balancing loss.
        importance_coefficient: weight of the CV\ :sup:`2` importance loss (0 turns it off).
        z_loss_coefficient: weight of the router z-loss.
        assignment_coefficient: weight of the router's cross-entropy towards a balanced assignment of each
            batch (:func:`~lightning_hybridcomp.moe.routing.balanced_assignment`; 0 turns it off).
        assignment_target: ``"hard"`` (default): each sample's target is the one expert it is assigned
            to; ``"soft"``: its Sinkhorn shares. The soft target cannot separate experts the router scores
            alike, and one of them is then never the top-1 choice (measured in the MoE guide). Both know
            nothing of the label; ``"oracle"`` gives each sample, among the experts that classify it right
            (where they disagree), the one the balanced partition prefers (:meth:`assignment_targets`): the
            router learns whom to trust, also at ``top_k=1``, at the cost of every expert running on every
            training sample (without gradient).
            ``"classes"`` gives each sample the expert whose ``expert_classes`` hold its label (balanced among
            several, the router's choice where none does): for experts that specialise in some classes, e.g.
            by a :class:`~lightning_hybridcomp.data.ClassEmphasis`, the router learns to recognise the
            specialist's part of the data, a coarser task than the classification itself. At ``top_k >= 2``
            the class's other specialists come second (:func:`~lightning_hybridcomp.moe.routing.with_other_owners`),
            so that a mixture of k experts puts them together.
        expert_classes: with ``assignment_target="classes"`` (and only then), one list of class indices per
            expert: the classes it specialises in.
        noisy_gating: add Shazeer's learned Gaussian noise to the router logits in training.
        capacity_factor: ``None`` (default) for no limit, else each expert takes at most
            ``ceil(capacity_factor * B * k / N)`` samples of a batch, keeping the highest gate weights;
            a dropped assignment contributes nothing (a sample with every choice dropped gets an all-zero
            mixture). Counted and logged; it makes outputs depend on the batch composition, so it is
            applied in training only unless ``capacity_in_eval=True``.
        capacity_in_eval: apply ``capacity_factor`` in validation, test and predict as well.
        eval_top_k: experts per image outside training (``None``: ``top_k``). The task loss tells the gate
            which expert is better only when ``k > 1`` (at ``k = 1`` the single weight has no competitor),
            so training at ``top_k=2`` and routing at ``eval_top_k=1`` is the way to a cheap top-1 router.
        learning_rate: Adam learning rate of the gate.
        expert_learning_rate: Adam learning rate of the experts that ``freeze_experts=False`` fine-tunes;
            ``None`` (default) is a tenth of ``learning_rate``: the experts arrive trained, and the gate's
            step undoes that training (measured in the MoE guide's "Complementary experts" section).
        weight_decay: Adam weight decay.

    Raises:
        ValueError: for fewer than two experts; ``top_k``/``eval_top_k`` outside ``[1, N]``; experts with
            different class counts or that reject ``input_shape`` (named); a negative coefficient; a
            missing expert file or an unsupported format; an unknown gate; ``gate_channels`` or
            ``gate_input_size`` with a gate other than ``"cnn"``; invalid sizes or factors.
        TypeError: for an expert of an unsupported type.

    Example::

        >>> experts = [nn.Sequential(nn.Flatten(), nn.Linear(64, 10)) for _ in range(3)]
        >>> moe = MoELightningModule(experts, top_k=2, input_shape=[1, 8, 8]).eval()
        >>> log_probs = moe(torch.randn(4, 1, 8, 8))
        >>> log_probs.shape, torch.allclose(log_probs.exp().sum(dim=-1), torch.ones(4))
        (torch.Size([4, 10]), True)
    """

    _class_experts: Tensor | None  # a buffer (assignment_target="classes"), set by `_build`

    def __init__(
        self,
        experts: Sequence[str | os.PathLike[str] | nn.Module | ExportedProgram | ExpertSource] | None = None,
        top_k: int = 2,
        input_shape: list[int] | None = None,
        gate: str | nn.Module | ExportedProgram = "cnn",
        gate_channels: int = 8,
        gate_input_size: int | None = None,
        freeze_experts: bool = True,
        quantize_experts: str | None = None,
        balance_coefficient: float = 1e-2,
        importance_coefficient: float = 0.0,
        z_loss_coefficient: float = 1e-3,
        assignment_coefficient: float = 1.0,
        assignment_target: str = "hard",
        expert_classes: Sequence[Sequence[int]] | None = None,
        noisy_gating: bool = True,
        capacity_factor: float | None = None,
        capacity_in_eval: bool = False,
        eval_top_k: int | None = None,
        learning_rate: float = 3e-3,
        expert_learning_rate: float | None = None,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        num_experts = check_moe_arguments(
            experts,
            top_k=top_k,
            eval_top_k=eval_top_k,
            coefficients={
                "balance_coefficient": balance_coefficient,
                "importance_coefficient": importance_coefficient,
                "z_loss_coefficient": z_loss_coefficient,
                "assignment_coefficient": assignment_coefficient,
                "weight_decay": weight_decay,
            },
            learning_rate=learning_rate,
            expert_learning_rate=expert_learning_rate,
            capacity_factor=capacity_factor,
            input_shape=input_shape,
            assignment_target=assignment_target,
            expert_classes=expert_classes,
        )
        expect_int(gate_channels, "gate_channels", low=1)
        quantize_experts = check_quantize_experts(quantize_experts)
        expect_int(gate_input_size, "gate_input_size", low=1, optional=True)
        # "module" names a gate module the checkpoint stores: only a checkpoint can supply it.
        if not (experts is None and gate == "module"):
            feature_expert_index(gate, num_experts)
        check_gate_options(gate, gate_channels=gate_channels, gate_input_size=gate_input_size)

        self.save_hyperparameters(ignore=["experts", "gate"])
        self.hparams.update(gate_hyperparameters(gate))
        self.hparams["quantize_experts"] = quantize_experts
        self.hparams["expert_classes"] = check_expert_classes(expert_classes, assignment_target, num_experts)
        self._expert_stage = "float"
        self.top_k = top_k
        self._eval_top_k = eval_top_k
        self.noisy_gating = bool(noisy_gating)
        self.capacity_factor = None if capacity_factor is None else float(capacity_factor)
        self.capacity_in_eval = bool(capacity_in_eval)
        self.balance_coefficient = float(balance_coefficient)
        self.importance_coefficient = float(importance_coefficient)
        self.z_loss_coefficient = float(z_loss_coefficient)
        self.assignment_coefficient = float(assignment_coefficient)
        self.assignment_target = assignment_target
        self.learning_rate = float(learning_rate)
        self.expert_learning_rate = (
            self.learning_rate / 10 if expert_learning_rate is None else float(expert_learning_rate)
        )
        self.weight_decay = float(weight_decay)
        self.routing_stats: dict[str, float] = {}
        self._records: list[Expert] = []
        self.experts = nn.ModuleList()
        self._gate_macs = 0
        self._gate_program: bytes | None = None
        # In a tuple, so that the compiled gate is not registered as a submodule (the state_dict stays).
        self._compiled_gate: tuple[nn.Module] | None = None
        # What the last training-mode forward routed, for `training_step`'s auxiliary losses.
        self._routed: _Routed | None = None
        if experts is None:
            # Built by `on_load_checkpoint` from the checkpoint's experts. In a tuple, because an nn.Module
            # attribute would register the gate module as a submodule of the unbuilt MoE.
            self._unbuilt_gate: tuple[str | nn.Module | ExportedProgram] = (gate,)
        else:
            self._build([load_expert_source(spec, i) for i, spec in enumerate(experts)], gate)

    # ------------------------------------------------------------------ construction

    def _build(self, sources: list[ExpertSource], gate: str | nn.Module | ExportedProgram) -> None:
        """Build the experts and the gate: from the constructor, or from a checkpoint's stored experts."""
        num_experts = len(sources)
        check_top_k(self.top_k, self.eval_top_k, num_experts)
        feature_expert_index(gate, num_experts)
        shape = resolve_input_shape(sources, self.hparams["input_shape"])
        if gate == "cnn" and len(shape) != 3:
            raise ValueError(
                f"Expected `input_shape` to be [channels, height, width] for gate='cnn', got {list(shape)}."
                f" Valid gate options: {GATE_CHOICES}."
            )
        self.hparams["input_shape"] = list(shape)
        self.example_input_array = torch.zeros(1, *shape)
        records = [build_expert(source, shape) for source in sources]
        self.num_classes = check_class_counts(records)
        self._set_class_experts(num_experts)

        freeze = bool(self.hparams["freeze_experts"])
        for record in records:
            record.module.requires_grad_(not freeze and not record.quantized)
        # With `quantize_experts`, int8 experts are the converted result of a tuned fit (a checkpoint being
        # loaded); fp32 ones are what it fine-tunes, and `setup("fit")` refuses int8 ones with its own message.
        warn_frozen = not freeze and self.hparams["quantize_experts"] is None
        if warn_frozen and any(r.quantized for r in records):
            rank_zero_info(
                "MoELightningModule: int8 experts stay frozen with `freeze_experts=False`: "
                + ", ".join(r.name for r in records if r.quantized)
            )
        self._set_records(records)

        built = build_gate(
            gate,
            records,
            shape,
            channels=self.hparams["gate_channels"],
            input_size=self.hparams["gate_input_size"],
        )
        self.gate = built.gate
        self._compiled_gate = None
        self._gate_macs = built.macs
        self._gate_program = built.program
        self._routing = RoutingStatistics([r.macs for r in records], built.macs)
        if warn_frozen and all(r.quantized for r in records):
            rank_zero_warn(
                "MoELightningModule: `freeze_experts=False` but no expert is trainable (all are int8)."
            )

    def _set_class_experts(self, num_experts: int) -> None:
        """``[num_classes, N]`` bool: which experts specialise in each class (``assignment_target="classes"``)."""
        classes = check_expert_classes(
            self.hparams["expert_classes"], self.hparams["assignment_target"], num_experts, self.num_classes
        )
        table = None
        if classes is not None:
            table = torch.zeros(self.num_classes, num_experts, dtype=torch.bool)
            for expert, group in enumerate(classes):
                table[group, expert] = True
        self.register_buffer("_class_experts", table, persistent=False)

    def _set_records(self, records: list[Expert]) -> None:
        self._records = records
        # Registers the records' graphs, so that parameters, devices and the state_dict follow them.
        self.experts = nn.ModuleList([r.module for r in records])

    def _require_built(self) -> None:
        if not self._records:
            raise RuntimeError(
                "This MoELightningModule was created without `experts`, which only a checkpoint supplies. Build"
                " it with `MoELightningModule(experts=[...])`, or load a trained one with"
                " `MoELightningModule.load_from_checkpoint(path)` or `load_moe(path)`."
            )

    # ------------------------------------------------------------------ properties

    @property
    def num_experts(self) -> int:
        return len(self._records)

    @property
    def expert_records(self) -> list[Expert]:
        """One :class:`~lightning_hybridcomp.moe.experts.Expert` per expert: its graph, program and figures."""
        return list(self._records)

    @property
    def expert_names(self) -> list[str]:
        """How each expert was given (index and path or class), for messages and reports."""
        return [r.name for r in self._records]

    @property
    def expert_macs(self) -> list[int]:
        """MACs per sample of each expert (artifact metadata, else ``profiling.count_macs``)."""
        return [r.macs for r in self._records]

    @property
    def expert_sizes(self) -> list[int]:
        """Bytes of each expert: the artifact's size when it records one, else its serialized program."""
        return [r.size_bytes for r in self._records]

    def total_params(self) -> int:
        """Parameter elements of all experts plus the gate's own (a feature gate's cut expert not twice)."""
        return sum(r.params for r in self._records) + sum(p.numel() for p in self._gate_own_parameters())

    def total_bytes(self) -> int:
        """Bytes of all experts (:attr:`expert_sizes`) plus the serialized gate's own weights."""
        own = {n: t for n, t in self.gate.state_dict().items() if not self._is_cut_expert(n)}
        return sum(self.expert_sizes) + serialized_size(own)

    def _gate_own_parameters(self) -> list[Tensor]:
        return [p for n, p in self.gate.named_parameters() if not self._is_cut_expert(n)]

    def _is_cut_expert(self, gate_key: str) -> bool:
        # A feature gate holds a copy of one expert's graph; it is counted with the experts.
        return isinstance(self.gate, ExpertFeatureGate) and gate_key.startswith("features.")

    def compile_experts_(self, *, gate: bool = True) -> MoELightningModule:
        """Compile every expert, and the gate, with ``torch.compile`` for fast inference, in place.

        Compiled parts are used outside training only and always run under ``torch.no_grad()``; training
        steps and :meth:`dense_reference` keep using the exported graphs and the gate's module, and the
        ``state_dict`` does not change. Experts compile with inductor freezing, which is what makes int8
        experts fast on CPU. Sub-batches are padded to buckets of 1, 2, 3, 4, 6, 8, 12, ... rows
        (:class:`~lightning_hybridcomp.moe.dispatch.BucketedExpert`), so each expert compiles once per bucket
        it meets (about ``2 log2(B)`` times for batches of ``B``) instead of once per sub-batch size. Experts
        quantized with XNNPACK's scheme (signed int8 activations), which inductor's x86 int8 kernels cannot
        run, stay eager (their ``compiled`` stays ``None``), and so does a gate on the features of one of them;
        ExecuTorch runs them fast. The gate compiles once for every batch size (a dynamic batch, without
        freezing: it reads its current weights).

        Args:
            gate: also compile the gate.

        Returns:
            The MoE itself.
        """
        self._require_built()
        expect_bool(gate, "gate")
        self._records = [
            r
            if signed_int8_activations(r.module)
            else replace(r, compiled=BucketedExpert(compile_artifact(r.module)))
            for r in self._records
        ]
        # A gate holding such a graph (`gate="expert:<i>"` on an XNNPACK int8 expert) stays eager as well.
        compile_gate = gate and not signed_int8_activations(self.gate)
        self._compiled_gate = (
            (InferenceOnly(torch.compile(self.gate, dynamic=True)),) if compile_gate else None
        )
        return self

    @property
    def gate_macs(self) -> int:
        """MACs per sample of the gate in eval mode (``profiling.count_macs``)."""
        return self._gate_macs

    @property
    def eval_top_k(self) -> int | None:
        """Experts per image outside training (``None``: ``top_k``); settable, e.g. to 1 after training at 2."""
        return self._eval_top_k

    @eval_top_k.setter
    def eval_top_k(self, value: int | None) -> None:
        if value is not None:
            check_expert_count(value, "eval_top_k", self.num_experts)
        self._eval_top_k = value
        self.hparams["eval_top_k"] = value  # so checkpoints and load_moe route the same way

    @property
    def active_top_k(self) -> int:
        """Experts per image in the current mode (``top_k`` in training, ``eval_top_k`` otherwise)."""
        if self.training or self.eval_top_k is None:
            return int(self.top_k)
        return int(self.eval_top_k)

    # ------------------------------------------------------------------ routing and dispatch

    def route(self, x: Tensor, k: int | None = None) -> tuple[TopKGating, Tensor]:
        """Run the gate: the routing decision and the clean router logits (noise only in training).

        Args:
            x: ``[B, *input_shape]`` images.
            k: experts per image, default :attr:`active_top_k`.

        Raises:
            RuntimeError: if the MoE was created without experts and no checkpoint supplied them.
        """
        self._require_built()
        gate = self.gate if self.training or self._compiled_gate is None else self._compiled_gate[0]
        logits, noise_std = gate(x)
        use_noise = self.training and self.noisy_gating and noise_std is not None
        gating = top_k_gate(
            logits, self.active_top_k if k is None else k, noise_std=noise_std if use_noise else None
        )
        return gating, logits

    def _capacity_keep(self, gating: TopKGating) -> Tensor | None:
        """``[B, k]`` bool mask of the assignments a capacity limit keeps, or ``None`` when none applies."""
        if self.capacity_factor is None or not (self.training or self.capacity_in_eval):
            return None
        return capacity_keep(gating, self.num_experts, self.capacity_factor)

    def dispatch(self, x: Tensor, gating: TopKGating) -> DispatchResult:
        """Sparse dispatch (:func:`~lightning_hybridcomp.moe.dispatch.sparse_dispatch`): each expert runs once,
        on exactly its samples; deterministic combine. Compiled experts run outside training.

        Args:
            x: ``[B, *input_shape]`` images.
            gating: the routing decision of :meth:`route`.
        """
        return sparse_dispatch(
            x,
            gating,
            self._expert_runners(),
            self.num_classes,
            self._capacity_keep(gating),
            normalise=not self.training,
        )

    def _expert_runners(self) -> list[Callable[[Tensor], Tensor]]:
        """The experts as the current mode runs them: compiled outside training where they were compiled."""
        return [r.module if self.training or r.compiled is None else r.compiled for r in self._records]

    def dense_reference(self, x: Tensor, gating: TopKGating, keep: Tensor | None = None) -> Tensor:
        """Reference for :meth:`dispatch`: run every expert on every sample and mask with the dense gates.

        Costs all experts on all samples; for tests and benchmarks.
        """
        return dense_dispatch(x, gating, list(self.experts), keep, normalise=not self.training)

    @override
    def forward(self, x: Tensor) -> Tensor:
        gating, clean_logits = self.route(x)
        result = self.dispatch(x, gating)
        # Kept for the step only from a training-mode forward: an eval forward leaves nothing stale.
        self._routed = _Routed(gating, clean_logits, result) if self.training else None
        return log_mixture(result.probs)

    # ------------------------------------------------------------------ training

    @override
    def setup(self, stage: str) -> None:
        self._require_built()
        if stage == "fit":
            self._prepare_experts_for_fit()

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = inputs_from_batch(batch), labels_from_batch(batch)
        # Through `self(x)`, so that hooks on the module's forward (KnowledgeDistillation) see the mixture.
        log_probs = self(x)
        routed, self._routed = self._routed, None
        if routed is None:
            raise RuntimeError("MoELightningModule.training_step needs the module in training mode.")
        gating, clean_logits, result = routed
        task = F.nll_loss(log_probs, y)
        mask = routing_mask(gating.indices, self.num_experts)
        balance = load_balancing_loss(gating.probs, mask, self.balance_coefficient)
        importance = importance_loss(dense_gates(gating), self.importance_coefficient)
        z_loss = router_z_loss(clean_logits, self.z_loss_coefficient)
        assignment = (
            assignment_loss(
                clean_logits, self.assignment_targets(x, y, clean_logits), self.assignment_coefficient
            )
            if self.assignment_coefficient > 0
            else clean_logits.new_zeros(())
        )
        loss = task + balance + importance + z_loss + assignment
        batch_size = x.shape[0]
        for key, value in (
            ("moe/loss/task", task),
            ("moe/loss/balance", balance),
            ("moe/loss/importance", importance),
            ("moe/loss/z", z_loss),
            ("moe/loss/assignment", assignment),
            ("train/loss", loss),
        ):
            self.log(key, value.detach(), on_step=True, on_epoch=True, batch_size=batch_size, sync_dist=True)
        if self.capacity_factor is not None:
            dropped = (~result.keep).sum().float()
            self.log(
                "moe/train/dropped", dropped, on_step=True, on_epoch=True, reduce_fx="sum", sync_dist=True
            )
        return loss

    @torch.no_grad()
    def assignment_targets(self, x: Tensor, y: Tensor, clean_logits: Tensor) -> Tensor:
        """``[B, N]`` one-hot (``"soft"``: Sinkhorn) targets of the router's assignment loss for a batch.

        ``"hard"`` and ``"soft"`` balance the router's own logits (:func:`balanced_assignment`); ``"classes"``
        balances them among the experts of each sample's class (``expert_classes``) and, at ``top_k >= 2``,
        ranks the class's other experts second (:func:`with_other_owners`: those rows are not one-hot).
        ``"oracle"``
        balances them among the experts that classify each sample right, where some expert does and not all
        do: the router's own partition where the experts agree, a right expert where they do not. The
        experts run on every sample for it, without gradient and in eval mode (as they are used: no dropout,
        and fake-quant experts keep their quantization ranges).

        Args:
            x: ``[B, *input_shape]`` images.
            y: ``[B]`` labels.
            clean_logits: ``[B, N]`` router logits without noise (:meth:`route`).
        """
        if self.assignment_target == "classes":
            if self._class_experts is None:
                raise RuntimeError(
                    "assignment_target='classes' needs the `expert_classes` of the constructor."
                )
            owners = self._class_experts[y]
            first = balanced_assignment(clean_logits, hard=True, allowed=owners)
            return first if self.top_k < 2 else with_other_owners(first, owners)
        if self.assignment_target != "oracle":
            return balanced_assignment(clean_logits, hard=self.assignment_target == "hard")
        with training_mode(self.experts, False):
            right = torch.stack([run(x).argmax(dim=-1) == y for run in self._expert_runners()], dim=1)
        return balanced_assignment(clean_logits, hard=True, allowed=right)

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        experts = {id(p) for p in self.experts.parameters()}
        trainable = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in trainable if id(p) not in experts], "lr": self.learning_rate},
            {"params": [p for p in trainable if id(p) in experts], "lr": self.expert_learning_rate},
        ]
        return torch.optim.Adam(
            [g for g in groups if g["params"]], lr=self.learning_rate, weight_decay=self.weight_decay
        )

    # ------------------------------------------------------------------ evaluation statistics

    def _update_routing(self, metric: RoutingStatistics, x: Tensor, y: Tensor | None) -> None:
        gating, _ = self.route(x)
        result = self.dispatch(x, gating)
        metric.update(gating.probs, gating.indices, result.counts, result.keep, log_mixture(result.probs), y)

    def _finish_routing(self, prefix: str, metric_prefix: str) -> dict[str, float]:
        """The epoch's figures under their logged names (all ranks together), and a fresh metric."""
        if self._routing.update_count == 0:
            return {}
        figures = self._routing.compute()
        self._routing.reset()
        stats = {f"{prefix}/acc": figures.pop("acc"), f"{prefix}/loss": figures.pop("loss")}
        loads = figures.pop("expert_load")
        stats.update({f"{metric_prefix}/{key}": value for key, value in figures.items()})
        stats.update({f"{metric_prefix}/expert_load/{i}": value for i, value in enumerate(loads)})
        return stats

    @torch.no_grad()
    def routing_statistics(self, x: Tensor, batch_size: int = 256) -> dict[str, Any]:
        """Routing figures of the current (evaluation) routing on the images ``x``, in this process only.

        Returns a dict with ``expected_macs``, ``expert_load`` (list, sums to 1), ``routing_entropy``,
        ``gate_entropy``, ``dead_expert_share``, ``dropped_fraction`` and ``samples``: the same figures
        validation logs, without accuracy and loss.

        Args:
            x: ``[n, *input_shape]`` images.
            batch_size: images routed at a time (a capacity limit applies per batch).
        """
        expect_int(batch_size, "batch_size", low=1)
        self._require_built()
        metric = RoutingStatistics(self.expert_macs, self.gate_macs, sync_on_compute=False).to(self.device)
        with training_mode(self, False):
            for chunk in x.split(batch_size):
                self._update_routing(metric, chunk.to(self.device), None)
        return {k: v for k, v in metric.compute().items() if k not in ("acc", "loss")}

    @torch.no_grad()
    def routing_headroom(self, x: Tensor, y: Tensor, batch_size: int = 256) -> dict[str, Any]:
        """How much accuracy routing can win with these experts, measured on the labelled images ``x``, ``y``.

        Every expert runs on every image (this costs all experts; for evaluation). Returns a dict with

        * ``accuracy``: the MoE's own, at its evaluation routing;
        * ``expert_accuracy``: each expert alone (list);
        * ``ensemble_accuracy``: the experts' probabilities averaged with equal weights (the cost of all N);
        * ``oracle_accuracy``: the share of images at least one expert classifies right, what a top-1 gate
          that always picks a right expert would reach: no routing at k = 1 exceeds it;
        * ``agreement``: the share of images on which every expert predicts the same class;
        * ``gate_hit_rate``: among the images some expert classifies right, the share whose top-1 expert
          (the gate's first choice) is one of them.

        With ``assignment_target="classes"`` it also returns

        * ``class_routing_accuracy``: among the images whose class some expert specialises in
          (``expert_classes``), the share whose top-1 expert is one of those specialists;
        * ``specialist_accuracy``: each expert alone on the images of its own classes (list; ``None`` for
          an expert none of whose classes occur in ``y``).

        Specialists no better on their classes than the uncompressed model is (compare
        ``specialist_accuracy`` with its accuracy on the same classes) bound the mixture below it, however
        well the router routes.

        An oracle close to the best expert means the experts err on the same images, so no gate can recover
        accuracy at k = 1; a low hit rate beside a high oracle means the gate does not tell which expert to
        trust.

        Args:
            x: ``[n, *input_shape]`` images.
            y: ``[n]`` class labels.
            batch_size: images evaluated at a time.

        Raises:
            ValueError: for labels that do not match the images.
        """
        expect_int(batch_size, "batch_size", low=1)
        self._require_built()
        if y.dim() != 1 or y.shape[0] != x.shape[0]:
            raise ValueError(
                f"Expected `y` to hold one label per image ({x.shape[0]}), got shape {tuple(y.shape)}."
            )
        expert_right = torch.zeros(self.num_experts, dtype=torch.long)
        counts = dict.fromkeys(("moe", "ensemble", "oracle", "agree", "hit", "owned", "to_owner"), 0)
        own_right = torch.zeros(self.num_experts, dtype=torch.long)
        own_seen = torch.zeros(self.num_experts, dtype=torch.long)
        with training_mode(self, False):
            runners = self._expert_runners()
            for chunk, labels in zip(x.split(batch_size), y.split(batch_size)):
                chunk, labels = chunk.to(self.device), labels.to(self.device)
                gating, _ = self.route(chunk)
                counts["moe"] += int(
                    (log_mixture(self.dispatch(chunk, gating).probs).argmax(-1) == labels).sum()
                )
                probs = torch.stack([run(chunk).float().softmax(dim=-1) for run in runners])  # [N, B, C]
                predictions = probs.argmax(dim=-1)
                right = predictions == labels  # [N, B]
                expert_right += right.sum(dim=1).cpu()
                first_choice = gating.indices[:, :1].T  # [1, B]
                first_choice_right = right.gather(0, first_choice).squeeze(0)
                counts["ensemble"] += int((probs.mean(dim=0).argmax(dim=-1) == labels).sum())
                counts["oracle"] += int(right.any(dim=0).sum())
                counts["agree"] += int((predictions == predictions[:1]).all(dim=0).sum())
                counts["hit"] += int(first_choice_right.sum())
                if self._class_experts is not None:
                    owners = self._class_experts[labels].T  # [N, B]: which experts own each image's class
                    counts["owned"] += int(owners.any(dim=0).sum())
                    counts["to_owner"] += int(owners.gather(0, first_choice).sum())
                    own_right += (right & owners).sum(dim=1).cpu()
                    own_seen += owners.sum(dim=1).cpu()
        n = max(int(x.shape[0]), 1)
        by_class = {}
        if self._class_experts is not None:
            by_class = {
                "class_routing_accuracy": counts["to_owner"] / max(counts["owned"], 1),
                "specialist_accuracy": [int(r) / int(s) if s else None for r, s in zip(own_right, own_seen)],
            }
        return {
            "accuracy": counts["moe"] / n,
            "expert_accuracy": [int(c) / n for c in expert_right],
            "ensemble_accuracy": counts["ensemble"] / n,
            "oracle_accuracy": counts["oracle"] / n,
            "agreement": counts["agree"] / n,
            "gate_hit_rate": counts["hit"] / max(counts["oracle"], 1),
            **by_class,
        }

    @override
    def on_validation_epoch_start(self) -> None:
        self._routing.reset()

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._update_routing(self._routing, inputs_from_batch(batch), labels_from_batch(batch))

    @override
    def on_validation_epoch_end(self) -> None:
        stats = self._finish_routing("val", "moe")
        if self.trainer.sanity_checking:
            return
        self._log_stats(stats)

    @override
    def on_test_epoch_start(self) -> None:
        self._routing.reset()

    @override
    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._update_routing(self._routing, inputs_from_batch(batch), labels_from_batch(batch))

    @override
    def on_test_epoch_end(self) -> None:
        self._log_stats(self._finish_routing("test", "moe/test"))

    def _log_stats(self, stats: dict[str, float]) -> None:
        self.routing_stats = stats
        for key, value in stats.items():
            # Values are already global (the metric reduced them); sync_dist only silences the epoch warning.
            self.log(key, value, sync_dist=True, prog_bar=key.endswith("/acc"))

    @override
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        return self(inputs_from_batch(batch)).exp()

    # ------------------------------------------------------------------ checkpoints

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._require_built()
        checkpoint[CHECKPOINT_KEY] = checkpoint_entry(
            self._records, self.num_classes, self._gate_macs, self._gate_program, self._expert_stage
        )

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        stage = read_expert_stage(checkpoint, "the checkpoint")
        if not self._records:
            # `load_from_checkpoint` built this MoE from the plain hyper-parameters: the checkpoint's own
            # programs are the experts (and the stored gate module, if the MoE was trained with one).
            stored = read_moe_entry(checkpoint, "the checkpoint")
            self._build(stored.experts, stored.gate_argument(self._unbuilt_gate[0], "The checkpoint"))
        self._refuse_converted_checkpoint(stage)
        check_same_experts(checkpoint, self._records)
        self._restore_expert_stage(stage)


def load_moe(path: str | os.PathLike[str], *, gate: nn.Module | None = None) -> MoELightningModule:
    """Rebuild a trained :class:`MoELightningModule` from its checkpoint, in eval mode.

    Needs neither the expert files nor the experts' classes: the experts come from the exported programs
    stored in the checkpoint, which is read with ``torch.load(weights_only=True)``. A checkpoint written
    mid-fit with ``quantize_experts`` holds fake-quant experts; :meth:`MoELightningModule.convert_experts_`
    makes them int8.
    ``MoELightningModule.load_from_checkpoint(path)`` builds the same MoE (in train mode, as Lightning does).

    Args:
        path: a checkpoint written by ``Trainer.save_checkpoint`` or ``ModelCheckpoint``.
        gate: the gate module, only needed when a user gate module could not be exported at training.

    Raises:
        ValueError: if the file is missing or is not a MoE checkpoint, or a needed gate module is missing.

    Example::

        >>> moe = load_moe("moe.ckpt")  # doctest: +SKIP
        >>> moe(images).argmax(dim=-1)  # doctest: +SKIP
    """
    path = Path(path)
    checkpoint = read_checkpoint(path, what="the MoE checkpoint `path`")
    where = repr(str(path))
    stored = read_moe_entry(checkpoint, where)
    hparams = init_arguments(checkpoint.get("hyper_parameters"))
    recorded = hparams.pop("gate", "cnn")
    gate_argument = stored.gate_argument(
        gate if gate is not None and recorded == "module" else recorded, where
    )
    model = MoELightningModule(stored.experts, gate=gate_argument, **hparams)
    model.on_load_checkpoint(checkpoint)
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()

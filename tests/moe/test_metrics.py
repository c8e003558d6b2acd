"""RoutingStatistics against a sample-by-sample reference, and its sums added up across processes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from lightning_hybridcomp.moe.metrics import RoutingStatistics

EXPERT_MACS = [100, 250, 40, 900]
GATE_MACS = 17


def _batch(seed: int, batch: int = 12, k: int = 2, classes: int = 5) -> dict[str, Tensor]:
    """One routed batch: expert 3 is never chosen (dead), a fifth of the assignments are dropped."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, len(EXPERT_MACS), generator=g)
    logits[:, 3] -= 50.0
    probs = logits.softmax(dim=-1)
    indices = probs.topk(k, dim=-1).indices
    keep = torch.rand(batch, k, generator=g) > 0.2
    return {
        "probs": probs,
        "indices": indices,
        "counts": torch.bincount(indices[keep], minlength=len(EXPERT_MACS)),
        "keep": keep,
        "log_probs": torch.randn(batch, classes, generator=g).log_softmax(dim=-1),
        "target": torch.randint(classes, (batch,), generator=g),
    }


def _concatenated(*batches: dict[str, Tensor]) -> dict[str, Tensor]:
    joined = {key: torch.cat([b[key] for b in batches]) for key in batches[0] if key != "counts"}
    return {**joined, "counts": sum(b["counts"] for b in batches)}


def _reference(batches: list[dict[str, Tensor]]) -> dict[str, object]:
    """The figures counted one sample and one assignment at a time, in plain Python."""
    n = len(EXPERT_MACS)
    assigned, executed = [0] * n, [0] * n
    samples = correct = dropped = 0
    nll = entropy = 0.0
    for b in batches:
        for row in range(len(b["target"])):
            samples += 1
            for slot, expert in enumerate(b["indices"][row].tolist()):
                assigned[expert] += 1
                if b["keep"][row, slot]:
                    executed[expert] += 1
                else:
                    dropped += 1
            scores = b["log_probs"][row].tolist()
            label = int(b["target"][row])
            correct += max(range(len(scores)), key=scores.__getitem__) == label
            nll -= scores[label]
            entropy -= sum(p * math.log(p) for p in b["probs"][row].tolist() if p > 0)
    load = [a / sum(assigned) for a in assigned]
    return {
        "acc": correct / samples,
        "loss": nll / samples,
        "expected_macs": GATE_MACS + sum(executed[i] / samples * EXPERT_MACS[i] for i in range(n)),
        "routing_entropy": -sum(p * math.log(p) for p in load if p > 0) / math.log(n),
        "gate_entropy": entropy / samples,
        "dead_expert_share": sum(a == 0 for a in assigned) / n,
        "dropped_fraction": dropped / sum(assigned),
        "samples": float(samples),
        "expert_load": load,
    }


def _assert_figures(actual: dict[str, object], expected: dict[str, object]) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert actual[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


def test_routing_statistics_match_a_sample_by_sample_reference():
    batches = [_batch(0), _batch(1, batch=7)]
    metric = RoutingStatistics(EXPERT_MACS, GATE_MACS)
    for b in batches:
        metric.update(**b)
    figures = metric.compute()
    _assert_figures(figures, _reference(batches))
    assert figures["dead_expert_share"] == 0.25 and figures["expert_load"][3] == 0.0
    assert 0.0 < figures["dropped_fraction"] < 0.5
    metric.reset()
    metric.update(**batches[1])
    _assert_figures(metric.compute(), _reference(batches[1:]))  # reset forgets the first batch


def test_states_are_sums_so_processes_add_up():
    # Two processes' metrics merged with their `dist_reduce_fx` (what torchmetrics does when it syncs)
    # equal one metric that saw both processes' batches.
    first, second = _batch(2), _batch(3, batch=9)
    rank0, rank1 = RoutingStatistics(EXPERT_MACS, GATE_MACS), RoutingStatistics(EXPERT_MACS, GATE_MACS)
    rank0.update(**first)
    rank1.update(**second)
    rank0.merge_state(rank1)
    whole = RoutingStatistics(EXPERT_MACS, GATE_MACS)
    whole.update(**_concatenated(first, second))
    merged, together = rank0.compute(), whole.compute()
    _assert_figures(merged, together)
    _assert_figures(merged, _reference([first, second]))
    assert merged["samples"] == 21.0


def test_routing_figures_without_targets_and_bad_inputs():
    b = _batch(4)
    metric = RoutingStatistics(EXPERT_MACS, GATE_MACS)
    metric.update(**{**b, "target": None})
    figures = metric.compute()
    assert figures["acc"] == 0.0 and figures["loss"] == 0.0
    reference = _reference([b])
    assert figures["expected_macs"] == pytest.approx(reference["expected_macs"])
    with pytest.raises(
        ValueError, match=r"Expected `probs` of shape \[batch, 4\] and `counts` of shape \[4\]"
    ):
        metric.update(**{**b, "counts": b["counts"][:3]})
    with pytest.raises(ValueError, match="Expected `expert_macs` to hold one figure per expert"):
        RoutingStatistics([], GATE_MACS)

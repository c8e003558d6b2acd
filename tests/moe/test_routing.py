"""Routing that does not collapse: specialists found per class, identical experts balanced, a normalised mixture."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_hybridcomp.moe.gate import assignment_loss, balanced_assignment, top_k_gate
from lightning_hybridcomp.moe.module import MoELightningModule
from tests._helpers import fast_trainer

IMAGE = [1, 6, 6]
NUM_CLASSES = 6
NUM_EXPERTS = 3
LEVELS = torch.linspace(-1.5, 1.5, NUM_CLASSES)


def _images(labels: Tensor, generator: torch.Generator) -> Tensor:
    """Class ``c`` is an image of brightness ``LEVELS[c]`` with a little pixel noise."""
    noise = 0.05 * torch.randn(len(labels), *IMAGE, generator=generator)
    return LEVELS[labels].view(-1, 1, 1, 1) + noise


class Specialist(nn.Module):
    """Right on its own classes only: reads the class from the brightness, then answers a wrong class
    for every class it does not own (the next class it does not own, cyclically); all right with ``None``."""

    def __init__(self, owned: list[int] | None) -> None:
        super().__init__()
        answer = torch.arange(NUM_CLASSES)
        if owned is not None:
            others = [c for c in range(NUM_CLASSES) if c not in owned]
            for i, c in enumerate(others):
                answer[c] = others[(i + 1) % len(others)]
        # logits[:, answer[c]] carries the evidence for class c.
        self.register_buffer("permutation", torch.argsort(answer))
        self.register_buffer("levels", LEVELS.clone())

    def forward(self, x: Tensor) -> Tensor:
        brightness = x.mean(dim=(1, 2, 3)).unsqueeze(1)
        evidence = -40.0 * (brightness - self.levels).square()
        return evidence[:, self.permutation]


def _loaders(seed: int = 0) -> tuple[DataLoader, DataLoader, tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    y = torch.arange(NUM_CLASSES).repeat(64)[torch.randperm(64 * NUM_CLASSES, generator=generator)]
    x = _images(y, generator)
    test_y = torch.arange(NUM_CLASSES).repeat(40)
    test = (_images(test_y, generator), test_y)
    train = DataLoader(TensorDataset(x, y), batch_size=48, shuffle=True)
    val = DataLoader(TensorDataset(*test), batch_size=120)
    return train, val, test


def _owners() -> list[list[int]]:
    return [[2 * j, 2 * j + 1] for j in range(NUM_EXPERTS)]


def _class_router(claimed: list[list[int]]) -> MoELightningModule:
    """An untrained MoE over the specialists, routing by the classes each expert claims."""
    return MoELightningModule(
        [Specialist(o) for o in _owners()],
        input_shape=IMAGE,
        assignment_target="classes",
        expert_classes=claimed,
    )


def _fit(experts: list[nn.Module], epochs: int, **kwargs) -> MoELightningModule:
    pl.seed_everything(0)
    train, val, _ = _loaders()
    moe = MoELightningModule(experts, top_k=2, input_shape=IMAGE, learning_rate=1e-2, **kwargs)
    fast_trainer(max_epochs=epochs, limit_val_batches=1).fit(moe, train, val)
    return moe.eval()


@pytest.fixture(scope="module")
def specialists() -> MoELightningModule:
    return _fit([Specialist(owned) for owned in _owners()], epochs=8)


def test_specialist_experts_example_is_what_it_claims() -> None:
    _, _, (x, y) = _loaders()
    for owned, expert in zip(_owners(), [Specialist(o) for o in _owners()]):
        right = expert(x).argmax(-1) == y
        mine = torch.isin(y, torch.tensor(owned))
        assert right[mine].all() and not right[~mine].any()


@pytest.mark.parametrize("k", [1, 2])
def test_gate_finds_the_specialist_of_every_class(specialists, k) -> None:
    moe = specialists
    moe.eval_top_k = k
    _, _, (x, y) = _loaders()
    with torch.no_grad():
        gating, _ = moe.route(x)
        log_probs = moe(x)
    first_choice = gating.indices[:, 0]
    for expert, owned in enumerate(_owners()):
        for c in owned:
            share = (first_choice[y == c] == expert).float().mean().item()
            assert share >= 0.95, (c, expert, share)
    assert (log_probs.argmax(-1) == y).float().mean() >= 0.95
    stats = moe.routing_statistics(x)
    assert stats["dead_expert_share"] == 0.0
    top1_share = torch.bincount(first_choice, minlength=NUM_EXPERTS).float() / len(y)
    assert top1_share.max() <= 2 / NUM_EXPERTS


@pytest.mark.parametrize("k", [1, 2])
def test_mixture_is_a_distribution_at_every_k(specialists, k) -> None:
    moe = specialists
    moe.eval_top_k = k
    _, _, (x, _) = _loaders()
    with torch.no_grad():
        total = moe(x).exp().sum(dim=-1)
        # A reference mixture of the chosen experts with weights divided by their sum.
        gating, _ = moe.route(x)
        probs = torch.stack([e(x).softmax(-1) for e in moe.experts], dim=1)
        chosen = probs.gather(1, gating.indices[..., None].expand(-1, -1, NUM_CLASSES))
        weights = gating.weights / gating.weights.sum(-1, keepdim=True)
        reference = (weights[..., None] * chosen).sum(1)
    torch.testing.assert_close(total, torch.ones_like(total))
    torch.testing.assert_close(moe(x).exp(), reference, atol=1e-5, rtol=1e-5)


def test_training_top1_keeps_the_raw_router_weight() -> None:
    moe = MoELightningModule([Specialist(o) for o in _owners()], top_k=1, input_shape=IMAGE)
    with torch.no_grad():
        for p in moe.gate.parameters():
            p.normal_(0, 1.0, generator=torch.Generator().manual_seed(0))
    _, _, (x, _) = _loaders()
    moe.train()
    gating = top_k_gate(moe.gate(x)[0], 1)
    mixed = moe.dispatch(x, gating).probs
    torch.testing.assert_close(mixed.sum(-1), gating.weights[:, 0])
    assert (gating.weights < 0.999).any()


@pytest.mark.parametrize("k", [1, 2])
def test_identical_experts_still_share_the_load_with_default_settings(k) -> None:
    # Nothing in the task loss prefers one expert: only the balancing losses decide. Routing must not
    # collapse onto the expert with the largest constant bias (what the Switch loss alone gave).
    moe = _fit([Specialist(None) for _ in range(NUM_EXPERTS)], epochs=6, eval_top_k=k)
    _, _, (x, _) = _loaders()
    with torch.no_grad():
        gating, _ = moe.route(x)
    first = torch.bincount(gating.indices[:, 0], minlength=NUM_EXPERTS).float() / len(x)
    assert first.min() > 0 and first.max() <= 2 / NUM_EXPERTS, first.tolist()


def test_two_experts_the_router_scores_alike_split_their_share() -> None:
    # Experts 0 and 1 are the same network (right on classes 0-3), expert 2 is right on 4 and 5. The
    # router has no reason to score 0 and 1 apart; with the soft assignment target it did not, and one of
    # them was never the top-1 choice (loads 0.667, 0, 0.333). The default hard target splits them.
    owners = [[0, 1, 2, 3], [0, 1, 2, 3], [4, 5]]
    moe = _fit([Specialist(owned) for owned in owners], epochs=6, eval_top_k=1)
    _, _, (x, y) = _loaders()
    for k in (1, 2):
        moe.eval_top_k = k
        with torch.no_grad():
            gating, _ = moe.route(x)
            accuracy = (moe(x).argmax(-1) == y).float().mean()
        first = torch.bincount(gating.indices[:, 0], minlength=NUM_EXPERTS).float() / len(x)
        assert first.min() > 0.05 and first.max() <= 2 / NUM_EXPERTS, first.tolist()
        assert torch.bincount(gating.indices.flatten(), minlength=NUM_EXPERTS).min() > 0
        assert accuracy == 1.0


def test_hard_balanced_assignment_gives_each_sample_one_expert_and_splits_ties() -> None:
    generator = torch.Generator().manual_seed(0)
    shared = torch.randn(90, generator=generator)
    # Experts 1 and 2 scored alike up to a hair on every sample; expert 0 apart.
    hair = 1e-3 * torch.randn(90, 2, generator=generator)
    logits = torch.stack([torch.randn(90, generator=generator), shared, shared], 1)
    logits[:, 1:] += hair
    soft, hard = balanced_assignment(logits), balanced_assignment(logits, hard=True)
    assert torch.equal(hard, torch.nn.functional.one_hot(soft.argmax(-1), 3).float())
    tied = soft[:, 1:].sum(-1) > 0.9  # samples the soft target splits between 1 and 2
    assert tied.sum() > 20 and torch.allclose(soft[tied, 1], soft[tied, 2], atol=0.01)  # about half each
    shares = hard[tied].mean(0)
    assert shares[1] > 0.25 and shares[2] > 0.25  # the hard target gives each of the pair its part
    with pytest.raises(TypeError, match="Expected `hard` to be a bool"):
        balanced_assignment(logits, hard="yes")  # type: ignore[arg-type]


def test_balanced_assignment_balances_columns_and_follows_the_ranking() -> None:
    torch.manual_seed(0)
    logits = torch.randn(60, 3) + torch.tensor([3.0, 0.0, -3.0])  # a constant preference for expert 0
    target = balanced_assignment(logits, temperature=0.2, iterations=50)
    torch.testing.assert_close(target.sum(1), torch.ones(60))
    torch.testing.assert_close(target.sum(0), torch.full((3,), 20.0), atol=1e-3, rtol=1e-3)
    # The samples ranked highest for an expert (relative to the batch) are the ones it is given.
    centred = (logits - logits.mean(0)) / logits.std(0, unbiased=False)
    for expert in range(3):
        top = centred[:, expert].topk(10).indices
        assert (target[top].argmax(-1) == expert).float().mean() >= 0.8
    assert torch.equal(balanced_assignment(logits[:1]), torch.full((1, 3), 1 / 3))
    with pytest.raises(ValueError, match="Expected `temperature` to be a positive float"):
        balanced_assignment(logits, temperature=0.0)


def test_assignment_loss_against_a_reference() -> None:
    logits = torch.randn(5, 4, requires_grad=True)
    target = torch.softmax(torch.randn(5, 4), -1)
    expected = -0.3 * (target * torch.log(torch.softmax(logits, -1))).sum(-1).mean()
    torch.testing.assert_close(assignment_loss(logits, target, 0.3), expected)
    with pytest.raises(ValueError, match="Expected `target` to have the shape of `logits`"):
        assignment_loss(logits, target[:2])


@pytest.mark.parametrize("k", [1, 2])
def test_routing_headroom_of_specialists(specialists, k) -> None:
    moe = specialists
    moe.eval_top_k = k
    _, _, (x, y) = _loaders()
    headroom = moe.routing_headroom(x, y, batch_size=50)
    with torch.no_grad():
        predictions = torch.stack([e(x).argmax(-1) for e in moe.experts])
        ensemble = torch.stack([e(x).softmax(-1) for e in moe.experts]).mean(0).argmax(-1)
        first_choice = moe.route(x)[0].indices[:, 0]
        accuracy = (moe(x).argmax(-1) == y).float().mean().item()
    # Each specialist is right on its third of the classes, so together they cover every image.
    assert headroom["expert_accuracy"] == pytest.approx([1 / 3] * NUM_EXPERTS)
    assert headroom["oracle_accuracy"] == 1.0
    assert headroom["accuracy"] == pytest.approx(accuracy)
    assert headroom["ensemble_accuracy"] == pytest.approx((ensemble == y).float().mean().item())
    assert headroom["agreement"] == pytest.approx(
        (predictions == predictions[0]).all(0).float().mean().item()
    )
    # The owner's answer is outvoted by the two others' shared wrong one: averaging loses what routing finds.
    assert headroom["ensemble_accuracy"] < 0.5 < headroom["accuracy"]
    hits = (predictions.gather(0, first_choice[None]) == y).float().mean().item()
    assert headroom["gate_hit_rate"] == pytest.approx(hits) and hits >= 0.95


def test_routing_headroom_of_class_specialists() -> None:
    # Expert 0 also claims class 2 (on which it is wrong); no expert claims class 5.
    claimed = [[0, 1, 2], [2, 3], [4]]
    moe = _class_router(claimed).eval()
    _, _, (x, y) = _loaders()
    headroom = moe.routing_headroom(x, y, batch_size=70)
    # Each specialist is right on the classes it owns, so only expert 0's claim on class 2 costs it.
    assert headroom["specialist_accuracy"] == pytest.approx([2 / 3, 1.0, 1.0])
    with torch.no_grad():
        first_choice = moe.route(x)[0].indices[:, 0]
    owner = [{e for e, cs in enumerate(claimed) if c in cs} for c in range(NUM_CLASSES)]
    routed = [first_choice[i].item() in owner[c] for i, c in enumerate(y.tolist()) if owner[c]]
    assert headroom["class_routing_accuracy"] == pytest.approx(sum(routed) / len(routed))
    assert len(routed) == (y != 5).sum()
    # No expert's classes in the labels: no figure rather than a made-up one.
    assert moe.routing_headroom(x[y == 5], y[y == 5])["specialist_accuracy"] == [None] * NUM_EXPERTS


def test_routing_headroom_without_expert_classes_has_no_class_figures(specialists) -> None:
    _, _, (x, y) = _loaders()
    assert not {"class_routing_accuracy", "specialist_accuracy"} & set(specialists.routing_headroom(x, y))


def test_routing_headroom_checks_its_labels(specialists) -> None:
    _, _, (x, y) = _loaders()
    with pytest.raises(ValueError, match="one label per image"):
        specialists.routing_headroom(x, y[:-1])


def _owner_of(y: Tensor) -> Tensor:
    return y // 2  # _owners(): expert j owns classes 2j and 2j + 1


def test_oracle_target_assigns_each_sample_to_an_expert_that_is_right() -> None:
    moe = MoELightningModule(
        [Specialist(o) for o in _owners()], input_shape=IMAGE, assignment_target="oracle"
    ).train()
    _, _, (x, y) = _loaders()
    # A router that knows nothing yet (equal logits) and one that prefers the wrong expert everywhere.
    for logits in (
        torch.zeros(len(y), NUM_EXPERTS),
        3.0 * torch.nn.functional.one_hot((_owner_of(y) + 1) % 3),
    ):
        target = moe.assignment_targets(x, y, logits.float())
        assert torch.equal(target.argmax(-1), _owner_of(y))
        assert torch.equal(target.sum(-1), torch.ones(len(y)))  # one-hot rows
    # The label-blind targets follow the router instead.
    moe.assignment_target = "hard"
    blind = moe.assignment_targets(x, y, 3.0 * torch.nn.functional.one_hot((_owner_of(y) + 1) % 3).float())
    assert torch.equal(blind.argmax(-1), (_owner_of(y) + 1) % 3)


def test_classes_target_assigns_each_sample_to_the_expert_of_its_class(monkeypatch) -> None:
    # Expert 0 also claims class 2, which expert 1 owns: those samples are shared between the two.
    claimed = [[0, 1, 2], [2, 3], [4, 5]]
    moe = _class_router(claimed).train()
    _, _, (x, y) = _loaders()
    against = 3.0 * torch.nn.functional.one_hot((_owner_of(y) + 1) % 3).float()
    for logits in (torch.zeros(len(y), NUM_EXPERTS), against):
        target = moe.assignment_targets(x, y, logits)
        chosen = target.argmax(-1)
        assert torch.equal(target.sum(-1), torch.ones(len(y)))
        single = y != 2
        assert torch.equal(chosen[single], _owner_of(y)[single])
        assert set(chosen[y == 2].tolist()) <= {0, 1}
    # The labels alone decide: the experts never run for this target.
    monkeypatch.setattr(moe, "_expert_runners", lambda: pytest.fail("the experts ran"))
    assert torch.equal(moe.assignment_targets(x, y, against).argmax(-1)[y != 2], _owner_of(y)[y != 2])


def test_classes_target_ranks_the_other_specialists_second_when_k_is_two() -> None:
    # Class 2 has two specialists (experts 0 and 1); every other class has one.
    claimed = [[0, 1, 2], [2, 3], [4, 5]]
    _, _, (x, y) = _loaders()
    logits = torch.randn(len(y), NUM_EXPERTS, generator=torch.Generator().manual_seed(1))
    moe = _class_router(claimed).train()
    targets = {}
    for k in (1, 2):
        moe.top_k = k
        targets[k] = moe.assignment_targets(x, y, logits)
    shared = y == 2
    # The first place is the same at both k: the balanced choice among the class's specialists.
    assert torch.equal(targets[2].argmax(-1), targets[1].argmax(-1))
    assert torch.equal(targets[2][~shared], targets[1][~shared])
    assert torch.equal(targets[1], torch.nn.functional.one_hot(targets[1].argmax(-1), NUM_EXPERTS).float())
    first = targets[1][shared].argmax(-1)
    rows = targets[2][shared]
    assert torch.allclose(rows.gather(1, first[:, None]), torch.full((int(shared.sum()), 1), 2 / 3))
    assert torch.allclose(rows[:, :2].sum(-1), torch.ones(int(shared.sum())))  # the rest to the other one
    assert set(first.tolist()) == {0, 1}  # balanced between the two, not all to one


def test_router_trained_at_top2_on_classes_puts_both_specialists_of_a_class_together() -> None:
    """Two experts share classes 0-3, a third owns 4-5: at k = 2 the pair is chosen together on 0-3,
    and at k = 1 each of the pair is still first on part of them (no tie). Every expert is right on every
    class, so the task loss prefers none: the ranking is the target's."""
    moe = _fit(
        [Specialist(None) for _ in range(NUM_EXPERTS)],
        epochs=8,
        assignment_target="classes",
        expert_classes=[[0, 1, 2, 3], [0, 1, 2, 3], [4, 5]],
    )
    _, _, (x, y) = _loaders()
    with torch.no_grad():
        gating, _ = moe.route(x)
    pair = y < 4
    chosen = gating.indices.sort(dim=-1).values
    together = (chosen[pair] == torch.tensor([0, 1])).all(dim=-1).float().mean().item()
    assert together >= 0.95, together
    assert (gating.indices[~pair, 0] == 2).float().mean().item() >= 0.95
    first_shares = torch.bincount(gating.indices[pair, 0], minlength=NUM_EXPERTS).float() / int(pair.sum())
    assert first_shares[:2].min() >= 0.25, first_shares


@pytest.mark.parametrize(
    "options",
    [
        dict(assignment_target="oracle"),
        dict(assignment_target="classes", expert_classes=_owners()),
    ],
    ids=["oracle", "classes"],
)
def test_label_aware_targets_teach_a_router_trained_at_top1(options) -> None:
    """At ``top_k=1`` the task loss only rewards confidence in the winner; a label-aware target says who is right."""
    accuracy = {}
    for name, target in (("hard", {}), ("aware", options)):
        pl.seed_everything(0)
        train, val, (x, y) = _loaders()
        moe = MoELightningModule(
            [Specialist(o) for o in _owners()], top_k=1, input_shape=IMAGE, learning_rate=1e-2, **target
        )
        fast_trainer(max_epochs=8, limit_val_batches=1).fit(moe, train, val)
        headroom = moe.eval().routing_headroom(x, y)
        accuracy[name] = headroom["accuracy"]
    if "expert_classes" in options:
        assert headroom["class_routing_accuracy"] >= 0.95
    assert accuracy["aware"] >= 0.95
    assert accuracy["aware"] > accuracy["hard"] + 0.2, accuracy


def test_allowed_experts_restrict_only_the_samples_they_split() -> None:
    logits = torch.randn(12, 3, generator=torch.Generator().manual_seed(0))
    free = balanced_assignment(logits, hard=True)
    allowed = torch.ones(12, 3, dtype=torch.bool)
    allowed[0] = torch.tensor([False, False, True])  # only expert 2 is right
    allowed[1] = False  # no expert is right: the router decides
    allowed[2] = torch.tensor([True, True, False])
    target = balanced_assignment(logits, hard=True, allowed=allowed)
    assert target[0].argmax() == 2 and target[2].argmax() != 2
    assert torch.equal(target[1], free[1])
    assert torch.equal(
        balanced_assignment(logits, hard=True, allowed=torch.ones(12, 3, dtype=torch.bool)), free
    )
    with pytest.raises(ValueError, match="`allowed` to have the shape"):
        balanced_assignment(logits, allowed=allowed[:, :2])

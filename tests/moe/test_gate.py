"""Top-k gating and the auxiliary MoE losses against hand-computed values on small tensors."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_hybridcomp.moe.gate import (
    Gate,
    GateNetwork,
    check_gate_output,
    dense_gates,
    importance_loss,
    load_balancing_loss,
    router_z_loss,
    routing_mask,
    top_k_gate,
)

LOGITS = torch.tensor([[0.0, 1.0, 2.0], [3.0, 0.0, 0.0]])
# softmax([0, 1, 2]) and softmax([3, 0, 0]) by hand
P0 = [1 / (1 + math.e + math.e**2), math.e / (1 + math.e + math.e**2), math.e**2 / (1 + math.e + math.e**2)]
P1 = [math.e**3 / (math.e**3 + 2), 1 / (math.e**3 + 2), 1 / (math.e**3 + 2)]


def test_top1_keeps_the_raw_probability():
    gating = top_k_gate(LOGITS, k=1)
    assert gating.indices.tolist() == [[2], [0]]
    torch.testing.assert_close(gating.weights, torch.tensor([[P0[2]], [P1[0]]]))
    torch.testing.assert_close(gating.probs, torch.tensor([P0, P1]))
    assert gating.weights[0, 0].item() == pytest.approx(0.665241, abs=1e-6)


def test_top2_renormalises_the_kept_probabilities():
    gating = top_k_gate(LOGITS, k=2)
    assert gating.indices[0].tolist() == [2, 1]
    expected = torch.tensor([P0[2], P0[1]]) / (P0[2] + P0[1])
    torch.testing.assert_close(gating.weights[0], expected)
    assert gating.weights[0].tolist() == pytest.approx([0.7310586, 0.2689414], abs=1e-6)
    torch.testing.assert_close(gating.weights.sum(dim=-1), torch.ones(2))


def test_top_n_weights_are_the_full_softmax():
    gating = top_k_gate(LOGITS, k=3)
    torch.testing.assert_close(dense_gates(gating), torch.tensor([P0, P1]))


def test_noise_changes_the_decision_only_when_given():
    logits = torch.zeros(64, 4)
    clean = top_k_gate(logits, k=1)
    assert len(clean.indices.unique()) == 1  # ties go to one expert: no noise, no exploration
    g1 = top_k_gate(logits, k=1, noise_std=1.0, generator=torch.Generator().manual_seed(0))
    g2 = top_k_gate(logits, k=1, noise_std=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(g1.indices, g2.indices)
    assert len(g1.indices.unique()) == 4  # noise spreads the samples over every expert
    zero = top_k_gate(LOGITS, k=2, noise_std=0.0)
    torch.testing.assert_close(zero.weights, top_k_gate(LOGITS, k=2).weights)


def test_noise_scale_receives_gradient():
    std = torch.full((2, 3), 0.5, requires_grad=True)
    gating = top_k_gate(LOGITS, k=2, noise_std=std, generator=torch.Generator().manual_seed(1))
    gating.weights[:, 0].sum().backward()
    assert std.grad is not None and std.grad.abs().sum() > 0


@pytest.mark.parametrize("k", [0, 4, True, 1.5])
def test_top_k_gate_rejects_bad_k(k):
    with pytest.raises(ValueError, match=r"Expected `k` to be an integer in \[1, 3\]"):
        top_k_gate(LOGITS, k=k)


def test_top_k_gate_rejects_bad_logits():
    with pytest.raises(ValueError, match=r"Expected `logits` to be a tensor of shape \[batch, num_experts\]"):
        top_k_gate(torch.zeros(3), k=1)


def test_routing_mask_and_dense_gates():
    gating = top_k_gate(LOGITS, k=2)
    assert routing_mask(gating.indices, 3).tolist() == [[0.0, 1.0, 1.0], [1.0, 1.0, 0.0]]
    gates = dense_gates(gating)
    assert gates[0, 0].item() == 0.0
    torch.testing.assert_close(gates.sum(dim=-1), torch.ones(2))


def test_switch_loss_equals_alpha_under_uniform_routing():
    num_experts, alpha = 4, 0.01
    probs = torch.full((8, num_experts), 1 / num_experts)
    mask = routing_mask(torch.arange(8).remainder(num_experts).unsqueeze(1), num_experts)
    assert load_balancing_loss(probs, mask, coefficient=alpha).item() == pytest.approx(alpha)
    # top-2 routing that is uniform too: still alpha (each sample counts 1/k per chosen expert)
    mask2 = routing_mask(torch.tensor([[0, 1], [2, 3], [1, 2], [3, 0]]), num_experts)
    assert load_balancing_loss(probs[:4], mask2, coefficient=alpha).item() == pytest.approx(alpha)


def test_switch_loss_hand_computed_and_collapse():
    probs = torch.tensor([[0.7, 0.3], [0.4, 0.6], [0.9, 0.1]], requires_grad=True)
    mask = routing_mask(torch.tensor([[0], [1], [0]]), 2)
    # f = (2/3, 1/3), P = (2/3, 1/3): N * sum f P = 2 * (4/9 + 1/9) = 10/9
    loss = load_balancing_loss(probs, mask, coefficient=0.5)
    assert loss.item() == pytest.approx(0.5 * 10 / 9)
    loss.backward()  # gradient only through P: alpha * N * f_i / B
    torch.testing.assert_close(probs.grad, torch.tensor([[2 / 3, 1 / 3]] * 3) * 0.5 * 2 / 3)
    collapsed = torch.tensor([[1.0, 0.0, 0.0]] * 5)
    everything_to_one = routing_mask(torch.zeros(5, 1, dtype=torch.long), 3)
    assert load_balancing_loss(collapsed, everything_to_one, coefficient=0.1).item() == pytest.approx(0.3)


def test_balancing_loss_rejects_bad_inputs():
    probs = torch.full((2, 2), 0.5)
    with pytest.raises(ValueError, match="Expected `mask` to have the shape of `probs`"):
        load_balancing_loss(probs, torch.ones(2, 3))
    with pytest.raises(ValueError, match="Expected `mask` to route at least one sample"):
        load_balancing_loss(probs, torch.zeros(2, 2))


def test_importance_loss_hand_computed():
    gates = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    # importance (1.5, 0.5, 0): mean 2/3, population variance 7/18, CV^2 = 0.875
    assert importance_loss(gates).item() == pytest.approx(0.875, abs=1e-6)
    assert importance_loss(gates, coefficient=0.1).item() == pytest.approx(0.0875, abs=1e-7)
    assert importance_loss(torch.full((4, 2), 0.5)).item() == pytest.approx(0.0, abs=1e-9)


def test_router_z_loss_hand_computed():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    # logsumexp rows: log 2 and log 4
    expected = (math.log(2) ** 2 + math.log(4) ** 2) / 2
    assert router_z_loss(logits).item() == pytest.approx(expected, abs=1e-6)
    assert router_z_loss(logits, coefficient=1e-3).item() == pytest.approx(1e-3 * expected, abs=1e-9)


@pytest.mark.parametrize(
    "call",
    [
        lambda: load_balancing_loss(torch.full((2, 2), 0.5), torch.ones(2, 2), coefficient=-0.1),
        lambda: importance_loss(torch.ones(2, 2), coefficient=-1.0),
        lambda: router_z_loss(torch.ones(2, 2), coefficient=-1e-3),
    ],
)
def test_losses_reject_negative_coefficients(call):
    with pytest.raises(ValueError, match="Expected `coefficient` to be a non-negative float"):
        call()


def test_gate_network_starts_uniform_and_noises_only_in_training():
    torch.manual_seed(0)
    gate = GateNetwork(in_channels=1, num_experts=3, channels=4, input_size=4)
    x = torch.randn(5, 1, 16, 16)
    gate.eval()
    logits, noise = gate(x)
    assert noise is None
    torch.testing.assert_close(logits, torch.zeros(5, 3))  # zero-initialised heads: uniform routing
    gate.train()
    _, noise = gate(x)
    assert noise is not None and noise.shape == (5, 3)
    torch.testing.assert_close(noise, torch.full((5, 3), math.log(2.0)))  # softplus(0)
    logits_small, _ = gate.eval()(torch.randn(2, 1, 8, 8))  # input_size makes any resolution work
    assert logits_small.shape == (2, 3)


def test_gate_network_follows_the_gate_contract():
    gate = GateNetwork(in_channels=1, num_experts=2, channels=4)
    assert isinstance(gate, Gate) and gate.num_experts == 2
    check_gate_output(gate, torch.zeros(3, 1, 8, 8), 2)  # (logits, None) in eval mode is the contract
    assert gate.training  # checked in eval mode, left in its own mode


def test_gate_subclass_must_implement_forward_and_follow_the_contract():
    with pytest.raises(NotImplementedError, match="Gate must implement `forward"):
        Gate(num_experts=2)(torch.zeros(1, 4))

    class LogitsOnly(Gate):
        def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            return x.flatten(1)[:, :2]

    with pytest.raises(ValueError, match=r"Expected the gate LogitsOnly to return \(logits, noise_std\)"):
        check_gate_output(LogitsOnly(2), torch.zeros(3, 1, 2, 2), 2)

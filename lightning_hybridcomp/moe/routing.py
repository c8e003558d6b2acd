"""The routing maths of the Mixture of Experts: the top-k decision and the auxiliary losses.

Pure functions on tensors, tested against hand-computed values; the gates (:mod:`.gate`) produce the router
logits these functions take.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from lightning_hybridcomp._validation import expect_bool

__all__ = [
    "TopKGating",
    "assignment_loss",
    "balanced_assignment",
    "dense_gates",
    "importance_loss",
    "load_balancing_loss",
    "router_z_loss",
    "routing_mask",
    "top_k_gate",
    "with_other_owners",
]


class TopKGating(NamedTuple):
    """The routing decision for one batch.

    Attributes:
        indices: ``[B, k]`` int64, the chosen experts of each sample, highest weight first.
        weights: ``[B, k]`` mixing weights of the chosen experts.
        probs: ``[B, N]`` router probabilities ``softmax(logits)`` over all experts.
        logits: ``[B, N]`` the logits the decision was taken on (noisy when noise was given).
    """

    indices: Tensor
    weights: Tensor
    probs: Tensor
    logits: Tensor


def _check_logits(logits: Tensor, name: str = "logits") -> None:
    if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[1] < 1:
        raise ValueError(
            f"Expected `{name}` to be a tensor of shape [batch, num_experts], got"
            f" {type(logits).__name__} of shape {tuple(getattr(logits, 'shape', ()))}."
        )


def top_k_gate(
    logits: Tensor,
    k: int,
    *,
    noise_std: Tensor | float | None = None,
    generator: torch.Generator | None = None,
) -> TopKGating:
    r"""Pick the ``k`` experts with the largest (optionally noisy) router logits.

    Noisy top-k gating (Shazeer et al., 2017): in training the logits get Gaussian noise,
    :math:`H = z + \epsilon \cdot \sigma` with :math:`\epsilon \sim \mathcal{N}(0, 1)` and
    :math:`\sigma` = ``noise_std`` (the router's ``softplus(x W_noise)``); without ``noise_std`` the
    decision is deterministic. With :math:`p = \mathrm{softmax}(H)`:

    * ``k == 1`` keeps the raw probability of the winner as its weight, :math:`w = p_{i^*}` (Switch
      Transformer), so the weight carries the router's confidence;
    * ``k > 1`` renormalises the kept probabilities, :math:`w_j = p_{i_j} / \sum_{l \le k} p_{i_l}`,
      which equals :math:`\mathrm{softmax}(\mathrm{KeepTopK}(H, k))` of Shazeer et al.

    Args:
        logits: ``[B, N]`` router logits.
        k: experts per sample, ``1 <= k <= N``.
        noise_std: standard deviation of the routing noise, a float or a ``[B, N]`` tensor
            (gradients flow into it); ``None`` for a deterministic decision.
        generator: random generator for the noise.

    Returns:
        A :class:`TopKGating` with the indices, weights, probabilities and the logits used.

    Raises:
        ValueError: for logits that are not ``[B, N]`` or ``k`` outside ``[1, N]``.

    Example::

        >>> g = top_k_gate(torch.tensor([[0.0, 1.0, 2.0]]), k=2)
        >>> g.indices.tolist(), [round(w, 4) for w in g.weights[0].tolist()]
        ([[2, 1]], [0.7311, 0.2689])
        >>> round(top_k_gate(torch.tensor([[0.0, 1.0, 2.0]]), k=1).weights.item(), 4)  # raw probability
        0.6652
    """
    _check_logits(logits)
    num_experts = logits.shape[1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_experts:
        raise ValueError(
            f"Expected `k` to be an integer in [1, {num_experts}] (the number of experts), got {k!r}."
        )
    if noise_std is not None:
        noise = torch.randn(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
        logits = logits + noise * noise_std
    probs = logits.softmax(dim=-1)
    top_probs, indices = probs.topk(k, dim=-1)
    weights = top_probs if k == 1 else top_probs / top_probs.sum(dim=-1, keepdim=True)
    return TopKGating(indices=indices, weights=weights, probs=probs, logits=logits)


def routing_mask(indices: Tensor, num_experts: int) -> Tensor:
    """``[B, N]`` float mask with a one where a sample is routed to an expert (``k`` ones per row).

    Example::

        >>> routing_mask(torch.tensor([[0, 2], [2, 1]]), 3).tolist()
        [[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]
    """
    mask = torch.zeros(indices.shape[0], num_experts, device=indices.device)
    return mask.scatter_(1, indices, 1.0)


def dense_gates(gating: TopKGating, num_experts: int | None = None) -> Tensor:
    """``[B, N]`` gate matrix: the mixing weight of each chosen expert, zero elsewhere (Shazeer's ``G(x)``).

    Example::

        >>> g = top_k_gate(torch.tensor([[0.0, 1.0, 2.0]]), k=2)
        >>> [round(v, 4) for v in dense_gates(g)[0].tolist()]
        [0.0, 0.2689, 0.7311]
    """
    n = gating.probs.shape[1] if num_experts is None else num_experts
    gates = torch.zeros(gating.weights.shape[0], n, device=gating.weights.device, dtype=gating.weights.dtype)
    return gates.scatter(1, gating.indices, gating.weights)


def load_balancing_loss(probs: Tensor, mask: Tensor, coefficient: float = 1.0) -> Tensor:
    r"""Switch Transformer load-balancing loss :math:`\alpha N \sum_i f_i P_i`.

    :math:`f_i` is the share of routing assignments that went to expert :math:`i`, counted from the
    routing ``mask`` (``mask[:, i].sum() / mask.sum()``; with top-1 routing that is the fraction of
    samples whose choice is :math:`i`, with top-k each sample counts ``1/k`` for each of its experts) and
    :math:`P_i` the mean router probability of expert :math:`i` over the batch. Count the mask before any
    capacity drop, or a full expert looks less loaded than it is. Only :math:`P` carries gradient. Under
    perfectly uniform routing (:math:`f_i = P_i = 1/N`) the loss equals :math:`\alpha`, the value the
    Switch paper's objective drives towards; routing everything to one confident expert gives
    :math:`\alpha N`.

    Args:
        probs: ``[B, N]`` router probabilities.
        mask: ``[B, N]`` routing mask (see :func:`routing_mask`).
        coefficient: :math:`\alpha` (the Switch paper uses ``1e-2``).

    Raises:
        ValueError: for mismatched shapes, an empty mask or a negative coefficient.

    Example::

        >>> probs = torch.full((4, 2), 0.5)
        >>> mask = routing_mask(torch.tensor([[0], [1], [0], [1]]), 2)
        >>> round(load_balancing_loss(probs, mask, coefficient=0.01).item(), 6)
        0.01
    """
    _check_logits(probs, "probs")
    if mask.shape != probs.shape:
        raise ValueError(
            f"Expected `mask` to have the shape of `probs` {tuple(probs.shape)}, got {tuple(mask.shape)}."
        )
    _check_coefficient(coefficient)
    total = mask.sum()
    if total <= 0:
        raise ValueError("Expected `mask` to route at least one sample, got an all-zero mask.")
    fraction = mask.sum(dim=0).to(probs.dtype) / total
    mean_prob = probs.mean(dim=0)
    return coefficient * probs.shape[1] * (fraction.detach() * mean_prob).sum()


def importance_loss(gates: Tensor, coefficient: float = 1.0) -> Tensor:
    r"""Importance loss of Shazeer et al. (2017): :math:`w \cdot \mathrm{CV}(\mathrm{Importance})^2`.

    :math:`\mathrm{Importance}_i = \sum_b G_{b,i}` (the gate weight each expert received over the
    batch) and :math:`\mathrm{CV}^2 = \mathrm{Var}(\mathrm{Importance}) / \mathrm{Mean}(\mathrm{Importance})^2`
    with the population variance over experts. Zero when every expert gets the same total weight.

    Args:
        gates: ``[B, N]`` gate matrix (see :func:`dense_gates`).
        coefficient: :math:`w`.

    Raises:
        ValueError: for a gate matrix that is not ``[B, N]`` or a negative coefficient.

    Example::

        >>> gates = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # importance (2, 0): mean 1, variance 1
        >>> importance_loss(gates, coefficient=0.5).item()
        0.5
    """
    _check_logits(gates, "gates")
    _check_coefficient(coefficient)
    importance = gates.sum(dim=0)
    mean = importance.mean()
    cv_squared = importance.var(unbiased=False) / (mean * mean + 1e-10)
    return coefficient * cv_squared


def router_z_loss(logits: Tensor, coefficient: float = 1.0) -> Tensor:
    r"""Router z-loss of ST-MoE (Zoph et al., 2022): :math:`c \cdot \frac{1}{B}\sum_b (\log\sum_i e^{z_{b,i}})^2`.

    Keeps router logits small, so the softmax stays in a well-conditioned range.

    Args:
        logits: ``[B, N]`` router logits (before noise).
        coefficient: :math:`c` (ST-MoE uses ``1e-3``).

    Raises:
        ValueError: for logits that are not ``[B, N]`` or a negative coefficient.

    Example::

        >>> round(router_z_loss(torch.zeros(3, 4)).item(), 4)  # logsumexp = log 4
        1.9218
    """
    _check_logits(logits)
    _check_coefficient(coefficient)
    return coefficient * torch.logsumexp(logits, dim=-1).square().mean()


#: The log-share of an expert a sample is not allowed to (finite, so a column of them stays defined).
_EXCLUDED = -1e4


def balanced_assignment(
    logits: Tensor,
    *,
    temperature: float = 0.5,
    iterations: int = 10,
    hard: bool = False,
    allowed: Tensor | None = None,
) -> Tensor:
    r"""``[B, N]`` balanced soft assignment of a batch to the experts, the target of :func:`assignment_loss`.

    Each expert's logits are first standardised over the batch (:math:`(z_i - \bar z_i) / \sigma_i`), which
    removes what a router says about *every* sample (a constant preference for one expert) and keeps what
    it says about *this* sample relative to the others; Sinkhorn iterations on ``exp(z / temperature)``
    then scale rows to sum to one and columns to ``B / N``, so every expert receives an equal share of the
    batch, given to the samples the router ranks highest for it (Clark et al., 2022, S-BASE). No gradient
    flows through the target.

    ``hard=True`` returns the one-hot of each row's largest share instead. This is what breaks a tie between
    experts the router scores alike on every sample: the soft target splits such a sample evenly between
    them (half each), which the router satisfies by keeping their logits equal, so whichever is a hair higher
    wins every top-1 decision and the other is never first; the hard target gives the sample to one of them,
    decided by the sign of that hair relative to the rest of the batch, and the cross-entropy widens the
    difference it was decided on, so the split becomes a stable partition.

    ``allowed`` (``[B, N]`` bool, e.g. which experts classify each sample right) restricts each sample to
    its allowed experts wherever it has any: the others are pushed out by a large penalty before balancing.
    A sample every expert may take, or none, is assigned from the router alone. With the experts that are
    right as ``allowed``, the target is the balanced *oracle* routing: the router's own partition where the
    experts agree, a right expert where they do not.

    Args:
        logits: ``[B, N]`` router logits.
        temperature: sharpness of the assignment (smaller: closer to a hard balanced assignment).
        iterations: Sinkhorn iterations.
        hard: one-hot rows (each sample to its largest share) instead of the soft assignment.
        allowed: ``[B, N]`` bool, the experts each sample may be assigned to, or ``None`` for all.

    Raises:
        ValueError: for logits that are not ``[B, N]`` or a non-positive temperature.
        TypeError: for a ``hard`` that is not a bool.

    Example::

        >>> logits = torch.tensor([[5.0, 4.0], [5.0, 4.5], [5.0, 3.0], [5.0, 4.8]])  # expert 0 first everywhere
        >>> balanced_assignment(logits, temperature=0.1).argmax(dim=-1).tolist()  # yet each takes half
        [0, 1, 0, 1]
        >>> balanced_assignment(logits, hard=True).tolist()[1]
        [0.0, 1.0]
    """
    _check_logits(logits)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"Expected `temperature` to be a positive float, got {temperature!r}.")
    expect_bool(hard, "hard")
    z = logits.detach().float()
    batch, num_experts = z.shape
    if batch < 2:
        return torch.full_like(z, 1.0 / num_experts)
    z = (z - z.mean(dim=0)) / (z.std(dim=0, unbiased=False) + 1e-6)
    log_p = z / temperature
    if allowed is not None:
        if allowed.shape != z.shape:
            raise ValueError(
                f"Expected `allowed` to have the shape of `logits` {tuple(z.shape)}, got {tuple(allowed.shape)}."
            )
        restricted = allowed.any(dim=1, keepdim=True) & ~allowed.bool()
        log_p = log_p.masked_fill(restricted, _EXCLUDED)
    column = torch.log(torch.tensor(batch / num_experts, dtype=z.dtype, device=z.device))
    for _ in range(iterations):
        log_p = log_p - torch.logsumexp(log_p, dim=0, keepdim=True) + column
        log_p = log_p - torch.logsumexp(log_p, dim=1, keepdim=True)
    if hard:
        return torch.nn.functional.one_hot(log_p.argmax(dim=1), num_experts).to(z.dtype)
    return log_p.exp()


def with_other_owners(first: Tensor, owners: Tensor) -> Tensor:
    r"""``[B, N]`` targets that keep each sample's ``first`` expert first and rank its other ``owners`` next.

    For a router that mixes ``k >= 2`` experts: where a sample has other allowed experts (e.g. the other
    specialists of its class), its row gives the first expert weight 2 and each other owner weight 1,
    normalised (``2/3``, ``1/3`` for two owners), so that the cross-entropy of :func:`assignment_loss` ranks
    them second without tying them with the first (a tie would let one of them win every top-1 decision).
    A sample without other owners keeps its one-hot row.

    Args:
        first: ``[B, N]`` one-hot rows (:func:`balanced_assignment` with ``hard=True``).
        owners: ``[B, N]`` bool, the experts each sample may be assigned to.

    Raises:
        ValueError: for shapes that differ or are not ``[B, N]``.

    Example::

        >>> first = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
        >>> owners = torch.tensor([[True, True, False], [False, False, True]])
        >>> [[round(v, 3) for v in row] for row in with_other_owners(first, owners).tolist()]
        [[0.667, 0.333, 0.0], [0.0, 0.0, 1.0]]
    """
    _check_logits(first, "first")
    if owners.shape != first.shape:
        raise ValueError(
            f"Expected `owners` to have the shape of `first` {tuple(first.shape)}, got {tuple(owners.shape)}."
        )
    weights = 2.0 * first + (owners.bool() & (first == 0)).to(first.dtype)
    return weights / weights.sum(dim=1, keepdim=True)


def assignment_loss(logits: Tensor, target: Tensor, coefficient: float = 1.0) -> Tensor:
    r"""Cross-entropy of the router towards a balanced assignment: :math:`-c \frac{1}{B} \sum_b \sum_i T_{b,i} \log p_{b,i}`.

    With ``target = balanced_assignment(logits)`` this teaches the *clean* (evaluation) routing an
    input-dependent, balanced partition of the data. The Switch loss alone is satisfied by routing noise in
    training while the deterministic routing of evaluation sends every sample to the expert with the
    largest constant bias; this loss acts on the clean logits.

    Args:
        logits: ``[B, N]`` clean router logits.
        target: ``[B, N]`` rows summing to one (:func:`balanced_assignment`).
        coefficient: :math:`c`.

    Raises:
        ValueError: for mismatched shapes or a negative coefficient.

    Example::

        >>> logits = torch.zeros(2, 2)
        >>> round(assignment_loss(logits, torch.tensor([[1.0, 0.0], [0.0, 1.0]])).item(), 4)  # log 2
        0.6931
    """
    _check_logits(logits)
    if target.shape != logits.shape:
        raise ValueError(
            f"Expected `target` to have the shape of `logits` {tuple(logits.shape)}, got {tuple(target.shape)}."
        )
    _check_coefficient(coefficient)
    return -coefficient * (target * logits.float().log_softmax(dim=-1)).sum(dim=-1).mean()


def _check_coefficient(coefficient: float) -> None:
    if isinstance(coefficient, bool) or not isinstance(coefficient, (int, float)) or not coefficient >= 0:
        raise ValueError(f"Expected `coefficient` to be a non-negative float, got {coefficient!r}.")

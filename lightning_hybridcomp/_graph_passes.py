"""Passes over traced graphs that make quantized programs right on real architectures.

Two jobs: an inference program must never draw random numbers (dropout in every form, stochastic
depth, any seeded op), and torchao's pattern annotation must see one partition per module call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule, Node

__all__ = [
    "NondeterministicProgramError",
    "check_deterministic",
    "graph_modules",
    "inference_mode_except_batch_norm",
    "random_ops",
    "separate_repeated_module_calls_",
]

# Arguments by which an op that can be random (dropout, rrelu, RNNs, attention) is told to be deterministic:
# a training flag that is off, or a dropout probability of zero.
_DETERMINISTIC_WHEN = {"train": False, "training": False, "p": 0.0, "dropout_p": 0.0}


class NondeterministicProgramError(ValueError):
    """An inference program that still contains an op drawing random numbers (its outputs would vary)."""


@contextlib.contextmanager
def inference_mode_except_batch_norm(network: nn.Module) -> Iterator[nn.Module]:
    """Every module in eval mode except BatchNorm layers, for the block; then each module's own mode again.

    This is the mode in which a quantization-aware training graph is traced. BatchNorm is the one layer
    whose training form PT2E needs (it folds it into the convolution and switches train/eval itself); every
    other mode-dependent behaviour — ``nn.Dropout`` in-place or not, functional dropout reading
    ``self.training``, torchvision's ``StochasticDepth``, drop-path in user code — is decided in Python on
    the module's ``training`` flag, and traced in train mode it would bake random ops into the int8 program.
    Traced here, those layers are the identity they are at inference.
    """
    modes = [(module, module.training) for module in network.modules()]
    try:
        for module, _ in modes:
            module.training = isinstance(module, nn.modules.batchnorm._BatchNorm)
        yield network
    finally:
        for module, mode in modes:
            module.training = mode


def graph_modules(module: nn.Module | torch.export.ExportedProgram) -> Iterator[GraphModule]:
    """The graph modules of an exported program or module, nested graphs (e.g. of control flow) included."""
    root = module.graph_module if isinstance(module, torch.export.ExportedProgram) else module
    for child in root.modules():
        if isinstance(child, GraphModule):
            yield child


def signed_int8_activations(module: nn.Module | torch.export.ExportedProgram) -> bool:
    """Whether a converted int8 graph quantizes activations to signed int8 (XNNPACK's scheme).

    Inductor's x86 int8 kernels (oneDNN ``qconv``/``qlinear``, ``X86InductorQuantizer``'s scheme) take uint8
    activations only: such a graph fails at its first compiled call (``Input tensor should have uint8``).
    """
    for graph_module in graph_modules(module):
        for node in graph_module.graph.nodes:
            name = str(node.target)
            if node.op == "call_function" and "quantize_per_tensor" in name and "dequantize" not in name:
                if torch.int8 in (*node.args, node.kwargs.get("dtype")):
                    return True
    return False


def random_ops(module: nn.Module | torch.export.ExportedProgram) -> list[str]:
    """Names of the operators in a traced graph that draw random numbers, once per call site.

    An operator counts when torch tags it ``nondeterministic_seeded`` (dropout, bernoulli, rand, normal,
    attention, ...) or it is a dropout variant, unless its ``train``/``training`` argument is ``False`` or
    its dropout probability (``p``, ``dropout_p``) is zero — the forms an eval-mode trace leaves, which
    are deterministic (e.g. ``scaled_dot_product_attention`` with ``dropout_p=0.0``).
    """
    found = []
    for graph_module in graph_modules(module):
        for node in graph_module.graph.nodes:
            if node.op == "call_function" and _draws_random_numbers(node):
                found.append(str(node.target))
    return found


def check_deterministic(module: nn.Module | torch.export.ExportedProgram, what: str) -> None:
    """Raise if the traced graph of ``module`` would give different outputs on two calls with one input.

    Raises:
        NondeterministicProgramError: naming the random operators and ``what`` the program is.
    """
    found = random_ops(module)
    if not found:
        return
    counts: dict[str, int] = {}
    for name in found:
        counts[name] = counts.get(name, 0) + 1
    listed = ", ".join(f"{name} x{n}" for name, n in sorted(counts.items()))
    raise NondeterministicProgramError(
        f"{what} draws random numbers ({listed}): its predictions would change from call to call. Layers whose"
        " behaviour depends on the training mode must be traced in eval mode; a forward that calls random ops"
        " unconditionally (e.g. `F.dropout(x, p)` without `training=self.training`) cannot be deployed."
    )


def separate_repeated_module_calls_(graph_module: GraphModule) -> int:
    """Give every call of a module that the forward calls several times its own source partition.

    torchao's pattern annotation groups nodes into partitions by the module that produced them (the last
    ``nn_module_stack`` entry when ``torch.export`` records no ``source_fn_stack``). A module object
    called more than once — torchvision's ResNet blocks apply one ``self.relu`` after ``bn1`` and again
    after the residual addition — then forms a single partition with several outputs, and
    ``X86InductorQuantizer`` stops with "Input partition has more than one output node". Renaming the
    innermost module path of the second and later calls (``layer1.0.relu`` -> ``layer1.0.relu#1``) makes
    each call the one-output partition the annotator expects; nothing else reads these names.

    Returns:
        The number of calls renamed.
    """
    by_module: dict[str, list[Node]] = {}
    for node in graph_module.graph.nodes:
        if node.op != "call_function" or node.meta.get("source_fn_stack"):
            continue
        stack = node.meta.get("nn_module_stack")
        if stack:
            by_module.setdefault(_innermost(stack)[0], []).append(node)
    renamed = 0
    for fqn, nodes in by_module.items():
        members = set(nodes)
        outputs = [n for n in nodes if any(user not in members for user in n.users)]
        if len(outputs) < 2:
            continue  # already the one-output partition the annotator expects
        for index, call in enumerate(_connected_groups(nodes)):
            if index == 0:
                continue
            for node in call:
                stack = dict(node.meta["nn_module_stack"])
                key = next(reversed(stack))
                _, cls = stack[key]
                stack[f"{key}#{index}"] = (f"{fqn}#{index}", cls)
                del stack[key]
                node.meta["nn_module_stack"] = stack
            renamed += 1
    return renamed


def _innermost(stack: dict[str, Any]) -> tuple[str, Any]:
    fqn, cls = list(stack.values())[-1]
    return str(fqn), cls


def _connected_groups(nodes: list[Node]) -> list[list[Node]]:
    """The nodes split into groups connected through data edges among themselves, in graph order."""
    parent = {node: node for node in nodes}

    def root(node: Node) -> Node:
        while parent[node] is not node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for node in nodes:
        for producer in node.all_input_nodes:
            if producer in parent:
                parent[root(node)] = root(producer)
    groups: dict[Node, list[Node]] = {}
    for node in nodes:
        groups.setdefault(root(node), []).append(node)
    return list(groups.values())


def _draws_random_numbers(node: Node) -> bool:
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return False
    seeded = torch.Tag.nondeterministic_seeded in target.tags or "dropout" in target._opname
    if not seeded:
        return False
    for index, argument in enumerate(target._schema.arguments):
        if argument.name not in _DETERMINISTIC_WHEN:
            continue
        if argument.name in node.kwargs:
            value = node.kwargs[argument.name]
        elif index < len(node.args):
            value = node.args[index]
        else:
            value = argument.default_value if argument.has_default_value() else None
        if (
            value is not None
            and not isinstance(value, torch.fx.Node)
            and value == _DETERMINISTIC_WHEN[argument.name]
        ):
            return False
    return True

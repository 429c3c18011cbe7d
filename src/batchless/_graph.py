"""The layer that feeds each normalization layer, found in a model's ``torch.fx`` graph."""

from __future__ import annotations

from collections import Counter

from torch import fx, nn
from torch.nn.utils import parametrize

from .modules import _BatchlessNorm

# The producers: layers whose weight's dim 0 is their output channels
PRODUCERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class _Tracer(fx.Tracer):
    """The default tracer, with batchless layers and the layers looked for as leaves."""

    def __init__(self, leaves: tuple[type, ...]):
        super().__init__()
        self.leaves = (_BatchlessNorm, *leaves)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self.leaves) or super().is_leaf_module(m, qualname)


def producer_pairs(root: nn.Module, layer_types: tuple[type, ...], accept, untraceable: list[str],
                   name: str = "") -> list[tuple[nn.Module, nn.Module]]:
    """``(producer, layer)`` for every layer of ``layer_types`` in ``root`` (named ``name``) each of
    whose calls, in the ``torch.fx`` graph, takes the direct output of an ``nn.Conv1d/2d/3d`` or
    ``nn.Linear`` called once whose output goes nowhere else and that ``accept(producer, layer,
    attrs)`` accepts (``attrs``: the graph's attribute reads of it). Modules that torch.fx cannot
    trace are added to ``untraceable``, and their children traced on their own."""
    if isinstance(root, layer_types) or not any(isinstance(m, layer_types) for m in root.modules()):
        return []
    try:
        graph = _Tracer(layer_types).trace(root)
    except Exception as error:  # untraceable (control flow on values, ...): each child on its own
        first_line = (str(error).strip().splitlines() or [""])[0]
        untraceable.append(f"{name or '<root>'} ({type(root).__name__}: {type(error).__name__}: "
                           f"{first_line})")
        return [pair for child_name, child in root.named_children()
                for pair in producer_pairs(child, layer_types, accept, untraceable,
                                           f"{name}.{child_name}" if name else child_name)]
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    attrs = [node.target for node in graph.nodes if node.op == "get_attr"]
    sites: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(root.get_submodule(node.target), layer_types):
            sites.setdefault(node.target, []).append(node)

    def producer(node: fx.Node, layer: nn.Module) -> nn.Module | None:
        src = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        if (not isinstance(src, fx.Node) or src.op != "call_module" or len(src.users) != 1
                or calls[src.target] != 1):
            return None
        module = root.get_submodule(src.target)
        prefix = src.target + "."
        # (exact types: a subclass may compute something else; a parametrized one is its base's)
        kind = type(module).__bases__[0] if parametrize.is_parametrized(module) else type(module)
        ok = kind in PRODUCERS and accept(
            module, layer, [a for a in attrs if a == src.target or a.startswith(prefix)])
        return module if ok else None

    pairs = []
    for target, nodes in sites.items():
        layer = root.get_submodule(target)
        producers = [producer(node, layer) for node in nodes]
        if all(p is not None for p in producers):
            pairs += [(p, layer) for p in producers]
    return pairs

"""The structural checker. The PassManager runs it at pipeline boundaries always, and after
every pass with `--verify`. Errors name the node and show its neighbours.

Checks:
1. every node input is defined before use: a graph input, an initializer, an earlier
   node's output, or (in a subgraph) a value of an enclosing scope;
2. every graph output is defined;
3. value names are unique within the model;
4. onnx's own checker accepts the model (op schemas, attributes, opset imports).
"""

from __future__ import annotations

import onnx
import onnx_ir as ir

from slimgraph.errors import SlimgraphError
from slimgraph.ir.model import Model


class CheckError(SlimgraphError):
    """The model is structurally invalid."""


def _describe(node: ir.Node) -> str:
    ins = ", ".join(v.name if v is not None else "<none>" for v in node.inputs)
    outs = ", ".join(v.name for v in node.outputs)
    producers = sorted({v.producer().name or v.producer().op_type for v in node.inputs if v is not None and v.producer() is not None})
    users = sorted({u.node.name or u.node.op_type for v in node.outputs for u in v.uses()})
    return (f"{node.op_type} node {node.name!r} ({ins}) -> ({outs}); "
            f"fed by {producers or 'nothing'}, feeding {users or 'nothing'}")


def _check_graph(graph: ir.Graph, outer: set[str], names: dict[str, str], where: str) -> list[str]:
    problems: list[str] = []
    defined = set(outer)
    for v in [*graph.inputs, *graph.initializers.values()]:
        defined.add(v.name)
    for node in graph:
        for v in node.inputs:
            if v is not None and v.name and v.name not in defined:
                problems.append(f"{where}: input {v.name!r} is used before it is defined, by {_describe(node)}")
        for attr in node.attributes.values():
            subgraphs = [attr.value] if attr.type == ir.AttributeType.GRAPH else (
                list(attr.value) if attr.type == ir.AttributeType.GRAPHS else [])
            for sub in subgraphs:
                problems += _check_graph(sub, defined, names, f"{where} > {node.op_type} {node.name!r}.{attr.name}")
        for v in node.outputs:
            if not v.name:  # an omitted optional output
                continue
            if v.name in names and names[v.name] != (node.name or node.op_type):
                problems.append(f"{where}: value name {v.name!r} is produced twice (also by {names[v.name]!r})")
            names[v.name] = node.name or node.op_type
            defined.add(v.name)
    for v in graph.outputs:
        if v.name not in defined:
            problems.append(f"{where}: graph output {v.name!r} is never produced")
    return problems


def check(model: Model, *, where: str = "model", onnx_checker: bool = True) -> None:
    """Raise `CheckError` listing what is wrong; return None for a valid model."""
    from slimgraph.ir.io import PROTO_LIMIT, model_nbytes

    problems = _check_graph(model.graph, set(), {}, where)
    # onnx's checker serializes the model: impossible past protobuf's 2 GB limit.
    if not problems and onnx_checker and model_nbytes(model) < PROTO_LIMIT - 64 * 2**20:
        try:
            onnx.checker.check_model(model.to_proto(), full_check=False)
        except onnx.checker.ValidationError as e:
            first = str(e).strip().splitlines()[0]
            problems.append(f"{where}: onnx checker: {first}")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckError("; ".join(problems[:3]) + more)

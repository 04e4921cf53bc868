"""strip_metadata: drop exporters' debug metadata from nodes and the graph (exact).

torch's dynamo exporter writes each node's Python namespace, class hierarchy and name
scopes into its metadata_props, and onnxscript's rewriter the rule that made it: about
1 KB per node, which is most of a compressed small model's file; into the graph's
metadata_props it writes the ExportedProgram's graph signature (a line per parameter), and
into the graph inputs' the export's input specs. slimgraph's own keys
(`slimgraph.*`: provenance, annotations, pack marks) are kept unless `keep_slimgraph`
is false; the provenance (torch module path) already says where a node came from.
"""

from __future__ import annotations

from slimgraph.ir.model import ANNOTATION_PREFIX
from slimgraph.passes.base import Pass, PassConfig, PassResult, choice, register_pass


@register_pass
class StripMetadata(Pass):
    """Remove exporter debug metadata (namespaces, class hierarchies, rule names) from nodes (exact)."""

    name = "strip_metadata"
    preserves = ("shapes", "macs", "params")

    class Config(PassConfig):
        #: keep slimgraph's own keys (provenance, annotations, pack marks)
        keep_slimgraph: bool = choice(True, False, default=True)

    def run(self, model, ctx) -> PassResult:
        prefix = ANNOTATION_PREFIX.split(".")[0] + "."
        removed = 0
        for node in model.nodes(recursive=True):
            for key in list(node.metadata_props):
                if not (self.config.keep_slimgraph and key.startswith(prefix)):
                    del node.metadata_props[key]
                    removed += 1
        graphs = (model.graph, *model.graph.subgraphs())
        values = [v for g in graphs for v in (*g.inputs, *g.outputs, *g.initializers.values())]
        values += [v for n in model.nodes(recursive=True) for v in n.outputs]
        for holder in (*graphs, *values):
            for key in list(holder.metadata_props):
                if not (self.config.keep_slimgraph and key.startswith(prefix)):
                    del holder.metadata_props[key]
                    removed += 1
        return PassResult(model, removed > 0, {"entries_removed": removed})

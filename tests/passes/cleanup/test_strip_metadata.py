"""strip_metadata on a torch-exported model: node, graph and value metadata from the
exporter go, slimgraph's keys stay, outputs unchanged."""

import numpy as np

import slimgraph
from slimgraph import zoo
from slimgraph.backends import ort


def test_exporter_metadata_goes_everywhere_and_slimgraph_keys_stay():
    model = slimgraph.load(zoo.digits_cnn())
    assert model.graph.metadata_props and model.graph.inputs[0].metadata_props  # torch's graph signature, input specs
    model.graph.metadata_props["slimgraph.note"] = "kept"
    out = slimgraph.run(model, "strip_metadata")
    stripped = out.model
    assert dict(stripped.graph.metadata_props) == {"slimgraph.note": "kept"}
    assert not stripped.graph.inputs[0].metadata_props
    assert all(not k.startswith("pkg.") for n in stripped.graph for k in n.metadata_props)
    assert out.report.rows[-1].stats["entries_removed"] > 0
    feeds = {"input": zoo.digits_test_data()["input"][:32]}
    np.testing.assert_array_equal(ort.run(ort.session(model), feeds)["logits"],
                                  ort.run(ort.session(stripped), feeds)["logits"])

import numpy as np

import slimgraph
from slimgraph.passes import PassContext, get_pass
from slimgraph.passes.quantize._layers import find_layers
from slimgraph.passes.quantize.sensitivity import (
    OutputError, activation_ranges, layer_sensitivity, simulate, sqnr_db,
)
from tests.helpers import ops
from tests.passes.quantize._models import with_weights

MLP = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 8] x) => (float[N, 4] y) {
  h1 = MatMul(x, w1)
  r1 = Relu(h1)
  h2 = MatMul(r1, w2)
  r2 = Relu(h2)
  h3 = MatMul(r2, w3)
  r3 = Relu(h3)
  y = MatMul(r3, w4)
}
"""


def fragile_mlp(rng, outliers=None):
    """A 4-layer MLP. `outliers` {k: f}: channel 0 of layer k's input is f times larger
    than the rest (weight column of layer k-1 times f, weight row of layer k divided by f),
    which the float model does not notice but a per-tensor 8-bit input of layer k does."""
    w = [(rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32) for s in ((8, 16), (16, 16), (16, 16), (16, 4))]
    for k, f in (outliers or {}).items():
        w[k - 2][:, 0] *= f
        w[k - 1][0, :] /= f
    return with_weights(MLP, w1=w[0], w2=w[1], w3=w[2], w4=w[3])


def layer_at(model, output):
    return next(layer for layer in find_layers(model)[0] if layer.output.name == output)


def data(rng, n=64):
    return {"x": rng.standard_normal((n, 8)).astype(np.float32)}


def test_simulate_quantizes_only_the_chosen_layer(rng):
    model = fragile_mlp(rng)
    layers = find_layers(model)[0]
    qparams = activation_ranges(model, layers, data(rng), method="minmax", progress=False)
    sim = simulate(model, [layers[2]], qparams)
    assert ops(sim) == ["MatMul", "Relu", "MatMul", "Relu", "QuantizeLinear", "DequantizeLinear",
                        "MatMul", "Relu", "MatMul"]
    changed = [not np.array_equal(a.weight, b.weight) for a, b in zip(layers, find_layers(sim)[0])]
    assert changed == [False, False, True, False]
    assert ops(model).count("QuantizeLinear") == 0  # the input model is untouched


def test_error_and_sqnr(rng):
    model = fragile_mlp(rng)
    ref = OutputError(model, data(rng))
    assert ref.error(model) == 0.0 and sqnr_db(0.0) == 300.0
    assert sqnr_db(0.01) == 40.0


def test_fragile_layer_ranks_first(rng):
    model = fragile_mlp(rng, {3: 300.0})
    ranking = layer_sensitivity(model, data(rng))
    assert ranking[0].name == layer_at(model, "h3").name
    assert ranking[0].rank == 1 and [s.rank for s in ranking] == [1, 2, 3, 4]
    assert ranking[0].sqnr < ranking[1].sqnr - 10  # by a wide margin (dB)
    assert all(s.sqnr > 25 for s in ranking[1:])


def test_pass_annotates_only_and_is_truthful_about_it(rng):
    model = fragile_mlp(rng, {3: 300.0})
    ctx = PassContext(data=data(rng), progress=False)
    sens = get_pass("quantize.sensitivity")()
    result = sens(model, ctx)
    assert result.modified and ops(model) == ["MatMul", "Relu"] * 3 + ["MatMul"]
    node = layer_at(model, "h3").node
    assert slimgraph.Model.annotation(node, "quantize.sensitivity_rank") == 1
    assert abs(slimgraph.Model.annotation(node, "quantize.sqnr") - result.stats["ranking"][0]["sqnr_db"]) < 0.01
    again = sens(model, ctx)  # same data, same annotations: nothing changes
    assert not again.modified


def test_sensitivity_survives_save(tmp_path, rng):
    model = fragile_mlp(rng, {3: 300.0})
    result = slimgraph.run(model, "quantize.sensitivity", data=data(rng))
    path = tmp_path / "m.onnx"
    slimgraph.save(result.model, path)
    loaded = slimgraph.load(path)
    ranks = {layer.output.name: slimgraph.Model.annotation(layer.node, "quantize.sensitivity_rank")
             for layer in find_layers(loaded)[0]}
    assert ranks["h3"] == 1 and sorted(ranks.values()) == [1, 2, 3, 4]

import itertools

import numpy as np
import pytest

import slimgraph
from slimgraph.errors import PipelineError
from slimgraph.passes import PassContext, get_pass
from slimgraph.passes.quantize._layers import find_layers
from slimgraph.passes.quantize.sensitivity import (
    OutputError, activation_ranges, layer_report, layer_report_markdown, simulate,
)
from tests.helpers import ort_outputs
from tests.passes.quantize.test_sensitivity import data, fragile_mlp

#: layer 3's input has a 300x outlier channel, layer 2's a 30x one
OUTLIERS = {3: 300.0, 2: 30.0}


def mixed(model, ctx, **config):
    result = get_pass("quantize.mixed_precision")(config)(model, ctx)
    decided = {layer.output.name: slimgraph.Model.annotation(layer.node, "quantize.precision")
               for layer in find_layers(model)[0]}
    skipped = {layer.output.name for layer in find_layers(model)[0]
               if slimgraph.Model.annotation(layer.node, "quantize.skip")}
    return result, decided, skipped


def test_meets_the_budget_with_the_fewest_float_layers(rng):
    model, d = fragile_mlp(rng, OUTLIERS), data(rng)
    result, decided, skipped = mixed(model, PassContext(data=d, progress=False), max_error=0.02)
    assert skipped == {"h3", "h2"}
    assert decided == {"h1": "int8", "h2": "float", "h3": "float", "y": "int8"}
    assert result.stats["error"] <= 0.02 < result.stats["error_all_int8"]
    assert result.modified
    # brute force: no single layer in float meets the budget, so two is the fewest
    layers = find_layers(model)[0]
    qparams = activation_ranges(model, layers, d, method="minmax", progress=False)
    ref = OutputError(model, d)
    for keep in itertools.combinations(range(len(layers)), 1):
        assert ref.error(simulate(model, [l for i, l in enumerate(layers) if i not in keep], qparams)) > 0.02


@pytest.mark.parametrize("budget, expected", [(0.15, {"h3"}), (0.5, set())])  # all int8: 0.23
def test_looser_budgets_keep_fewer_layers_and_clear_old_decisions(budget, expected, rng):
    model, d = fragile_mlp(rng, OUTLIERS), data(rng)
    ctx = PassContext(data=d, progress=False)
    mixed(model, ctx, max_error=0.02)
    result, decided, skipped = mixed(model, ctx, max_error=budget)
    assert skipped == expected
    assert sorted(n for n, p in decided.items() if p == "float") == sorted(expected)
    assert result.stats["float_layers"] == [find_layers(model)[0][2].name] * len(expected)


def test_max_drop_with_a_user_metric(rng):
    model, d = fragile_mlp(rng, OUTLIERS), data(rng)
    reference = ort_outputs(model, d)["y"]

    def negative_rmse(outputs, labels):
        return -float(np.sqrt(np.mean((outputs["y"] - reference) ** 2)))

    scale = float(np.sqrt(np.mean(reference**2)))
    ctx = PassContext(data=d, progress=False, options={"metric": negative_rmse})
    result, _, skipped = mixed(model, ctx, max_drop=0.02 * scale)
    assert skipped == {"h3", "h2"} and result.stats["drop"] <= 0.02 * scale


def test_max_drop_top1_against_labels(rng):
    model, d = fragile_mlp(rng, OUTLIERS), data(rng, 256)
    labels = ort_outputs(model, d)["y"].argmax(1)
    ctx = PassContext(data=d, labels=labels, progress=False)
    result, _, skipped = mixed(model, ctx, max_drop=0.01, samples=256)
    assert result.stats["drop"] <= 0.01 < result.stats["drop_all_int8"]
    assert "h3" in skipped


def test_max_drop_without_metric_or_labels_is_an_error(rng):
    model = fragile_mlp(rng, OUTLIERS)
    with pytest.raises(PipelineError, match="needs a metric"):
        mixed(model, PassContext(data=data(rng), progress=False), max_drop=0.01)


def test_in_a_pipeline_after_sensitivity(rng):
    model = fragile_mlp(rng, OUTLIERS)
    result = slimgraph.run(model, "quantize.sensitivity,quantize.mixed_precision", data=data(rng))
    rows = {row.name: row for row in result.report.rows}
    assert rows["quantize.mixed_precision"].stats["float_layers"]
    table = layer_report(result.model)
    assert [(r["rank"], r["precision"]) for r in table] == [(1, "float"), (2, "float"), (3, "int8"), (4, "int8")]
    assert all(r["sqnr_db"] > 0 for r in table) and "| 1 |" in layer_report_markdown(table)
    with pytest.raises(PipelineError, match="must run after .quantize.sensitivity"):
        slimgraph.run(model, "quantize.mixed_precision,quantize.sensitivity", data=data(rng))

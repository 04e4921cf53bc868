import numpy as np
import pytest

from slimgraph.passes import get_pass
from tests.helpers import assert_same_outputs, parse

OLD = """
<ir_version: 5, opset_import: ["" : 10]>
g (float[2,3] x) => (float[2] y) {
    axes_sum = ReduceSum <axes = [1], keepdims = 0> (x)
    y = Clip <min = 0.0, max = 6.0> (axes_sum)
}
"""


@pytest.mark.parametrize("opset", [7, 10])
def test_old_model_is_upgraded_to_21(opset):
    # Clip's min/max attributes and ReduceSum's axes attribute became inputs since.
    model = parse(OLD.replace('"" : 10', f'"" : {opset}'))
    before = model.clone()
    result = get_pass("upgrade_opset")(target=21)(model)
    assert result.modified and model.opset == 21
    assert result.stats == {"from": opset, "to": 21}
    assert_same_outputs(before, model, {"x": np.array([[1, 2, 3], [-4, 5, 9]], np.float32)})


def test_newer_model_is_never_downgraded():
    model = parse(OLD.replace('"" : 10', '"" : 21').replace("ir_version: 5", "ir_version: 10")
                  .replace("<axes = [1], keepdims = 0> (x)", "<keepdims = 0> (x, ax)")
                  .replace("{\n", "{\n    ax = Constant <value = int64[1] {1}> ()\n", 1)
                  .replace("<min = 0.0, max = 6.0> (axes_sum)", "(axes_sum)"))
    result = get_pass("upgrade_opset")(target=17)(model)
    assert not result.modified and model.opset == 21


def test_target_out_of_range_is_a_config_error():
    from slimgraph.errors import PipelineError

    with pytest.raises(PipelineError, match="target"):
        get_pass("upgrade_opset")(target=3)

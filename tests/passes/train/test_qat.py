"""train.qat: trains through fake quantizers with learnable scales and deploys what it trained."""

import pytest

pytest.importorskip("torch")

import slimgraph  # noqa: E402
from slimgraph import zoo  # noqa: E402
from slimgraph.backends import ort, runtime_check  # noqa: E402

pytestmark = pytest.mark.torch


@pytest.mark.parametrize("bits", ["auto", 4])
def test_qat_exports_integer_kernels_that_match_the_simulation(bits):
    d, test = zoo.digits_data(), zoo.digits_test_data()
    base = slimgraph.run(zoo.digits_cnn(), "optimize, upgrade_opset(target=21)").model
    result = slimgraph.run(base, f"train.qat(bits={bits}, epochs=1)", data={"input": d.x_train}, labels=d.y_train)
    stats = result.report.rows[-1].stats
    assert stats["deploy_agreement"] >= 0.99  # the exported model predicts what the QAT model did
    if bits == 4:
        assert stats["weight_bits"] == {4: 4}
    (logits,) = ort.run_batched(result.model, {"input": test["input"]}).values()
    assert float((logits.argmax(1) == test["labels"]).mean()) > 0.97
    check = runtime_check.check_runtime(result.model)
    assert check.integer_mac_share == 1.0 and not check.islands


def test_per_tensor_weights_one_scale_per_weight_tensor():
    d = zoo.digits_data()
    base = slimgraph.run(zoo.digits_mlp(), "optimize, upgrade_opset(target=21)").model
    result = slimgraph.run(base, "train.qat(bits=4, per_channel=false, epochs=1)", data={"input": d.x_train[:512]},
                           labels=d.y_train[:512])
    assert result.report.rows[-1].stats["deploy_agreement"] >= 0.99
    scales = [result.model.graph.initializers[n.inputs[4].name].const_value.numpy()
              for n in result.model.graph if n.op_type in ("QGemm", "QLinearMatMul", "QLinearConv")]
    assert scales and all(s.size == 1 for s in scales)

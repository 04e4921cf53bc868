import numpy as np
import pytest

import slimgraph
from slimgraph.errors import PassError, PipelineError
from slimgraph.passes import Pass, PassContext, PassResult, register_pass
from slimgraph.passes.manager import PassManager
from tests.helpers import parse
from tests.passes.test_pipeline import _Late  # noqa: F401  (registers test.late)

MODEL = """
<ir_version: 8, opset_import: ["" : 15]>
g (float[1,4] x) => (float[1,4] y) {
    k = Constant <value = float[4] {1, 2, 3, 4}> ()
    i = Identity (x)
    a = Add (i, k)
    b = Add (i, k)
    s = Add (a, b)
    dead = Neg (s)
    y = Relu (s)
}
"""


@register_pass
class _Breaks(Pass):
    """Test pass that claims to be exact but changes the output."""

    name = "test.breaks_output"

    def run(self, model, ctx):
        relu = next(n for n in model.graph if n.op_type == "Relu")
        relu.op_type = "Neg"
        return PassResult(model, True)


@register_pass
class _NeedsData(Pass):
    """Test pass that requires data."""

    name = "test.needs_data"
    requires = ("data",)

    def run(self, model, ctx):
        return PassResult(model, False)


def test_cleanup_reaches_fixed_point_and_reports_each_pass():
    model = parse(MODEL)
    result = slimgraph.run(model, "cleanup", verify=True)
    assert [n.op_type for n in result.model.graph] == ["Add", "Add", "Relu"]
    rows = result.report.rows
    assert rows[0].name == "unpack" and not rows[0].modified  # nothing packed here
    assert rows[1].name == "lift_constants" and rows[1].modified
    assert rows[1].nodes == (7, 6)
    assert all(r.error is None or r.error <= 1e-5 for r in rows)
    # The last iteration of the fixed point changed nothing.
    loop = ("lift_constants", "fold_constants", "eliminate_identity", "simplify", "cse", "eliminate_dead")
    fp = [r for r in rows if r.name in loop]
    assert not any(r.modified for r in fp[-len(loop):])
    assert "| cse | yes |" in result.report.to_markdown()


def test_input_model_is_never_modified():
    model = parse(MODEL)
    before = model.content_hash()
    slimgraph.run(model, "cleanup")
    assert model.content_hash() == before and model.version == 0


def test_exact_pass_that_changes_outputs_fails_with_reproducer(tmp_path):
    model = parse(MODEL)
    with pytest.raises(PassError, match="declared exact, but moved the outputs") as e:
        PassManager("test.breaks_output", verify=True, dump_dir=tmp_path).run(model, PassContext())
    assert "reproduce with: slimgraph run" in str(e.value)
    assert (tmp_path / "test.breaks_output.input.onnx").exists()
    assert (tmp_path / "reproduce.sh").exists()


def test_validation_reports_missing_data_and_order_together():
    with pytest.raises(PipelineError) as e:
        PassManager("test.needs_data,test.late,cse").validate(PassContext())
    msg = str(e.value)
    assert "'test.needs_data' needs sample data" in msg and "'test.late' must run after 'cse'" in msg


def test_verify_uses_given_data():
    model = parse(MODEL)
    data = {"x": np.linspace(-3, 3, 12, dtype=np.float32).reshape(3, 4)}
    result = slimgraph.run(model, "cleanup", data=data, verify=True)
    assert any(r.error is not None for r in result.report.rows)


def test_modified_bumps_version_and_invalidates_analyses():
    model = parse(MODEL)
    macs_before = model.analysis("params")
    assert model.analysis("params") is macs_before  # cached
    from slimgraph.passes import get_pass

    get_pass("lift_constants")()(model)
    assert model.version == 1
    assert model.analysis("params") is not macs_before


def test_verify_without_data_on_a_model_that_needs_real_inputs_says_so():
    # Reshape to a fixed 4 elements fails for generated input with dynamic dim N = 1.
    model = parse("""
    <ir_version: 8, opset_import: ["" : 15]>
    g (float[N] x) => (float[2,2] y) <int64[2] shape = {2, 2}> {
        y = Reshape (x, shape)
    }
    """)
    from slimgraph.errors import DataError

    with pytest.raises(DataError, match="verification needs real inputs.*--data"):
        slimgraph.run(model, "cleanup", verify=True)
    ok = slimgraph.run(model, "cleanup", verify=True, data={"x": np.ones((2, 4), np.float32)})
    assert ok.report.rows


@register_pass
class _BadData(Pass):
    """Test pass that finds the data unusable."""

    name = "test.bad_data"

    def run(self, model, ctx):
        from slimgraph.errors import DataError

        raise DataError("sample 3 has the wrong shape")


def test_bad_input_found_by_a_pass_keeps_its_type_and_names_the_pass():
    from slimgraph.errors import DataError

    with pytest.raises(DataError, match="pass 'test.bad_data': sample 3 has the wrong shape") as e:
        slimgraph.run(parse(MODEL), "test.bad_data")
    assert e.value.exit_code == 2

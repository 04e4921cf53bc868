"""Item 5 of the pruning issue: fusion and quantization keep pruned zeros and N:M patterns
(the contracts pass and the content shows it), and a pass that fills them is failed by the
PassManager, by name."""

import numpy as np
import onnx_ir as ir
import pytest

import slimgraph
from slimgraph import zoo
from slimgraph.errors import PassError
from slimgraph.passes import Pass, PassResult, contracts, register_pass
from slimgraph.passes.prune.sparsity import count_zeros, nm_shapes, weight_views
from tests.passes.prune._graphs import mlp


@register_pass
class _Densify(Pass):
    """test: adds 1e-3 to every float weight of a compute op (fills pruned zeros)"""

    name = "test.densify_weights"
    exact = False

    def run(self, model, ctx):
        for node in model.graph:
            if node.op_type in ("Conv", "Gemm", "MatMul") and node.inputs[1].const_value is not None:
                v = node.inputs[1]
                v.const_value = ir.tensor(v.const_value.numpy() + np.float32(1e-3), name=v.name)
        return PassResult(model, True)


@register_pass
class _Shuffle(Pass):
    """test: permutes each weight's elements (same zero count, N:M pattern broken)"""

    name = "test.shuffle_weights"
    exact = False

    def run(self, model, ctx):
        rng = np.random.default_rng(0)
        for node in model.graph:
            if node.op_type in ("Conv", "Gemm", "MatMul") and node.inputs[1].const_value is not None:
                v = node.inputs[1]
                w = v.const_value.numpy()
                v.const_value = ir.tensor(rng.permutation(w.ravel()).reshape(w.shape), name=v.name)
        return PassResult(model, True)


@pytest.fixture(scope="module")
def digits():
    model = slimgraph.load(zoo.digits_cnn())
    return model, {"input": zoo.digits_data().x_train[:128]}


@pytest.mark.parametrize("recipe", ["fuse", "int8", "int8-qdq", "int8-dynamic"])
def test_recipes_keep_pruned_zeros(digits, recipe):
    model, data = digits
    pruned = slimgraph.run(model, "cleanup,prune.magnitude(sparsity=0.8)").model
    before = count_zeros(pruned)
    out = slimgraph.run(pruned, recipe, data=data).model  # the manager checks the contract after each pass
    assert contracts.check(out) == []
    assert count_zeros(out) >= before
    if recipe == "int8":  # the weights really are int8 now: zeros counted at the zero point
        assert {v.op for v in weight_views(out)} == {"QLinearConv", "QGemm"}


@pytest.mark.parametrize("recipe", ["fuse", "int8", "int8-qdq", "int8-dynamic"])
def test_recipes_keep_n_m(digits, recipe):
    model, data = digits
    pruned = slimgraph.run(model, "cleanup,prune.n_m").model
    wanted = nm_shapes(pruned, 2, 4)
    out = slimgraph.run(pruned, recipe, data=data).model
    assert contracts.check(out) == []
    have = nm_shapes(out, 2, 4)
    assert all(have[s] >= c for s, c in wanted.items()), (wanted, have)


def test_a_pass_filling_zeros_is_failed_by_name():
    pruned = slimgraph.run(mlp(), "prune.magnitude(sparsity=0.5)").model
    with pytest.raises(PassError, match=r"test.densify_weights.*sparsity contract broken: the compute weights "
                                        r"hold 0 zero elements, fewer than the 8192"):
        slimgraph.run(pruned, "test.densify_weights")


def test_a_pass_breaking_n_m_is_failed_by_name():
    pruned = slimgraph.run(mlp(), "prune.n_m").model
    with pytest.raises(PassError, match=r"test.shuffle_weights.*n_m contract broken: 0 weight\(s\) of shape "
                                        r"\[64, 128\] \(reduction axis last\) are 2:4, 1 were"):
        slimgraph.run(pruned, "test.shuffle_weights")


def test_contracts_survive_packing_and_unpacking(tmp_path):
    pruned = slimgraph.run(mlp(), "prune.magnitude(sparsity=0.6),prune.n_m,pack.sparse").model
    assert any("slimgraph.pack" in n.metadata_props for n in pruned.graph)
    assert contracts.check(pruned) == []  # read through the decode subgraphs
    slimgraph.save(pruned, tmp_path / "m.onnx")
    again = slimgraph.run(slimgraph.load(tmp_path / "m.onnx"), "cleanup,fuse").model
    assert not any("slimgraph.pack" in n.metadata_props for n in again.graph)
    assert contracts.check(again) == []


@pytest.mark.slow
def test_minilm_int8_dynamic_keeps_pruned_embeddings_and_linears():
    model = slimgraph.load(zoo.minilm())
    pruned = slimgraph.run(model, "cleanup,prune.magnitude(sparsity=0.8, embeddings=true)").model
    before = count_zeros(pruned)
    out = slimgraph.run(pruned, "int8-dynamic").model
    ops = {v.op for v in weight_views(out)}
    assert {"GatherBlockQuantized", "DynamicQuantizeMatMul"} <= ops or "MatMulIntegerToFloat" in ops
    assert count_zeros(out) >= before and contracts.check(out) == []


@pytest.mark.parametrize("recipe", ["int4-weights", "int8-dynamic"])
def test_weight_quantizers_keep_zeros_of_matmuls(recipe):
    """MatMulNBits (4-bit codes, zero point 8 or packed) and DynamicQuantizeMatMul weights are
    read at their zero points."""
    pruned = slimgraph.run(mlp(), "prune.magnitude(sparsity=0.8, keep_first_last=false)").model
    before = count_zeros(pruned)
    out = slimgraph.run(pruned, recipe).model
    ops = {v.op for v in weight_views(out)}
    assert ops & {"MatMulNBits", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}, ops
    assert count_zeros(out) >= before and contracts.check(out) == []

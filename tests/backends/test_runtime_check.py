"""The runtime check on small QDQ / QOperator models written as text: float islands and the
reason read from the graph around each, the pitfall warnings (S8S8 on x86, u8s8 pair-sum
saturation without VNNI, ConvInteger with int8 weights), MAC coverage and Q/DQ counts.

The CPU is passed in (`CpuInfo`), so the warnings are tested for x86 with and without
VNNI and for ARM on any machine; one test also shows on this machine that ORT's u8s8
kernel really saturates where the check says it can."""

import json

import numpy as np
import onnx
import onnx.numpy_helper as nh
import onnx.parser
import pytest

from slimgraph.backends import ort
from slimgraph.backends import runtime_check as rc
from slimgraph.backends.runtime_check import Cause, CpuInfo, PitfallKind

NO_VNNI = CpuInfo("x86_64", frozenset({"sse4_1", "avx", "avx2", "fma"}))
VNNI = CpuInfo("x86_64", frozenset({"avx2", "avx512f", "avx512_vnni"}))
ARM = CpuInfo("aarch64", frozenset({"asimd", "asimddp"}))

SCALES = {
    "s": np.array(0.02, np.float32), "zu": np.array(128, np.uint8), "z8": np.array(0, np.int8),
    "ws": np.array(0.01, np.float32), "s16": np.array(0.001, np.float32), "z16": np.array(0, np.uint16),
}


def make(body: str, inputs="float[1,4,8,8] x", outputs="float[1,4,8,8] y", opset=21, **weights) -> onnx.ModelProto:
    """A model from its body; initializers from SCALES and `weights`, only those used."""
    proto = onnx.parser.parse_model(
        f'<ir_version: 10, opset_import: ["" : {opset}, "com.microsoft" : 1]> g ({inputs}) => ({outputs}) {{ {body} }}')
    used = {i for n in proto.graph.node for i in n.input}
    for name, value in {**SCALES, **weights}.items():
        if name in used:
            proto.graph.initializer.append(nh.from_array(value, name))
    return proto


def int8_weights(shape, low=-127, high=128, seed=0):
    return np.random.default_rng(seed).integers(low, high, shape).astype(np.int8)


def check(proto, cpu=NO_VNNI, **kwargs) -> rc.RuntimeCheck:
    return rc.check_runtime(proto, cpu=cpu, on_warning=lambda p: None, **kwargs)


def only_island(result: rc.RuntimeCheck) -> rc.Island:
    assert len(result.islands) == 1, [i.nodes for i in result.islands]
    return result.islands[0]


# --- the CPU -----------------------------------------------------------------------------------
def test_cpu_info_reads_vnni_from_cpuinfo_flags(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse4_1 avx2 avx512_vnni\n")
    info = rc.cpu_info(path)
    assert info.vnni is True and info.model == "Some CPU"
    path.write_text("processor\t: 0\nflags\t\t: fpu sse4_1 avx avx2 fma\n")
    assert rc.cpu_info(path).vnni is False
    assert rc.cpu_info(tmp_path / "missing").vnni is None


# --- float islands and their reasons ------------------------------------------------------------
QDQ_CONV_TO_OUTPUT = """
    xq = QuantizeLinear(x, s, zu)
    xd = DequantizeLinear(xq, s, zu)
    wd = DequantizeLinear(w, ws, z8)
    c = Conv<pads=[1,1,1,1]>(xd, wd)
    y = Relu(c)
"""


def test_qdq_conv_whose_output_is_not_quantized_stays_float():
    result = check(make(QDQ_CONV_TO_OUTPUT, w=int8_weights((4, 4, 3, 3), -60, 60)))
    island = only_island(result)
    assert island.causes[0].cause is Cause.DQ_TO_FLOAT
    assert "DequantizeLinear feeding a float op" in island.reasons[0]
    assert "model output 'y'" in island.reasons[0] and "QLinearConv" in island.reasons[0]
    assert result.integer_macs == 0 and result.float_macs == 4 * 4 * 9 * 64
    assert result.integer_mac_share == 0.0


def test_conv_feeding_quantize_and_a_float_op_keeps_the_chain_float():
    body = """
    xq = QuantizeLinear(x, s, zu)
    xd = DequantizeLinear(xq, s, zu)
    wd = DequantizeLinear(w, ws, z8)
    c = Conv<pads=[1,1,1,1]>(xd, wd)
    cq = QuantizeLinear(c, s, zu)
    cd = DequantizeLinear(cq, s, zu)
    r = Relu(c)
    y = Add(cd, r)
    """
    island = only_island(check(make(body, w=int8_weights((4, 4, 3, 3), -60, 60))))
    causes = {c.op.split(":")[-1]: c.cause for c in island.causes}
    assert causes["Relu"] is Cause.FOLLOWS  # explained by the Conv before it
    assert Cause.DQ_TO_FLOAT in (causes.get("Conv"), causes.get("FusedConv"))
    assert all("follows" not in r for r in island.reasons)


def test_unfused_qdq_pattern():
    # ORT 1.2x-1.3x has a QLinearConvTranspose kernel but no QDQ fusion into it
    body = """
    xq = QuantizeLinear(x, s, zu)
    xd = DequantizeLinear(xq, s, zu)
    wd = DequantizeLinear(w, ws, z8)
    c = ConvTranspose(xd, wd)
    cq = QuantizeLinear(c, s, zu)
    y = DequantizeLinear(cq, s, zu)
    """
    island = only_island(check(make(body, outputs="float[1,4,10,10] y", w=int8_weights((4, 4, 3, 3), -60, 60))))
    assert island.causes[0].cause is Cause.UNFUSED_QDQ
    assert island.reasons[0].startswith("unfused QDQ pattern: DequantizeLinear -> ConvTranspose -> QuantizeLinear")


def test_unfused_qdq_names_a_float_constant_input():
    body = """
    xq = QuantizeLinear(x, s, zu)
    xd = DequantizeLinear(xq, s, zu)
    m = Mul(xd, half)
    mq = QuantizeLinear(m, s, zu)
    y = DequantizeLinear(mq, s, zu)
    """
    island = only_island(check(make(body, half=np.full((1, 4, 1, 1), 0.5, np.float32))))
    assert island.causes[0].cause is Cause.UNFUSED_QDQ
    assert "'half' is a float constant" in island.reasons[0]


def test_16_bit_qdq_has_no_integer_kernel():
    body = """
    xq = QuantizeLinear(x, s16, z16)
    xd = DequantizeLinear(xq, s16, z16)
    wd = DequantizeLinear(w, ws, z8)
    c = Conv<pads=[1,1,1,1]>(xd, wd)
    cq = QuantizeLinear(c, s16, z16)
    y = DequantizeLinear(cq, s16, z16)
    """
    island = only_island(check(make(body, w=int8_weights((4, 4, 3, 3), -60, 60))))
    assert island.causes[0].cause is Cause.TYPE_COMBINATION
    assert "type combination has no kernel" in island.reasons[0] and "uint16" in island.reasons[0]


def test_op_without_integer_kernel():
    body = """
    xq = QuantizeLinear(x, s, zu)
    xd = DequantizeLinear(xq, s, zu)
    e = Erf(xd)
    eq = QuantizeLinear(e, s, zu)
    y = DequantizeLinear(eq, s, zu)
    """
    island = only_island(check(make(body)))
    assert island.causes[0].cause is Cause.NO_INTEGER_KERNEL
    assert island.reasons == ["no integer kernel for Erf in ONNX Runtime: Erf 'Erf_2' runs in float between "
                              "DequantizeLinear and QuantizeLinear"]


def test_float_model_is_one_island_rooted_at_its_input():
    body = """
    c = Conv<pads=[1,1,1,1]>(x, w)
    y = Relu(c)
    """
    result = check(make(body, w=np.ones((4, 4, 3, 3), np.float32)))
    island = only_island(result)
    assert [c.cause for c in island.causes if c.cause is not Cause.FOLLOWS] == [Cause.FLOAT_INPUT]
    assert "reads the float model input 'x'" in island.reasons[0]
    assert result.quantize_nodes == result.dequantize_nodes == 0
    assert island.time_share is not None and 0 < island.time_share <= 1


# --- a fully integer QOperator model -------------------------------------------------------------
def qlinear_conv(weights: np.ndarray, x_type="uint8", group=1, cin=None) -> onnx.ModelProto:
    cin = cin or weights.shape[1] * group
    cout = weights.shape[0]
    z = "zu" if x_type == "uint8" else "z8"
    body = f"""
    xq = QuantizeLinear(x, s, {z})
    c = QLinearConv<pads=[1,1,1,1], group={group}>(xq, s, {z}, w, ws, z8, s, {z})
    y = DequantizeLinear(c, s, {z})
    """
    return make(body, inputs=f"float[1,{cin},8,8] x", outputs=f"float[1,{cout},8,8] y", w=weights)


def test_qoperator_model_runs_integer_from_input_to_output():
    result = check(qlinear_conv(int8_weights((8, 4, 3, 3), -60, 60)))
    assert result.islands == []
    assert result.integer_macs == 8 * 4 * 9 * 64 and result.integer_mac_share == 1.0
    assert (result.quantize_nodes, result.quantize_at_inputs) == (1, 1)
    assert (result.dequantize_nodes, result.dequantize_at_outputs) == (1, 1)
    kinds = {n.op: n.kind.value for n in result.nodes}
    assert kinds["QLinearConv"] == "integer" and kinds["QuantizeLinear"] == "boundary"
    conv = next(n for n in result.nodes if n.op == "QLinearConv")
    assert conv.input_dtypes[:4] == ("uint8", "float", "uint8", "int8")
    assert sum(n.time_share for n in result.nodes) == pytest.approx(1.0)
    json.dumps(result.as_dict())  # the CLI's --json


# --- pitfalls ------------------------------------------------------------------------------------
def test_int8_weights_warn_of_u8s8_saturation_without_vnni():
    weights = int8_weights((8, 4, 3, 3))  # full int8 range: adjacent pairs reach 255 * 250
    result = check(qlinear_conv(weights))
    [pitfall] = [p for p in result.pitfalls if p.kind is PitfallKind.U8S8_SATURATION]
    assert pitfall.message.startswith("this CPU has no VNNI: u8s8 kernels can saturate int16 pair sums; "
                                      "weights wider than 7 bits at risk")
    [node] = pitfall.nodes
    detail = pitfall.details[node]
    assert detail["worst_pair_sum"] > 32767 or detail["worst_pair_sum"] < -32768
    assert detail["activation_range"] == [0, 255] and not detail["observed"]
    # the pair really is adjacent in the kernel's K order (NHWC: kh, kw, ci)
    rows = np.moveaxis(weights, 1, -1).reshape(8, -1).astype(int)
    pair = detail["worst_pair"]
    assert any(list(rows[detail["output_channel"], k:k + 2]) == pair for k in range(0, rows.shape[1], 2))


def test_no_saturation_warning_with_vnni_on_arm_or_for_7_bit_weights():
    full = qlinear_conv(int8_weights((8, 4, 3, 3)))
    for cpu in (VNNI, ARM):
        assert not [p for p in check(full, cpu=cpu).pitfalls if p.kind is PitfallKind.U8S8_SATURATION]
    seven_bit = qlinear_conv(int8_weights((8, 4, 3, 3), -64, 64))
    assert check(seven_bit).pitfalls == []


def test_depthwise_conv_does_not_saturate():
    # MLAS's depthwise kernel widens to 16 bits before multiplying
    assert check(qlinear_conv(int8_weights((4, 1, 3, 3)), group=4)).pitfalls == []


def test_observed_activation_range_decides_saturation():
    weights = np.full((4, 4, 3, 3), 127, np.int8)
    model = qlinear_conv(weights)
    # x in [-2.56, -2.0] quantizes (scale 0.02, zero point 128) to uint8 in [0, 28]:
    # pairs reach 28 * 254 = 7112, far from 32767
    small = {"x": np.random.default_rng(0).uniform(-2.56, -2.0, (8, 1, 4, 8, 8)).astype(np.float32)}
    assert check(model, data=small).pitfalls == []
    large = {"x": np.random.default_rng(0).uniform(0.0, 2.5, (8, 1, 4, 8, 8)).astype(np.float32)}
    [pitfall] = check(model, data=large).pitfalls
    detail = next(iter(pitfall.details.values()))
    assert detail["observed"] and detail["activation_range"][1] > 230


def test_the_saturation_the_check_predicts_happens_on_this_cpu():
    """MatMulInteger u8 x s8 with every adjacent weight pair at 127 + 127: exact sums need
    int32; on x86 without VNNI ORT returns 32767 per pair instead."""
    k, n = 64, 8
    w = np.full((k, n), 127, np.int8)
    model = make("y = MatMulInteger(a, w)", inputs=f"uint8[1,{k}] a", outputs=f"int32[1,{n}] y", w=w)
    cpu = rc.cpu_info()
    result = check(model, cpu=cpu)
    warned = [p for p in result.pitfalls if p.kind is PitfallKind.U8S8_SATURATION]
    a = np.full((1, k), 255, np.uint8)
    got = ort.run(model, {"a": a})["y"]
    exact = a.astype(np.int32) @ w.astype(np.int32)
    if cpu.x86 and cpu.vnni is False:
        assert warned and warned[0].details["MatMulInteger_0"]["worst_pair_sum"] == 255 * 254
        assert (got == 32767 * (k // 2)).all() and not (got == exact).all()
    elif cpu.vnni:
        assert not warned and (got == exact).all()


def test_s8s8_qoperator_on_x86_warns():
    model = qlinear_conv(int8_weights((8, 4, 3, 3), -60, 60), x_type="int8")
    [pitfall] = check(model).pitfalls
    assert pitfall.kind is PitfallKind.S8S8_X86 and "S8S8" in pitfall.message
    assert check(model, cpu=ARM).pitfalls == []


def test_qdq_s8s8_is_converted_by_ort_and_does_not_warn_s8s8():
    body = """
    xq = QuantizeLinear(x, s, z8)
    xd = DequantizeLinear(xq, s, z8)
    wd = DequantizeLinear(w, ws, z8)
    c = Conv<pads=[1,1,1,1]>(xd, wd)
    cq = QuantizeLinear(c, s, z8)
    y = DequantizeLinear(cq, s, z8)
    """
    result = check(make(body, w=int8_weights((4, 4, 3, 3), -60, 60)))
    assert result.islands == [] and result.pitfalls == []
    conv = next(n for n in result.nodes if n.op == "QLinearConv")
    assert conv.input_dtypes[0] == "uint8"  # ORT's QDQ s8 -> u8 conversion on x86


def test_convinteger_with_int8_weights_warns_and_its_rescale_is_an_island():
    body = """
    xq, xs, xz = DynamicQuantizeLinear(x)
    ci = ConvInteger<pads=[1,1,1,1]>(xq, w, xz)
    cf = Cast<to=1>(ci)
    sc = Mul(xs, ws)
    y = Mul(cf, sc)
    """
    result = check(make(body, w=int8_weights((4, 4, 3, 3))))
    assert [p.kind for p in result.pitfalls] == [PitfallKind.CONVINTEGER_INT8]  # ConvInteger widens: no pair sums
    island = only_island(result)
    assert {c.cause for c in island.causes} == {Cause.FLOAT_RESULT}
    assert any("int32 result of ConvInteger" in r for r in island.reasons)
    assert result.integer_mac_share == 1.0


def test_warnings_come_before_the_profiling_run(monkeypatch):
    events = []
    real = ort.runtime_report

    def recording(*args, **kwargs):
        events.append(f"report(profile={kwargs.get('profile', True)})")
        return real(*args, **kwargs)

    monkeypatch.setattr(ort, "runtime_report", recording)
    rc.check_runtime(qlinear_conv(int8_weights((8, 4, 3, 3))), cpu=NO_VNNI,
                     on_warning=lambda p: events.append(p.kind.value))
    assert events == ["report(profile=False)", "u8s8-saturation", "report(profile=True)"]


@pytest.mark.skipif(not rc.cpu_info().x86, reason="ORT's int8 -> uint8 QDQ rewrite is x86-only")
def test_shared_int8_activation_stays_int8_and_float_on_x86():
    """ORT's default QDQ (int8 activations) on a residual block: the input's
    DequantizeLinear feeds the Conv and the Add; ORT gives each its own copy, and then its
    one-to-one int8 -> uint8 rewrite skips that QuantizeLinear, so both stay float."""
    body = """
    xq = QuantizeLinear(x, s, z8)
    xd = DequantizeLinear(xq, s, z8)
    wd = DequantizeLinear(w, ws, z8)
    c = Conv<pads=[1,1,1,1]>(xd, wd)
    cq = QuantizeLinear(c, s, z8)
    cd = DequantizeLinear(cq, s, z8)
    m = MaxPool<kernel_shape=[3,3], pads=[1,1,1,1]>(cd)
    mq = QuantizeLinear(m, s, z8)
    md = DequantizeLinear(mq, s, z8)
    a = Add(md, xd)
    aq = QuantizeLinear(a, s, z8)
    y = DequantizeLinear(aq, s, z8)
    """
    result = check(make(body, w=int8_weights((4, 4, 3, 3), -60, 60)))
    reasons = {c.op.split(":")[-1]: c.reason for i in result.islands for c in i.causes}
    assert "activations are still int8" in reasons["Conv"] and "'QuantizeLinear_0' feeds 2" in reasons["Conv"]
    assert "QLinearAdd only with uint8 activations" in reasons["Add"]
    # the same graph with uint8 activations is fused end to end
    uint8 = check(make(body.replace("s, z8)", "s, zu)").replace("ws, zu)", "ws, z8)"),
                       w=int8_weights((4, 4, 3, 3), -60, 60)))
    assert uint8.islands == [] and uint8.integer_mac_share == 1.0

"""ONNX Runtime: sessions, runs, benchmarks, and what ORT really executes.

1. `session(model, ...)`: an `onnxruntime.InferenceSession` from a `Model`, path, bytes,
   `onnx.ModelProto` or `onnx_ir.Model`, on CPU (default) or CUDA. Thread-pool spinning is
   off by default: with two sessions alive, one session's idle spinning threads steal the
   other's cores and skew every comparison. When ORT refuses the model, the error is an
   `UnsupportedOpError` (no kernel, unknown op or domain) or a `ModelLoadError` (invalid
   model) naming the node and op and saying what to do.
2. `run(model_or_session, feeds)` -> {output name: array}; `run_batched` runs `[N, ...]`
   arrays one `[i:i+1]` slice at a time (in batches when every input's first dim is
   dynamic) and concatenates the outputs.
3. `bench(models, feeds)`: creates every session first, then times them interleaved
   (round-robin, the order rotated each round) so drift in machine load hits all models
   alike; returns the median and spread per model.
4. `runtime_report(model)`: the graph ORT executes after its own optimizations, read from
   the optimized model it writes, with each node's execution provider (from ORT's record
   of its graph partitioning and a short profiling run) and its kernel kind
   (`op_kinds.OP_KINDS`: integer, quantize boundary, float, ...).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import json
import logging
import os
import re
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Union

import google.protobuf.message
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import external_data_helper
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from slimgraph import data as sg_data
from slimgraph.backends.op_kinds import OpKind, resolve
from slimgraph.errors import DataError, ModelLoadError, PipelineError, SlimgraphError, UnsupportedOpError
from slimgraph.ir.model import Model

logger = logging.getLogger("slimgraph.backends.ort")

ModelSource = Union[Model, ir.Model, onnx.ModelProto, bytes, str, os.PathLike]

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
if hasattr(ort.GraphOptimizationLevel, "ORT_ENABLE_LAYOUT"):  # onnxruntime >= 1.22
    OPTIMIZATION_LEVELS["layout"] = ort.GraphOptimizationLevel.ORT_ENABLE_LAYOUT

#: Exceptions the ORT bindings raise for a model or run they refuse.
ORT_ERRORS: tuple[type[Exception], ...] = tuple(
    getattr(ort_state, name) for name in (
        "Fail", "InvalidArgument", "InvalidGraph", "InvalidProtobuf", "NoSuchFile", "NoModel",
        "NotImplemented", "RuntimeException", "EPFail", "ModelLoaded", "NotFound", "EngineError",
    ) if hasattr(ort_state, name)
)
_PROTO_LIMIT = 2**31 - 64 * 2**20  # above this, hand ORT a file with external data
_ORT_LOG_ERRORS_ONLY = 3  # ORT's log severity: 0 verbose .. 3 error, 4 fatal
_MIN_STABLE_RUNS = 20


# --- providers --------------------------------------------------------------------------------
def available_providers() -> list[str]:
    """The execution providers this onnxruntime build offers (not all need hardware present)."""
    return list(ort.get_available_providers())


@functools.lru_cache(maxsize=None)
def has_cuda() -> bool:
    """True when onnxruntime-gpu is installed *and* a CUDA session really starts on a GPU."""
    if PROVIDERS["cuda"] not in available_providers():
        return False
    tiny = onnx.parser.parse_model(
        '<ir_version: 8, opset_import: ["" : 17]> g (float[1] x) => (float[1] y) { y = Identity(x) }'
    )
    try:
        probe = ort.InferenceSession(tiny.SerializeToString(), providers=[PROVIDERS["cuda"]])
    except ORT_ERRORS as e:
        logger.info("CUDAExecutionProvider is installed but did not start: %s", _short(str(e)))
        return False
    return PROVIDERS["cuda"] in probe.get_providers()


def _providers(provider: str) -> list[str]:
    if provider not in PROVIDERS:
        raise PipelineError(f"unknown provider {provider!r}; choose one of {sorted(PROVIDERS)}")
    if provider == "cpu":
        return [PROVIDERS["cpu"]]
    if not has_cuda():
        raise PipelineError(
            "provider 'cuda' needs onnxruntime-gpu and a visible NVIDIA GPU "
            f"(this onnxruntime offers {available_providers()}); "
            "pip install onnxruntime-gpu, or use provider='cpu'"
        )
    return [PROVIDERS["cuda"], PROVIDERS["cpu"]]  # nodes CUDA cannot run fall back to CPU


# --- sessions ---------------------------------------------------------------------------------
def session_options(
    *, threads: int | None = None, optimization: str = "all", spinning: bool = False,
    optimized_model_path: str | os.PathLike | None = None,
) -> ort.SessionOptions:
    """The SessionOptions `session` uses; exposed so callers can add config entries."""
    if optimization not in OPTIMIZATION_LEVELS:
        raise PipelineError(
            f"unknown ORT optimization level {optimization!r}; choose one of {sorted(OPTIMIZATION_LEVELS)}"
        )
    options = ort.SessionOptions()
    options.graph_optimization_level = OPTIMIZATION_LEVELS[optimization]
    options.log_severity_level = _ORT_LOG_ERRORS_ONLY
    if threads is not None:
        options.intra_op_num_threads = int(threads)
    flag = "1" if spinning else "0"
    options.add_session_config_entry("session.intra_op.allow_spinning", flag)
    options.add_session_config_entry("session.inter_op.allow_spinning", flag)
    if optimization == "disable":
        # Reference mode: ORT also pre-packs constant weights (LSTM, MatMul) into other
        # kernels, which moves outputs by up to ~3e-5 relative once a pass turns computed
        # weights into initializers (silero-vad). Off, so a check measures the pass only.
        options.add_session_config_entry("session.disable_prepacking", "1")
    if optimized_model_path is not None:
        options.optimized_model_filepath = str(optimized_model_path)
    return options


def session(
    model: ModelSource, *, provider: str = "cpu", threads: int | None = None,
    optimization: str = "all", spinning: bool = False,
    optimized_model_path: str | os.PathLike | None = None,
) -> ort.InferenceSession:
    """An ORT session for `model`. `threads=None` lets ORT pick (one per physical core);
    `optimized_model_path` makes ORT write the graph it will execute there."""
    options = session_options(
        threads=threads, optimization=optimization, spinning=spinning,
        optimized_model_path=optimized_model_path,
    )
    return create_session(model, options, provider=provider)


def create_session(
    model: ModelSource, options: ort.SessionOptions, *, provider: str = "cpu",
) -> ort.InferenceSession:
    """An ORT session with explicit options; ORT's refusals become slimgraph errors."""
    providers = _providers(provider)
    with _ort_input(model) as (arg, where, proto_of):
        try:
            sess = ort.InferenceSession(arg, options, providers=providers)
        except ORT_ERRORS as e:
            raise translate_load_error(e, where, proto_of, provider) from None
    if providers[0] not in sess.get_providers():
        raise PipelineError(f"{where}: ORT did not start {providers[0]} (it runs {sess.get_providers()})")
    return sess


@contextlib.contextmanager
def _ort_input(model: ModelSource) -> Iterator[tuple[Any, str, Callable[[], onnx.ModelProto | None]]]:
    """(what InferenceSession takes, a name for messages, a lazy proto for error details).
    Models too large for one protobuf go through a temporary file with external data."""
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.is_file():
            raise ModelLoadError(f"{path}: no such file")
        yield str(path), str(path), lambda: onnx.load(str(path), load_external_data=False)
        return
    if isinstance(model, (bytes, bytearray, memoryview)):
        data = bytes(model)
        yield data, "<bytes>", lambda: _parse_or_none(data)
        return
    if isinstance(model, ir.Model):
        model = Model(model)
    if isinstance(model, Model):
        where = model.source or "<model>"
        proto = self_contained_proto(model)
    elif isinstance(model, onnx.ModelProto):
        where, proto = "<ModelProto>", model
    else:
        raise ModelLoadError(
            f"cannot make an ORT session from a {type(model).__name__}: pass a slimgraph Model, "
            "a path, bytes or an onnx.ModelProto"
        )
    if proto.ByteSize() < _PROTO_LIMIT:
        yield proto.SerializeToString(), where, lambda: proto
        return
    with tempfile.TemporaryDirectory(prefix="slimgraph-ort-") as tmp:
        path = Path(tmp) / "model.onnx"
        onnx.save_model(proto, path, save_as_external_data=True, location="model.onnx.data")
        yield str(path), where, lambda: proto


def self_contained_proto(model: Model) -> onnx.ModelProto:
    """`model` as a proto holding all its weights. A model loaded from a file with external
    data keeps them as references relative to that file's folder, which ORT cannot resolve
    from bytes; their data is read in here."""
    folders = {
        value.name: value.const_value.base_dir
        for graph in model.ir.graphs() for value in graph.initializers.values()
        if isinstance(value.const_value, ir.ExternalTensor)
    }
    proto = model.to_proto()
    if not folders:
        return proto
    for tensor in external_data_helper._get_all_tensors(proto):
        if external_data_helper.uses_external_data(tensor) and tensor.name in folders:
            external_data_helper.load_external_data_for_tensor(tensor, str(folders[tensor.name]))
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
    return proto


def _parse_or_none(data: bytes) -> onnx.ModelProto | None:
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except (google.protobuf.message.DecodeError, ValueError) as e:
        logger.debug("bytes do not parse as ONNX for error details: %s", e)
        return None
    return proto


# --- turning ORT's refusals into one-line errors ---------------------------------------------
_NO_KERNEL = re.compile(r"Could not find an implementation for (\w+)\((\d+)\) node with name '([^']*)'")
_UNKNOWN_DOMAIN_OP = re.compile(r"Fatal error: ([\w.]*):(\w+)\((-?\d+)\) is not a registered function/op")
_NO_SCHEMA = re.compile(
    r'In Node, \("([^"]*)", (\w+), "([^"]*)".*No Op registered for \w+ with domain_version of (\d+)', re.S
)
_NEW_OPSET = re.compile(
    r"Opset (\d+) is under development.*?support for domain (\S+) is till opset (\d+)", re.S
)
_TYPE_ERROR = re.compile(
    r"Type '([^']+)' of input parameter \(([^)]*)\) of operator \((\w+)\) in node \(([^)]*)\) is invalid"
)
_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ")
_SOURCE_LOCATION = re.compile(r"^/\S+:\d+ [^(]*\([^)]*\)\s*")


def _short(message: str, limit: int = 300) -> str:
    text = _SOURCE_LOCATION.sub("", _ORT_PREFIX.sub("", message.strip())).strip()
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)
            for sub in attr.graphs:
                yield from _all_nodes(sub)


def _value_types(graph: onnx.GraphProto) -> dict[str, str]:
    """{value name: "float" / "double" / ...} for what the graph declares."""
    def name(elem_type: int) -> str:
        return onnx.helper.tensor_dtype_to_string(elem_type).removeprefix("TensorProto.").lower()

    out = {t.name: name(t.data_type) for t in graph.initializer}
    for v in [*graph.input, *graph.value_info, *graph.output]:
        if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type:
            out[v.name] = name(v.type.tensor_type.elem_type)
    return out


def _constant_types(graph: onnx.GraphProto) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{initializer name: (dtype as ORT's profile names it, shape)}, subgraphs included."""
    out = {}
    for g in [graph, *(a.g for n in _all_nodes(graph) for a in n.attribute if a.type == onnx.AttributeProto.GRAPH),
              *(sub for n in _all_nodes(graph) for a in n.attribute for sub in a.graphs)]:
        for t in g.initializer:
            dtype = onnx.helper.tensor_dtype_to_string(t.data_type).removeprefix("TensorProto.").lower()
            out[t.name] = (dtype, tuple(int(d) for d in t.dims))
    return out


def _describe_node(proto: onnx.ModelProto | None, op_type: str, name: str, domain: str | None = None) -> str:
    """`node 'conv1' (Conv, inputs x: double)`, found in the model when ORT gave no name."""
    if proto is None:
        return f"node {name!r} ({op_type})" if name else f"a {op_type} node"
    matches = [
        n for n in _all_nodes(proto.graph)
        if n.op_type == op_type and (not name or n.name == name) and (domain is None or n.domain == domain)
    ]
    if not matches:
        return f"node {name!r} ({op_type})" if name else f"a {op_type} node"
    node = matches[0]
    types = _value_types(proto.graph)
    inputs = ", ".join(f"{i}: {types[i]}" if i in types else i for i in node.input if i)
    label = f"node {node.name!r}" if node.name else f"the unnamed node producing {list(node.output)}"
    more = f" and {len(matches) - 1} more {op_type} node(s)" if len(matches) > 1 else ""
    return f"{label} ({op_type}, inputs {inputs}){more}"


def translate_load_error(
    error: Exception, where: str, proto_of: Callable[[], onnx.ModelProto | None], provider: str = "cpu",
) -> SlimgraphError:
    """The slimgraph error for an exception ORT raised while loading a model."""
    message = str(error)
    ep = PROVIDERS.get(provider, provider)
    if m := _NO_KERNEL.search(message):
        op, version, name = m.groups()
        node = _describe_node(proto_of(), op, name)
        return UnsupportedOpError(
            f"{where}: ONNX Runtime's {ep} has no kernel for {op} (opset {version}) with these input "
            f"types, at {node}; cast its inputs to a supported type (float32 usually) or replace the op"
        )
    if m := _UNKNOWN_DOMAIN_OP.search(message):
        domain, op, _ = m.groups()
        node = _describe_node(proto_of(), op, "", domain)
        return UnsupportedOpError(
            f"{where}: ONNX Runtime does not know op {op!r} in domain {domain!r}, at {node}; "
            "rewrite it into standard ONNX ops or register its custom-op library with ORT"
        )
    if m := _NO_SCHEMA.search(message):
        name, op, domain, version = m.groups()
        node = _describe_node(proto_of(), op, name, domain)
        return UnsupportedOpError(
            f"{where}: no op {op!r} exists in opset {version} of domain {domain or 'ai.onnx'!r}, at {node}; "
            "check the op name and the model's opset_import"
        )
    if m := _TYPE_ERROR.search(message):
        dtype, param, op, name = m.groups()
        node = _describe_node(proto_of(), op, name)
        return ModelLoadError(
            f"{where}: invalid model: input {param!r} of {node} has type {dtype}, which the ONNX "
            f"spec of {op} does not allow; insert a Cast or fix the exporter"
        )
    if m := _NEW_OPSET.search(message):
        opset, domain, newest = m.groups()
        return ModelLoadError(
            f"{where}: opset {opset} of {domain} is newer than this ONNX Runtime supports (up to {newest}); "
            f"convert the model to opset {newest} or older, or upgrade onnxruntime"
        )
    if isinstance(error, getattr(ort_state, "NotImplemented")):
        return UnsupportedOpError(f"{where}: ONNX Runtime ({ep}) cannot run this model: {_short(message)}")
    if isinstance(error, (ort_state.InvalidProtobuf, ort_state.NoSuchFile)):
        return ModelLoadError(f"{where}: ONNX Runtime cannot read the model: {_short(message)}")
    return ModelLoadError(
        f"{where}: ONNX Runtime rejected the model: {_short(message)}; "
        "run onnx.checker.check_model on it to find the broken node"
    )


# --- running ----------------------------------------------------------------------------------
_NP_FROM_ORT = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16,
    "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(uint16)": np.uint16,
    "tensor(bool)": np.bool_,
}


def _as_session(model_or_session: ModelSource | ort.InferenceSession) -> ort.InferenceSession:
    if isinstance(model_or_session, ort.InferenceSession):
        return model_or_session
    return session(model_or_session)


def _fmt_arg(arg: Any) -> str:
    return f"{arg.name}: {arg.type}{list(arg.shape)}"


def check_feeds(
    sess: ort.InferenceSession, feeds: Mapping[str, Any], *, allow_extra: bool = False,
) -> dict[str, np.ndarray]:
    """The feeds the session needs, as arrays of its input dtypes. Missing (or, unless
    `allow_extra`, unexpected) names and uncastable dtypes are `DataError`s."""
    inputs = sess.get_inputs()
    names = [i.name for i in inputs]
    missing = [n for n in names if n not in feeds]
    extra = sorted(set(feeds) - set(names))
    extra = [] if allow_extra else extra
    if missing or extra:
        declared = ", ".join(_fmt_arg(i) for i in inputs)
        raise DataError(
            f"feeds {sorted(feeds)} do not match the model's inputs ({declared})"
            + (f"; missing {missing}" if missing else "") + (f"; unexpected {extra}" if extra else "")
        )
    out = {}
    for arg in inputs:
        array = np.asarray(feeds[arg.name])
        want = _NP_FROM_ORT.get(arg.type)
        if want is not None and array.dtype != want:
            if not np.can_cast(array.dtype, want, casting="same_kind"):
                raise DataError(f"feed {arg.name!r} has dtype {array.dtype}; the model wants {arg.type}")
            array = array.astype(want)
        out[arg.name] = array
    return out


def run(
    model_or_session: ModelSource | ort.InferenceSession, feeds: Mapping[str, Any],
) -> dict[str, np.ndarray]:
    """Run once; returns {output name: array}. A model (not a session) gets a default session."""
    sess = _as_session(model_or_session)
    arrays = check_feeds(sess, feeds)
    names = [o.name for o in sess.get_outputs()]
    try:
        values = sess.run(names, arrays)
    except ORT_ERRORS as e:
        if isinstance(e, ort_state.InvalidArgument):
            shapes = {k: list(v.shape) for k, v in arrays.items()}
            raise DataError(f"ONNX Runtime refused the feeds {shapes}: {_short(str(e))}") from None
        raise SlimgraphError(
            f"ONNX Runtime failed while running the model: {_short(str(e))}; check the inputs' "
            "shapes and values against what the named node expects"
        ) from None
    return dict(zip(names, values))


def generate_feeds(sess: ort.InferenceSession, *, seed: int = 0) -> dict[str, np.ndarray]:
    """One random input per session input, dynamic dims set to 1 (see `slimgraph.data`)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for arg in sess.get_inputs():
        dtype = _NP_FROM_ORT.get(arg.type)
        if dtype is None:
            raise DataError(f"input {arg.name!r} has type {arg.type}; pass real feeds for it")
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in arg.shape]
        feeds[arg.name] = sg_data.rng_sample(rng, dtype, shape)
    return feeds


def run_batched(
    model_or_session: ModelSource | ort.InferenceSession, data: Mapping[str, np.ndarray], *,
    batch_size: int | None = None,
) -> dict[str, np.ndarray]:
    """Run N samples (`{input: array}` in a layout of `slimgraph.data`: batched, sample i
    is `a[i:i+1]`, or stacked, sample i is `a[i]`) one at a time, and concatenate the
    outputs along axis 0. When every input's first dim is dynamic, `batch_size` samples
    (default 32) go in one run instead."""
    sess = _as_session(model_or_session)
    inputs = sess.get_inputs()
    ranks = {i.name: len(i.shape) for i in inputs}
    data = check_feeds(sess, data)
    counts = {k: len(a) for k, a in data.items() if a.ndim}
    if not counts:
        raise DataError(f"data {sorted(data)} holds no [N, ...] arrays; store samples along axis 0")
    if len(set(counts.values())) > 1:
        raise DataError(f"data arrays have different sample counts {counts}; all must be [N, ...]")
    n = next(iter(counts.values()))
    dynamic = all(r > 0 and not isinstance(i.shape[0], int) for i, r in zip(inputs, ranks.values()))
    step = (batch_size or 32) if dynamic else 1
    if batch_size and batch_size > 1 and not dynamic:
        logger.info("the model has a fixed batch dim: running one sample at a time, not %d", batch_size)
    chunks: dict[str, list[np.ndarray]] = collections.defaultdict(list)
    for start in range(0, n, step):
        for name, value in run(sess, sg_data.sample(data, ranks, start, step)).items():
            chunks[name].append(value)
    return {
        name: np.concatenate(parts) if parts[0].ndim else np.stack(parts) for name, parts in chunks.items()
    }


# --- benchmarking -----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BenchStats:
    """Latency of one model, in milliseconds."""

    median: float
    p10: float
    p90: float
    mean: float
    std: float
    runs: int
    threads: int | None
    provider: str
    #: every timed run, in round order (see `ratio_to`)
    times: tuple[float, ...] = dataclasses.field(repr=False, default=())

    @classmethod
    def from_times(cls, times_ms: list[float], *, threads: int | None, provider: str) -> BenchStats:
        a = np.asarray(times_ms, dtype=np.float64)
        return cls(
            median=float(np.median(a)), p10=float(np.percentile(a, 10)), p90=float(np.percentile(a, 90)),
            mean=float(a.mean()), std=float(a.std()), runs=len(a), threads=threads, provider=provider,
            times=tuple(float(t) for t in a),
        )

    def as_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "times"}

    def ratio_to(self, baseline: BenchStats) -> float:
        """Median over rounds of this model's time / the baseline's time in the same round.
        Both must come from one `bench` call (`times` are in round order): pairing runs
        cancels load drifts that hit both models, so it is steadier than a ratio of medians."""
        if len(self.times) != len(baseline.times):
            raise ValueError("ratio_to needs two BenchStats from the same bench call")
        return float(np.median(np.asarray(self.times) / np.asarray(baseline.times)))


def bench(
    models: Mapping[str, ModelSource | ort.InferenceSession], feeds: Mapping[str, Any] | None = None, *,
    runs: int = 30, warmup: int = 5, threads: int | None = 2, provider: str = "cpu",
    optimization: str = "all", progress: bool = False,
) -> dict[str, BenchStats]:
    """Time each model on `feeds` (shared; each model takes the keys it needs; `None`:
    random inputs from each model's declared shapes). All sessions are created first with
    spinning off; warm-up and timed runs go round-robin across the models, the order
    rotated each round. Sessions passed in are used as they are."""
    if runs < 1 or warmup < 0:
        raise ValueError(f"bench needs runs >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    if runs < _MIN_STABLE_RUNS:
        logger.info("bench with %d runs: medians of fewer than %d runs are noisy", runs, _MIN_STABLE_RUNS)
    sessions = {
        name: m if isinstance(m, ort.InferenceSession) else session(
            m, provider=provider, threads=threads, optimization=optimization, spinning=False)
        for name, m in models.items()
    }
    model_feeds = {
        name: generate_feeds(s) if feeds is None else check_feeds(s, feeds, allow_extra=True)
        for name, s in sessions.items()
    }
    names = list(sessions)
    times: dict[str, list[float]] = {name: [] for name in names}
    with _progress(progress, len(names) * (warmup + runs), "benchmarking") as advance:
        for round_ in range(warmup + runs):
            shift = round_ % len(names)
            for name in names[shift:] + names[:shift]:
                sess, f = sessions[name], model_feeds[name]
                start = time.perf_counter()
                sess.run(None, f)
                elapsed = time.perf_counter() - start
                if round_ >= warmup:
                    times[name].append(elapsed * 1e3)
                advance()
    return {name: BenchStats.from_times(t, threads=threads, provider=provider) for name, t in times.items()}


@contextlib.contextmanager
def _progress(enabled: bool, total: int, description: str) -> Iterator[Callable[[], None]]:
    if not enabled:
        yield lambda: None
        return
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda: bar.advance(task)


# --- what ORT executes ------------------------------------------------------------------------
@dataclasses.dataclass
class RuntimeNode:
    """One node of ORT's optimized graph."""

    name: str
    op_type: str
    domain: str
    #: the execution provider that runs it; None when ORT did not say (not executed).
    provider: str | None
    #: element type of its first input in the profiling run ("float", "int8", ...), if run.
    input_dtype: str | None = None
    #: median kernel time over the profiling runs, in microseconds.
    time_us: float | None = None
    #: "" for the main graph, else the path of the subgraph ("If_3/then_branch").
    graph: str = ""
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    #: element type of every input ("" for an absent optional one): from the profiling
    #: run, else from the optimized graph's initializers and declarations; None: unknown.
    input_dtypes: tuple[str | None, ...] = ()
    #: shapes in the profiling run (None where not run or not reported)
    input_shapes: tuple[tuple[int, ...] | None, ...] = ()
    output_shapes: tuple[tuple[int, ...] | None, ...] = ()

    @property
    def kind(self) -> OpKind:
        return resolve(self.op_type, self.domain, self.input_dtype)

    @property
    def qualified_op(self) -> str:
        return f"{self.domain}:{self.op_type}" if self.domain else self.op_type


@dataclasses.dataclass
class RuntimeReport:
    """The graph ORT runs after its optimizations (see `runtime_report`)."""

    nodes: list[RuntimeNode]
    optimized_model: onnx.ModelProto = dataclasses.field(repr=False)
    providers: list[str]
    optimization: str

    def op_counts(self) -> collections.Counter:
        """{"Conv": 3, "com.microsoft:FusedConv": 2, ...} over all graphs."""
        return collections.Counter(n.qualified_op for n in self.nodes)

    def provider_counts(self) -> collections.Counter:
        return collections.Counter(n.provider or "unknown" for n in self.nodes)

    def kind_counts(self) -> collections.Counter:
        return collections.Counter(n.kind.value for n in self.nodes)

    def nodes_of_kind(self, kind: OpKind | str) -> list[RuntimeNode]:
        return [n for n in self.nodes if n.kind == OpKind(kind)]

    def float_islands(self) -> list[list[str]]:
        """Groups of main-graph FLOAT nodes connected by tensors, largest first: the parts a
        quantized model still computes in float."""
        main = [n for n in self.nodes if not n.graph]
        floats = {n.name: n for n in main if n.kind == OpKind.FLOAT}
        producer = {out: n.name for n in main for out in n.outputs}
        parent = {name: name for name in floats}

        def find(x: str) -> str:
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        for node in floats.values():
            for value in node.inputs:
                source = producer.get(value)
                if source in floats:
                    parent[find(source)] = find(node.name)
        groups: dict[str, list[str]] = collections.defaultdict(list)
        for name in floats:
            groups[find(name)].append(name)
        return sorted(groups.values(), key=len, reverse=True)

    def as_dict(self) -> dict:
        return {
            "optimization": self.optimization,
            "providers": self.providers,
            "op_counts": dict(self.op_counts()),
            "provider_counts": dict(self.provider_counts()),
            "kind_counts": dict(self.kind_counts()),
            "nodes": [
                {**{k: v for k, v in dataclasses.asdict(n).items()
                    if k not in ("inputs", "outputs", "input_shapes", "output_shapes")},
                 "kind": n.kind.value}
                for n in self.nodes
            ],
        }


def _named_proto(model: ModelSource) -> tuple[onnx.ModelProto, str]:
    """A private copy of the model with every node named, so ORT's profile and optimized
    model refer to nodes by names we can match."""
    if isinstance(model, (str, os.PathLike)):
        if not Path(model).is_file():
            raise ModelLoadError(f"{model}: no such file")
        proto, where = onnx.load(str(model)), str(model)
    elif isinstance(model, (bytes, bytearray, memoryview)):
        proto, where = _parse_or_none(bytes(model)), "<bytes>"
        if proto is None:
            raise ModelLoadError("<bytes>: not a valid ONNX model (protobuf parse failed)")
    elif isinstance(model, (Model, ir.Model)):
        model = model if isinstance(model, Model) else Model(model)
        proto, where = self_contained_proto(model), model.source or "<model>"
    elif isinstance(model, onnx.ModelProto):
        proto, where = onnx.ModelProto(), "<ModelProto>"
        proto.CopyFrom(model)
    else:
        raise ModelLoadError(
            f"cannot report on a {type(model).__name__}: pass a Model, path, bytes or ModelProto"
        )
    taken = {n.name for n in _all_nodes(proto.graph) if n.name}
    counter = 0
    for node in _all_nodes(proto.graph):
        while not node.name:
            candidate = f"{node.op_type}_{counter}"
            counter += 1
            if candidate not in taken:
                node.name = candidate
                taken.add(candidate)
    return proto, where


def _walk_optimized(graph: onnx.GraphProto, prefix: str = "") -> Iterator[tuple[str, onnx.NodeProto]]:
    for node in graph.node:
        yield prefix, node
        for attr in node.attribute:
            subgraphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for sub in subgraphs:
                yield from _walk_optimized(sub, f"{prefix}{node.name or node.op_type}/{attr.name}/")


def _profile_events(path: str) -> dict[str, list[dict]]:
    """ORT's profile: {node name: [kernel events]} (one per run)."""
    with open(path) as f:
        events = json.load(f)
    if isinstance(events, dict):
        events = events.get("traceEvents", [])
    by_node: dict[str, list[dict]] = collections.defaultdict(list)
    suffix = "_kernel_time"
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith(suffix):
            by_node[event["name"][: -len(suffix)]].append(event)
    return by_node


def _assigned_providers(sess: ort.InferenceSession) -> dict[str, str]:
    """ORT's record of which provider got each (named) node, where this ORT keeps one."""
    if not hasattr(sess, "get_provider_graph_assignment_info"):
        return {}
    return {
        node.name: sub.ep_name
        for sub in sess.get_provider_graph_assignment_info()
        for node in sub.get_nodes() if node.name
    }


def runtime_report(
    model: ModelSource, *, provider: str = "cpu", optimization: str = "all",
    feeds: Mapping[str, Any] | None = None, profile: bool = True, profile_runs: int = 3,
    threads: int | None = None,
) -> RuntimeReport:
    """What ORT executes for `model`: its optimized graph (written through
    `optimized_model_filepath`), each node with its execution provider and kernel kind.
    With `profile`, a few runs on `feeds` (random inputs when None) record each node's
    provider, input dtype and kernel time; a failed profiling run is logged and skipped."""
    proto, where = _named_proto(model)
    with tempfile.TemporaryDirectory(prefix="slimgraph-report-") as tmp:
        optimized_path = Path(tmp) / "optimized.onnx"
        options = session_options(
            threads=threads, optimization=optimization, optimized_model_path=optimized_path,
        )
        for key, value in (  # weights of the optimized model go to a side file: no 2 GB limit
            ("session.optimized_model_external_initializers_file_name", "optimized.onnx.data"),
            ("session.optimized_model_external_initializers_min_size_in_bytes", "1024"),
            ("session.record_ep_graph_assignment_info", "1"),
        ):
            options.add_session_config_entry(key, value)
        if profile:
            options.enable_profiling = True
            options.profile_file_prefix = str(Path(tmp) / "profile")
        sess = create_session(proto, options, provider=provider)
        optimized = onnx.load(str(optimized_path))
        events = _profile(sess, feeds, profile_runs, where) if profile else {}
    assigned = _assigned_providers(sess)
    only = sess.get_providers()[0] if len(sess.get_providers()) == 1 else None
    walk = list(_walk_optimized(optimized.graph))
    names = {node.name for _, node in walk}
    unmatched = collections.defaultdict(list)  # op_type -> events of nodes ORT left unnamed
    for name, evs in events.items():
        if name not in names:
            unmatched[evs[0]["args"].get("op_name", "")].append(evs)
    declared = _value_types(optimized.graph)
    constants = _constant_types(optimized.graph)
    nodes = []
    for index, (graph, node) in enumerate(walk):
        evs = events.get(node.name) if node.name else None
        if evs is None and unmatched.get(node.op_type):
            evs = unmatched[node.op_type].pop(0)
        nodes.append(_runtime_node(node, graph, index, evs, assigned.get(node.name) or only, declared, constants))
    return RuntimeReport(nodes, optimized, list(sess.get_providers()), optimization)


def _profile(sess: ort.InferenceSession, feeds, runs: int, where: str) -> dict[str, list[dict]]:
    try:
        arrays = generate_feeds(sess) if feeds is None else check_feeds(sess, feeds, allow_extra=True)
        for _ in range(max(1, runs)):
            sess.run(None, arrays)
    except (DataError, *ORT_ERRORS) as e:
        logger.warning("%s: profiling run failed (%s); providers come from ORT's partitioning record only",
                       where, _short(str(e)))
    return _profile_events(sess.end_profiling())


def _type_shapes(entries: Any) -> list[tuple[str | None, tuple[int, ...] | None]]:
    """ORT's profile lists each tensor as {dtype: shape}."""
    out = []
    for entry in entries or []:
        if isinstance(entry, dict) and len(entry) == 1:
            dtype, shape = next(iter(entry.items()))
            out.append((dtype, tuple(int(d) for d in shape) if isinstance(shape, list) else None))
        else:
            out.append((None, None))
    return out


def _runtime_node(
    node: onnx.NodeProto, graph: str, index: int, events: list[dict] | None, fallback: str | None,
    declared: Mapping[str, str] | None = None,
    constants: Mapping[str, tuple[str, tuple[int, ...]]] | None = None,
) -> RuntimeNode:
    provider, time_us = fallback, None
    profiled: list[tuple[str | None, tuple[int, ...] | None]] = []
    outputs: list[tuple[str | None, tuple[int, ...] | None]] = []
    if events:
        args = events[-1].get("args", {})
        provider = args.get("provider") or provider
        profiled = _type_shapes(args.get("input_type_shape"))
        outputs = _type_shapes(args.get("output_type_shape"))
        time_us = statistics.median(float(e.get("dur", 0)) for e in events)
    # ORT's profile skips absent optional inputs and the constant weights a kernel has
    # pre-packed: line the reported entries up with the names, taking an initializer's
    # entry only when dtype and shape match it.
    declared = declared or {}
    constants = constants or {}
    dtypes: list[str | None] = []
    shapes: list[tuple[int, ...] | None] = []
    at = 0
    for name in node.input:
        if not name:
            dtypes.append("")
            shapes.append(None)
            continue
        entry = profiled[at] if at < len(profiled) else (None, None)
        if name in constants:
            dtype, shape = constants[name]
            at += entry == (dtype, shape)
        else:
            dtype, shape = entry[0] or declared.get(name), entry[1]
            at += 1
        dtypes.append(dtype)
        shapes.append(shape)
    return RuntimeNode(
        name=node.name or f"{node.op_type}_{index}", op_type=node.op_type, domain=node.domain,
        provider=provider, input_dtype=profiled[0][0] if profiled else None, time_us=time_us,
        graph=graph.rstrip("/"), inputs=tuple(node.input), outputs=tuple(node.output),
        input_dtypes=tuple(dtypes), input_shapes=tuple(shapes), output_shapes=tuple(s for _, s in outputs),
    )

"""Shared pieces of the benchmarks: the real models (found through their installed
packages), torch-defined ResNet-18 and MobileNetV2 shapes exported to ONNX, inputs for
each, and the markdown/plot writers.

Every model comes as a `Case`: a name, an ONNX path and a function giving n sample feeds
(a list of dicts, since silero's recurrent state has no batch axis in front).
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import sys
import sysconfig
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CACHE = HERE / ".cache"
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing


@dataclasses.dataclass
class Case:
    name: str
    path: Path
    #: n -> n feeds, each one valid input of the model
    samples: Callable[[int], list[dict[str, np.ndarray]]]
    note: str = ""


# --- real models -------------------------------------------------------------------------------
def _package_file(package: str, *parts: str) -> Path:
    try:
        root = importlib.resources.files(package)
    except ModuleNotFoundError:
        raise SystemExit(f"benchmarks need the {package!r} package: pip install -e '.[dev]'") from None
    return Path(str(root.joinpath(*parts)))


def magika_case(n_files: int = 32) -> Case:
    """magika's file-type model on real files: the start and end bytes of Python's standard
    library modules and shared libraries, featurized as magika does (see `_magika_features`)."""
    folder = _package_file("magika", "models", "standard_v3_3")
    config = json.loads((folder / "config.min.json").read_text())
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py"))[: n_files // 2] + sorted((stdlib / "lib-dynload").glob("*.so"))[: n_files // 2]

    def samples(n: int) -> list[dict[str, np.ndarray]]:
        return [{"bytes": np.asarray([_magika_features(f.read_bytes(), config)], dtype=np.int32)}
                for f in (files * n)[:n]]

    return Case("magika", folder / "model.onnx", samples, f"{len(files)} real files")


def _magika_features(content: bytes, config: dict) -> list[int]:
    """magika's features: the first `beg_size` bytes after leading whitespace and the last
    `end_size` bytes before trailing whitespace, padded with `padding_token`."""
    block, pad = config["block_size"], config["padding_token"]
    beg = list(content[:block].lstrip()[: config["beg_size"]])
    end = list(content[-block:].rstrip()[-config["end_size"]:]) if config["end_size"] else []
    beg += [pad] * (config["beg_size"] - len(beg))
    end = [pad] * (config["end_size"] - len(end)) + end
    return beg + end


def silero_cases() -> list[Case]:
    """Every silero-vad ONNX variant in the package, on a synthetic 16 kHz signal (noise plus
    a voiced-like harmonic tone) and a random recurrent state."""
    folder = _package_file("silero_vad", "data")
    return [Case(f"silero/{p.stem}", p, _silero_samples(p), "synthetic audio") for p in sorted(folder.glob("*.onnx"))]


def _silero_samples(path: Path) -> Callable[[int], list[dict[str, np.ndarray]]]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    inputs = {i.name: [d.dim_value or None for d in i.type.tensor_type.shape.dim] for i in graph.input}

    def feed(rng: np.random.Generator) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for name, dims in inputs.items():
            if name == "sr":
                out[name] = np.array(16000, np.int64)
            elif name == "input":  # [batch, samples] or [sequence, 576]
                rows, width = (dims[0] or 1, dims[1] or 512) if dims[1] else (1, 512)
                t = np.arange(width) / 16000.0
                tone = 0.3 * np.sin(2 * np.pi * 180 * t) + 0.1 * np.sin(2 * np.pi * 360 * t)
                out[name] = (tone + 0.05 * rng.standard_normal((rows, width))).astype(np.float32)
            else:  # recurrent state: [2, batch, 128] or [1, 1, 128]
                out[name] = (0.1 * rng.standard_normal([d or 1 for d in dims])).astype(np.float32)
        return out

    def samples(n: int) -> list[dict[str, np.ndarray]]:
        rng = np.random.default_rng(0)
        return [feed(rng) for _ in range(n)]

    return samples


# --- torch-defined architectures ----------------------------------------------------------------
def torch_cases() -> list[Case]:
    """ResNet-18 and MobileNetV2 shapes with random weights at 224x224, exported to ONNX
    (opset 17, TorchScript exporter) with BatchNormalization kept as nodes
    (`TrainingMode.PRESERVE` on an eval-mode model): torch's default eval export already
    folds BN into Conv, which would leave fusion nothing to do."""
    from torch_models import mobilenet_v2, resnet18

    def images(n: int) -> list[dict[str, np.ndarray]]:
        rng = np.random.default_rng(0)
        return [{"input": rng.standard_normal((1, 3, 224, 224)).astype(np.float32)} for _ in range(n)]

    return [Case(name, _export(name, build), images, "random weights, BN kept")
            for name, build in (("resnet18", resnet18), ("mobilenet_v2", mobilenet_v2))]


def _export(name: str, build: Callable) -> Path:
    import torch

    path = CACHE / f"{name}-torch{torch.__version__}.onnx"
    if path.is_file():
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = build().eval()
    for m in model.modules():  # non-trivial BN statistics, so folding is really tested
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    tmp = path.with_suffix(".tmp")
    torch.onnx.export(
        model, (torch.randn(1, 3, 224, 224),), str(tmp), dynamo=False, opset_version=17,
        input_names=["input"], output_names=["logits"], training=torch.onnx.TrainingMode.PRESERVE,
    )
    tmp.replace(path)
    return path


def all_cases(torch_models: bool = True) -> list[Case]:
    return [magika_case(), *silero_cases(), *(torch_cases() if torch_models else [])]


# --- output -------------------------------------------------------------------------------------
def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(v: object) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_result(name: str, text: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.md"
    path.write_text(text.rstrip() + "\n")
    print(text)
    print(f"\nwrote {path.relative_to(HERE.parent)}")
    return path


def machine() -> str:
    import platform

    import onnxruntime
    import psutil

    return (f"{platform.processor() or platform.machine()}, {psutil.cpu_count(logical=False)} physical / "
            f"{psutil.cpu_count()} logical cores, Python {platform.python_version()}, "
            f"onnxruntime {onnxruntime.__version__}")

"""Shared pieces of the benchmarks: the real models (through `slimgraph.zoo`, which finds
them in their installed packages and makes real inputs), ResNet-18 and MobileNetV2 shapes
(`torch_models`) exported to ONNX, and the markdown writer.

Every model comes as a `Case`: a name, an ONNX path and a function giving n sample feeds
(a list of dicts, since silero's recurrent state has no batch axis in front).
"""

from __future__ import annotations

import dataclasses
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CACHE = HERE / ".cache"
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

from slimgraph import zoo  # noqa: E402


@dataclasses.dataclass
class Case:
    name: str
    path: Path
    #: n -> n feeds, each one valid input of the model
    samples: Callable[[int], list[dict[str, np.ndarray]]]
    note: str = ""


# --- real models (found and fed by slimgraph.zoo) -------------------------------------------------
def magika_case() -> Case:
    """magika's file-type model on features of real files of this machine."""
    def samples(n: int) -> list[dict[str, np.ndarray]]:
        rows = zoo.magika_inputs(n)[zoo.MAGIKA_INPUT]
        return [{zoo.MAGIKA_INPUT: rows[i:i + 1]} for i in range(len(rows))]

    return Case("magika", zoo.magika_model_path(), samples, "real files")


def silero_cases() -> list[Case]:
    """Every silero-vad ONNX variant, on speech-like audio with the recurrent state reached
    by running over the preceding chunks (`zoo.silero_inputs`)."""
    def case(path: Path) -> Case:
        return Case(f"silero/{path.stem}", path, lambda n: [zoo.silero_inputs(path, seed=i) for i in range(n)],
                    "speech-like audio")

    return [case(p) for p in zoo.silero_model_paths()]


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


class PeakRSS:
    """Peak resident set size above the level at entry, sampled in a thread."""

    def __init__(self, interval: float = 0.002):
        import psutil

        self.process = psutil.Process()
        self.interval = interval
        self.start = self.peak = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = self.process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def delta_mb(self) -> float:
        return (self.peak - self.start) / 2**20

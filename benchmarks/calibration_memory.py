"""Calibration peak memory with N and 10N samples: it must not grow with the sample count
(issue 3: within 1.2x).

Models: the digits CNN (`zoo.digits_cnn()`, calibrated on sklearn digits images) and
magika (`zoo.magika_model_path()`, on features of real files of this machine,
`zoo.magika_inputs`). Every float activation of the model is observed (after shape
inference, which gives the dtypes), with each method of `slimgraph.passes.quantize.observers`.

Each measurement runs in a fresh Python process, so no run inherits another's heap. The
samples are read from an .npz *before* measuring starts: the data set itself (which is
10x larger for 10N) is not part of calibration's memory. Two figures per run:

- tracemalloc peak: every allocation Python and numpy make (numpy reports its array
  buffers to tracemalloc), from just before `calibrate` to its end; ONNX Runtime's own
  C++ allocations are not in it;
- ΔRSS: the process's resident set size (psutil), sampled every 2 ms in a background
  thread, peak minus the RSS just before `calibrate`, in a separate run without
  tracemalloc (it counts ORT's arena and protobuf buffers too, and can miss spikes
  shorter than 2 ms).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import common
from common import PeakRSS
import numpy as np

HERE = Path(__file__).resolve().parent
METHODS = ("minmax", "percentile", "entropy", "mse")
LIMIT = 1.2


def float_activations(model) -> list[str]:
    import onnx_ir as ir

    from slimgraph.passes import get_pass

    get_pass("infer_shapes")()(model)
    return [o.name for n in model.graph for o in n.outputs if o.dtype == ir.DataType.FLOAT]


def worker(model_path: str, data_path: str, method: str, mode: str) -> dict:
    """One measurement in this (fresh) process; prints a JSON line."""
    import slimgraph
    from slimgraph.passes.quantize.observers import calibrate

    model = slimgraph.load(model_path)
    tensors = float_activations(model)
    with np.load(data_path) as npz:
        data = {k: npz[k] for k in npz.files}
    n = len(next(iter(data.values())))
    start = time.perf_counter()
    if mode == "tracemalloc":
        tracemalloc.start()
        calibrate(model, data, tensors, method=method, progress=False)
        peak_mb = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    else:
        with PeakRSS() as rss:
            calibrate(model, data, tensors, method=method, progress=False)
        peak_mb = rss.delta_mb
    return {"samples": n, "tensors": len(tensors), "peak_mb": peak_mb, "seconds": time.perf_counter() - start}


def measure(model_path: Path, data_path: Path, method: str, mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", str(model_path), str(data_path), method, mode],
        check=True, capture_output=True, text=True, cwd=HERE.parent,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def cases(n: int) -> list[tuple[str, Path, dict, dict]]:
    """(name, model path, N samples, 10N samples)."""
    from slimgraph import zoo

    digits = zoo.digits_data()
    images = np.concatenate([digits.x_train, digits.x_test])
    if len(images) < 10 * n:
        raise SystemExit(f"the digits data set holds {len(images)} images; --samples {n} needs {10 * n}")
    magika = zoo.magika_inputs(10 * n)[zoo.MAGIKA_INPUT]
    return [
        ("digits CNN", zoo.digits_cnn(), {zoo.DIGITS_INPUT: images[:n]}, {zoo.DIGITS_INPUT: images[:10 * n]}),
        ("magika", zoo.magika_model_path(), {zoo.MAGIKA_INPUT: magika[:n]}, {zoo.MAGIKA_INPUT: magika}),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=100, help="N (the large run uses 10N)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args, _ = parser.parse_known_args(argv)
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return 0

    rows, worst = [], 0.0
    with tempfile.TemporaryDirectory(prefix="slimgraph-calib-") as tmp:
        for name, model_path, small, large in cases(args.samples):
            paths = []
            for label, data in (("small", small), ("large", large)):
                path = Path(tmp) / f"{name.split()[0]}-{label}.npz"
                np.savez(path, **data)
                paths.append(path)
            for method in args.methods:
                row = [name, method]
                for mode in ("tracemalloc", "rss"):
                    a, b = (measure(model_path, p, method, mode) for p in paths)
                    ratio = b["peak_mb"] / a["peak_mb"]
                    worst = max(worst, ratio)
                    row += [f"{a['peak_mb']:.2f}", f"{b['peak_mb']:.2f}", f"{ratio:.3f}"]
                    if mode == "tracemalloc":
                        row[2:2] = [a["tensors"], f"{a['seconds']:.1f}", f"{b['seconds']:.1f}"]
                print(" | ".join(str(c) for c in row), flush=True)
                rows.append(row)

    n = args.samples
    headers = ["model", "method", "tensors", f"time N={n} (s)", f"time 10N={10 * n} (s)",
               "tracemalloc peak N (MB)", "tracemalloc peak 10N (MB)", "ratio",
               "ΔRSS N (MB)", "ΔRSS 10N (MB)", "ratio"]
    verdict = "met" if worst <= LIMIT else "MISSED"
    text = (
        "# Calibration peak memory: N vs 10N samples\n\n"
        f"Machine: {common.machine()}.\n\n"
        f"Every float activation observed (after shape inference); N = {n}, 10N = {10 * n} samples "
        "(digits: sklearn digits images; magika: features of real files of this machine). Each figure "
        "comes from a fresh process, the samples loaded before measuring. **tracemalloc**: peak of "
        "Python + numpy allocations during `calibrate` (numpy reports its buffers to tracemalloc; "
        "ONNX Runtime's C++ allocations are not included). **ΔRSS**: peak resident set size during "
        "`calibrate` minus the RSS just before it (psutil, sampled every 2 ms, separate run without "
        "tracemalloc; includes ORT's arena). Times are from the tracemalloc runs.\n\n"
        f"Target: 10N / N <= {LIMIT} on every row — **{verdict}** (worst ratio {worst:.3f}).\n\n"
        + common.markdown_table(headers, rows)
    )
    common.write_result("calibration_memory", text)
    return 0 if worst <= LIMIT else 1


if __name__ == "__main__":
    sys.exit(main())

"""Run every benchmark in turn (`make bench`); each writes benchmarks/results/<name>.md.
Arguments after the script name go to every benchmark (e.g. `--no-torch`). Exit status:
the number of benchmarks that failed or missed their target."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = [
    "cleanup_vs_ort.py", "import_speed.py", "deep_compression_finetune.py", "quantize.py", "quantize_static.py", "quantize_transformers.py", "quantize_layers.py", "calibration_memory.py",
    "prune.py", "prune_sparse.py", "cluster.py",
    "train.py", "search.py",
]


def main() -> int:
    failed = []
    for script in BENCHMARKS:
        print(f"\n=== {script} ===", flush=True)
        start = time.perf_counter()
        code = subprocess.call([sys.executable, str(HERE / script), *sys.argv[1:]], cwd=HERE.parent)
        print(f"=== {script}: exit {code} after {time.perf_counter() - start:.0f} s ===", flush=True)
        if code:
            failed.append(script)
    if failed:
        print(f"\nfailed or missed target: {', '.join(failed)}", file=sys.stderr)
    return len(failed)


if __name__ == "__main__":
    sys.exit(main())

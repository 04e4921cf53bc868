"""Deep Compression with fine-tuning between the steps, on the digits MLP (LeNet-300-100
shaped) and CNN: prune.gradual (cubic schedule, fine-tuning between steps) -> k-means 16
values per tensor -> fine-tuning on the codebooks -> static int8 (per-tensor weights) ->
pack.sparse -> pack.clusters. What the `deep-compression` recipe (post-training, no
labels) cannot reach in accuracy; see benchmarks/results/cluster.md for that one.

Writes benchmarks/results/deep_compression_finetune.md.
"""

from __future__ import annotations

import io
import os
import sys
import time
import zipfile

import common

import slimgraph
from slimgraph import zoo
from slimgraph.backends import ort

PAPER = "Deep Compression (Han et al. 2016), LeNet-300-100 on MNIST: 40x with Huffman coding, 1.64% -> 1.58% error"


def _pipeline(sparsity: float, epochs: int) -> str:
    return (f"optimize, strip_metadata, prune.gradual(sparsity={sparsity}, steps=3, epochs_per_step={epochs}, "
            f"final_epochs={2 * epochs}, keep_first_last=false, lr=0.002), "
            "cluster.kmeans(k=16, granularity=tensor, min_size=64), train.finetune(epochs=4, lr=0.0005), "
            "upgrade_opset(target=21), quantize.static(per_channel=false), pack.sparse, pack.clusters(min_size=16)")


def _zipped(path: str) -> int:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
        z.write(path, os.path.basename(path))
    return len(buffer.getvalue())


def main() -> int:
    data, test = zoo.digits_data(), zoo.digits_test_data()

    def top1(model) -> float:
        (logits,) = ort.run_batched(model, {"input": test["input"]}).values()
        return float((logits.argmax(1) == test["labels"]).mean())

    rows = []
    work = common.CACHE / "deep_compression_finetune"
    work.mkdir(parents=True, exist_ok=True)
    for name, src, epochs in (("digits MLP", zoo.digits_mlp(), 3), ("digits CNN", zoo.digits_cnn(), 2)):
        base = top1(src)
        size = os.path.getsize(src)
        for sparsity in (0.8, 0.9):
            start = time.perf_counter()
            result = slimgraph.run(src, _pipeline(sparsity, epochs), data={"input": data.x_train}, labels=data.y_train)
            out = str(work / f"{name.split()[1]}_{sparsity}.onnx")
            slimgraph.save(result.model, out)
            acc = top1(out)
            rows.append([name, f"{sparsity:.0%}", f"{base:.2%}", f"{acc:.2%} ({(acc - base) * 100:+.2f} pt)",
                         f"{size:,} -> {os.path.getsize(out):,}", f"{size / os.path.getsize(out):.1f}x",
                         f"{size / _zipped(out):.1f}x", f"{time.perf_counter() - start:.0f}"])
            print(rows[-1], flush=True)
    text = ("# Deep Compression with fine-tuning (digits)\n\n"
            f"Machine: {common.machine()}. Pipeline per row: `{_pipeline(0.8, 3)}` (sparsity and epochs per row). "
            "Top-1 on the 360-image test split; ratios against the float ONNX file as shipped; zipped = the packed "
            "file deflated by zipfile.\n\n"
            + common.markdown_table(["model", "sparsity", "float top-1", "compressed top-1", "bytes", "raw ratio",
                                     "zipped ratio", "build s"], rows)
            + f"\n\nReference: {PAPER}. Our MLP has 50k parameters on 8x8 inputs (the paper's 266k on 28x28), so the "
              "fixed ONNX graph structure (node and tensor names, shapes, decode subgraphs: about 6 KB) weighs more.\n")
    common.write_result("deep_compression_finetune", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

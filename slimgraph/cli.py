"""The `slimgraph` command.

    slimgraph inspect MODEL [--json]
    slimgraph inspect MODEL --runtime [--provider cpu|cuda] [--data D.npz] [--json]
    slimgraph passes [--json]
    slimgraph run MODEL -p PIPELINE -o OUT [--data D.npz] [--verify] [--report R.md]
    slimgraph quantize MODEL --data calib.npz -o OUT [--format qoperator|qdq] [--report R.md] [--verify]
    slimgraph prune MODEL --ratio 0.5 -o OUT [--mode uniform|global|macs|latency] [--unstructured | --n-m 2:4]
    slimgraph bench MODEL [MODEL ...] [--threads N] [--runs N] [--json]
    slimgraph compare A B [--data D.npz]
    slimgraph search MODEL --data D.npz [--eval mod:fn] [--max-drop X] [--trials N] [--strategy S] -o DIR

Errors print one line and exit 2 for bad input (1 for internal errors); `--debug` shows
the traceback. No output file is written when a command fails; inputs are never touched.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from slimgraph.errors import DataError, PipelineError, SlimgraphError

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

EXAMPLES = """\
examples:
  slimgraph inspect model.onnx
  slimgraph inspect model.int8.onnx --runtime --data samples.npz
  slimgraph quantize model.onnx --data calib.npz -o model.int8.onnx --verify
  slimgraph run model.onnx -p cleanup,fuse -o model.slim.onnx --verify --report report.md
  slimgraph run model.onnx -p "cleanup,fold_batchnorm,upgrade_opset(target=21)" -o out.onnx
  slimgraph bench model.onnx model.slim.onnx --threads 2 --runs 50
  slimgraph compare model.onnx model.slim.onnx --data samples.npz
"""


# --- shared helpers -----------------------------------------------------------------------
def _inputs(model, args, n_default: int = 1):
    """(data, labels) from --data, or generated from declared shapes (+ --shape)."""
    from slimgraph import data as sgdata

    if getattr(args, "data", None):
        return sgdata.load_npz(args.data, model)
    overrides = sgdata.parse_shape_overrides(getattr(args, "shape", None))
    return sgdata.generate(model, n_default, overrides=overrides, seed=0), None


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".slimgraph-", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _human(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.3g}{unit}"
        n /= 1000
    return f"{n:.3g}P"


# --- commands -------------------------------------------------------------------------------
def cmd_inspect(args) -> int:
    from slimgraph.ir import load, summary

    if not args.runtime:
        extra = [f"--{k}" for k in ("provider", "data", "shape") if getattr(args, k) not in (None, "cpu")]
        if extra:
            raise DataError(f"{' and '.join(extra)} only appl{'ies' if len(extra) == 1 else 'y'} to inspect --runtime")
    model = load(args.model)
    if args.runtime:
        return _inspect_runtime(model, args)
    info = summary(model)
    info["file"] = str(args.model)
    info["file_bytes"] = Path(args.model).stat().st_size
    info["file_zipped_bytes"] = _zipped_size(Path(args.model))
    if args.json:
        out.print_json(json.dumps(info))
        return 0
    t = Table(title=str(args.model), show_header=False)
    t.add_row("opset", ", ".join(f"{d or 'ai.onnx'}={v}" for d, v in info["opset_imports"].items()))
    for kind in ("inputs", "outputs"):
        for v in info[kind]:
            t.add_row(kind[:-1], f"{v['name']}: {v['dtype']} {v['shape']}")
    t.add_row("nodes", str(info["nodes"]))
    t.add_row("params", f"{_human(info['params'])} ({info['bytes']:,} bytes of weights)")
    zipped = info["file_zipped_bytes"]
    t.add_row("file", f"{info['file_bytes']:,} bytes; zipped {zipped:,} bytes "
                      f"({info['file_bytes'] / max(zipped, 1):.2f}x smaller, as TF Model Optimization reports)")
    t.add_row("MACs", _human(info["macs"]))
    t.add_row("ops", ", ".join(f"{k}×{v}" for k, v in info["op_counts"].items()))
    out.print(t)
    return 0


def _zipped_size(path: Path) -> int:
    """Bytes of a zip archive holding the file (deflate; external data files included)."""
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
        z.write(path, path.name)
        for f in path.parent.glob(path.name + ".data"):
            z.write(f, f.name)
    return len(buffer.getvalue())


def _inspect_runtime(model, args) -> int:
    from slimgraph import data as sgdata
    from slimgraph.backends import runtime_check

    data = feeds = None
    if args.data:
        data, _ = _inputs(model, args)
    elif args.shape:
        feeds = sgdata.generate(model, 1, overrides=sgdata.parse_shape_overrides(args.shape), seed=0)

    def warn(pitfall) -> None:  # printed as found, before ORT runs the model
        err.print(f"[bold yellow]slimgraph: warning:[/] {pitfall.message}", soft_wrap=True)

    check = runtime_check.check_runtime(model, provider=args.provider, data=data, feeds=feeds,
                                        on_warning=(lambda p: None) if args.json else warn)
    if args.json:
        out.print_json(json.dumps({"file": str(args.model), **check.as_dict()}))
        return 0
    import onnxruntime

    cpu = check.cpu
    vnni = {True: "VNNI", False: "no VNNI", None: "VNNI unknown"}[cpu.vnni]
    t = Table(title=f"{args.model}: what ONNX Runtime {onnxruntime.__version__} runs "
                    f"({args.provider}; {cpu.model or cpu.arch}, {vnni})")
    for c in ("node", "kernel", "provider", "kind", "input dtypes", "time", "MACs"):
        t.add_column(c, justify="right" if c in ("time", "MACs") else "left")
    for n in check.nodes:
        t.add_row(n.name, n.qualified_op, (n.provider or "?").removesuffix("ExecutionProvider"), n.kind.value,
                  ",".join(d for d in n.input_dtypes if d) or "?", _percent(n.time_share),
                  _human(n.macs) if n.macs else "")
    out.print(t)
    if check.islands:
        t = Table(title=f"{len(check.islands)} float island(s)")
        for c in ("#", "nodes", "time", "MACs", "why it runs in float"):
            t.add_column(c, justify="right" if c in ("#", "time", "MACs") else "left")
        for i, island in enumerate(check.islands, 1):
            names = ", ".join(island.nodes[:3]) + (f" +{len(island.nodes) - 3} more" if len(island.nodes) > 3 else "")
            t.add_row(str(i), names, _percent(island.time_share), _human(island.macs) if island.macs else "",
                      "\n".join(island.reasons))
        out.print(t)
    share = check.integer_mac_share
    out.print(
        f"Conv/Gemm/MatMul MACs in integer kernels: {_percent(share) if share is not None else 'none measured'}"
        f" ({_human(check.integer_macs)} of {_human(check.integer_macs + check.float_macs)}); "
        f"quantize: {check.quantize_nodes} ({check.quantize_at_inputs} at model inputs); "
        f"dequantize: {check.dequantize_nodes} ({check.dequantize_at_outputs} at model outputs); "
        f"float islands: {len(check.islands)}; warnings: {len(check.pitfalls)}")
    return 0


def _percent(share: float | None) -> str:
    return "" if share is None else f"{share:.1%}"


def cmd_passes(args) -> int:
    from slimgraph.passes.base import registry, search_domains
    from slimgraph.passes.pipeline import recipe_names, recipe_text
    import yaml

    reg = registry()
    rows = []
    for name, cls in sorted(reg.items()):
        fields = {
            f: {"type": getattr(fi.annotation, "__name__", str(fi.annotation)), "default": fi.default}
            for f, fi in cls.Config.model_fields.items()
        }
        for f, dom in search_domains(cls.Config).items():
            fields[f]["domain"] = dom
        rows.append({"name": name, "summary": cls.summary(), "exact": cls.exact, "requires": list(cls.requires),
                     "after": list(cls.after), "before": list(cls.before), "version": cls.version, "config": fields})
    recipes = {r: yaml.safe_load(recipe_text(r)).get("description", "").strip() for r in recipe_names()}
    if args.json:
        out.print_json(json.dumps({"passes": rows, "recipes": recipes}, default=str))
        return 0
    t = Table(title="passes")
    for c in ("name", "exact", "what it does", "config (default)"):
        t.add_column(c)
    for r in rows:
        cfg = ", ".join(f"{k}={v['default']!r}" for k, v in r["config"].items())
        t.add_row(r["name"], "yes" if r["exact"] else "lossy", r["summary"], cfg)
    out.print(t)
    t = Table(title="recipes")
    t.add_column("name")
    t.add_column("what it does")
    for name, desc in recipes.items():
        t.add_row(name, desc)
    out.print(t)
    return 0


def cmd_run(args) -> int:
    from slimgraph.ir import load, save
    from slimgraph.passes.base import PassContext
    from slimgraph.passes.manager import PassManager

    src, dst = Path(args.model), Path(args.output)
    if dst.exists() and src.exists() and dst.resolve() == src.resolve():
        raise DataError(f"{dst}: the output would overwrite the input model; choose another -o path")
    manager = PassManager(args.pipeline, verify=args.verify, tolerance=args.tolerance,
                          dump_dir=args.dump_dir, progress=not args.quiet)
    model = load(src)
    data = labels = None
    if args.data:
        data, labels = _inputs(model, args)
    elif args.shape:
        data, _ = _inputs(model, args, n_default=4)
    ctx = PassContext(data=data, labels=labels, seed=args.seed, progress=not args.quiet)
    result = manager.run(model, ctx)
    save(result.model, dst)
    if args.report:
        from slimgraph.passes.quantize.sensitivity import layer_report, layer_report_markdown

        text = result.report.to_markdown()
        layers = layer_report(result.model)
        if layers:  # written by quantize.sensitivity / quantize.mixed_precision
            text += "\n## Per-layer quantization sensitivity\n\n" + layer_report_markdown(layers)
        _write_atomic(Path(args.report), text)
    if not args.quiet:
        out.print(result.report.to_rich(changed_only=not args.verbose))
        out.print(f"wrote {dst} ({dst.stat().st_size:,} bytes)")
    return 0


#: `slimgraph quantize --format` -> the built-in recipe it runs
QUANTIZE_RECIPES = {"qoperator": "int8", "qdq": "int8-qdq"}


def cmd_quantize(args) -> int:
    from slimgraph.passes.pipeline import recipe_names

    if not args.data:
        raise DataError(f"{args.model}: quantization needs calibration data: pass --data calib.npz "
                        "(keys = the model's input names, arrays [N, ...]; a few hundred real samples)")
    recipe = QUANTIZE_RECIPES[args.format]
    if recipe not in recipe_names():
        raise PipelineError(f"the {recipe!r} recipe is not in this slimgraph installation "
                            f"(recipes: {', '.join(recipe_names())}); update slimgraph")
    args.pipeline, args.shape = recipe, None
    return cmd_run(args)


def cmd_prune(args) -> int:
    """Build a pruning pipeline from the options and run it like `run` (see its help)."""
    from slimgraph.ir import load

    pipeline = _prune_pipeline(args)
    src = Path(args.model)
    if not src.is_file():
        raise DataError(f"{src}: no such model file")
    if args.exclude:
        _check_patterns(load(src), args.exclude)
    args.pipeline = pipeline
    args.shape, args.tolerance, args.dump_dir, args.verbose = None, 1e-5, None, False
    return _run_and_show_layers(args)


def _prune_pipeline(args) -> str:
    """The pipeline string for `slimgraph prune`'s options; DataError for bad values."""
    if not 0.0 <= args.ratio < 1.0:
        raise DataError(f"--ratio must be in [0, 1) (the fraction removed), got {args.ratio}")
    if args.target_macs is not None and not 0.0 <= args.target_macs < 1.0:
        raise DataError(f"--target-macs must be in [0, 1) (the fraction of MACs removed), got {args.target_macs}")
    if args.multiple < 1:
        raise DataError(f"--multiple must be at least 1, got {args.multiple}")
    if args.criterion in ("apoz", "mean_activation") and not args.data and not (args.unstructured or args.n_m):
        raise DataError(f"--criterion {args.criterion} scores channels by their activations: pass sample "
                        "inputs with --data D.npz, or use l1, l2 or bn_scale")
    exclude = f"exclude={json.dumps(list(args.exclude))}" if args.exclude else ""
    if args.unstructured:
        return _join("cleanup", _call("prune.magnitude", f"sparsity={args.ratio}", exclude), "pack.sparse")
    if args.n_m:
        n, m = _parse_n_m(args.n_m)
        return _join("cleanup", _call("prune.n_m", f"n={n}", f"m={m}", exclude))
    options = [f"ratio={args.ratio}", f"criterion={args.criterion}", f"mode={args.mode}",
               f"multiple={args.multiple}", exclude]
    if args.target_macs is not None:
        options.append(f"target_macs={args.target_macs}")
    return _join("cleanup", "fuse", _call("prune.structured", *options), "cleanup")


def _call(name: str, *options: str) -> str:
    options = tuple(o for o in options if o)
    return f"{name}({', '.join(options)})" if options else name


def _join(*items: str) -> str:
    return ",".join(items)


def _parse_n_m(text: str) -> tuple[int, int]:
    n, sep, m = text.partition(":")
    if not sep or not n.strip().isdigit() or not m.strip().isdigit():
        raise DataError(f"--n-m must be N:M with integers, e.g. 2:4; got {text!r}")
    n_, m_ = int(n), int(m)
    if not 0 < n_ < m_:
        raise DataError(f"--n-m {text}: N must be at least 1 and below M (N of every M weights are kept)")
    return n_, m_


def _check_patterns(model, patterns) -> None:
    """Each --exclude pattern must match a node by name, op type or torch module path."""
    import fnmatch

    from slimgraph.ir.model import Model

    keys = set()
    for node in model.graph:
        keys.update(k for k in (node.name, node.op_type, Model.provenance(node)) if k)
        keys.update(v.name for v in node.outputs if v is not None)
    for p in patterns:
        if not any(fnmatch.fnmatchcase(k, p) for k in keys):
            raise DataError(f"--exclude {p!r} matches no node (by name, output, op type or torch module "
                            "path); `slimgraph inspect --json` lists the op types, the report the layers")


def _run_and_show_layers(args) -> int:
    """`cmd_run`'s steps (load, PassManager, save, report), then the per-layer tables the
    passes return in stats["table"] (channels and MACs before/after)."""
    from slimgraph.ir import load, save
    from slimgraph.passes.base import PassContext
    from slimgraph.passes.manager import TABLE, PassManager

    src, dst = Path(args.model), Path(args.output)
    if dst.exists() and dst.resolve() == src.resolve():
        raise DataError(f"{dst}: the output would overwrite the input model; choose another -o path")
    manager = PassManager(args.pipeline, verify=args.verify, tolerance=args.tolerance, progress=not args.quiet)
    model = load(src)
    data = labels = None
    if args.data:
        data, labels = _inputs(model, args)
    result = manager.run(model, PassContext(data=data, labels=labels, seed=args.seed, progress=not args.quiet))
    save(result.model, dst)
    if args.report:
        _write_atomic(Path(args.report), result.report.to_markdown())
    if args.quiet:
        return 0
    out.print(result.report.to_rich(changed_only=True))
    for row in result.report.rows:
        layers = row.stats.get(TABLE) if row.stats else None
        if not layers:
            continue
        t = Table(title=f"{row.name}: per layer")
        for c in layers[0]:
            t.add_column(c, justify="left" if c in ("layer", "op") else "right")
        for r in layers:
            t.add_row(*(str(r.get(c, "")) for c in layers[0]))
        out.print(t)
        stats = row.stats
        if "macs_before" in stats and stats["macs_before"]:
            out.print(f"MACs {_human(stats['macs_before'])} -> {_human(stats['macs_after'])} "
                      f"({stats['macs_after'] / stats['macs_before']:.1%}); params {_human(stats['params_before'])} "
                      f"-> {_human(stats['params_after'])} ({stats['params_after'] / max(stats['params_before'], 1):.1%})")
    out.print(f"wrote {dst} ({dst.stat().st_size:,} bytes)")
    return 0


def cmd_bench(args) -> int:
    from slimgraph.backends import ort
    from slimgraph.ir import load

    models = {}
    for path in args.models:
        label = path if path not in models else f"{path} ({len(models)})"
        models[label] = load(path)
    first = next(iter(models.values()))
    data, _ = _inputs(first, args)
    from slimgraph import data as sgdata

    feeds = sgdata.sample(data, sgdata.input_ranks(first), 0)
    stats = ort.bench(models, feeds, runs=args.runs, warmup=args.warmup, threads=args.threads,
                      provider=args.provider, progress=not args.json)
    base = next(iter(stats.values()))
    # Speed-up = median of per-round paired ratios: steadier than a ratio of medians.
    speedup = {k: 1.0 / v.ratio_to(base) for k, v in stats.items()}
    if args.json:
        out.print_json(json.dumps({k: {**v.as_dict(), "speedup": speedup[k]} for k, v in stats.items()}))
        return 0
    t = Table(title=f"ORT {args.provider}, {args.threads} threads, {args.runs} runs (interleaved)")
    for c in ("model", "median ms", "p10", "p90", "speed-up vs first"):
        t.add_column(c, justify="right" if c != "model" else "left")
    for k, v in stats.items():
        t.add_row(k, f"{v.median:.3f}", f"{v.p10:.3f}", f"{v.p90:.3f}", f"{speedup[k]:.2f}x")
    out.print(t)
    return 0


def cmd_compare(args) -> int:
    from slimgraph.backends import ort
    from slimgraph.compare import diff_all
    from slimgraph.ir import load

    a, b = load(args.a), load(args.b)
    if args.data:
        data, _ = _inputs(a, args)
    else:
        from slimgraph import data as sgdata

        data = sgdata.generate(a, args.samples, overrides=sgdata.parse_shape_overrides(args.shape), seed=0)
    ra = ort.run_batched(a, data)
    rb = ort.run_batched(b, data)
    try:
        diffs = diff_all(ra, rb)
    except ValueError as e:
        raise DataError(f"{args.a} vs {args.b}: {e}") from None
    if args.json:
        out.print_json(json.dumps({k: d.as_dict() for k, d in diffs.items()}))
        return 0
    t = Table(title=f"{args.a} vs {args.b}")
    for c in ("output", "shape", "max abs", "max rel", "cosine", "top-1 agree"):
        t.add_column(c, justify="right" if c not in ("output", "shape") else "left")
    for k, d in diffs.items():
        t.add_row(k, str(list(d.shape)), f"{d.max_abs:.3e}", f"{d.max_rel:.3e}", f"{d.cosine:.6f}",
                  "" if d.top1 is None else f"{d.top1:.2%}")
    out.print(t)
    return 0


def cmd_search(args) -> int:
    from slimgraph.search import search

    result = search(
        args.model, args.data, output=args.output, eval=args.eval, max_drop=args.max_drop,
        objectives=args.objectives, trials=args.trials, strategy=args.strategy, jobs=args.jobs,
        executor=args.executor, address=args.address, fallback_local=args.fallback_local, space=args.space,
        resume=args.resume, cache=not args.no_cache, cache_dir=args.cache_dir, metric=args.metric,
        proxy_samples=args.proxy_samples, latency_runs=args.latency_runs, threads=args.threads, seed=args.seed,
        references=[r for r in (args.reference or "").split(",") if r], progress=not args.quiet,
        seed_recipes=_seed_recipes(args.seed_recipes))
    if not args.quiet:
        best = result.best
        verdict = "budget met" if result.budget_met else "NO candidate meets the budget"
        out.print(f"{len(result.trials)} trials, {verdict}; Pareto front: {len(result.front)} pipeline(s)")
        if best is not None:
            out.print(f"best: {best['pipeline']}  accuracy {best['accuracy']:.4f} (drop {best['drop']:+.4f}), "
                      f"latency x{best['latency_ratio']:.3f}, size x{best['size_ratio']:.3f}")
        out.print(f"wrote {result.output}/ (best.onnx, best.yaml, report.md, trials.csv, pareto.png)")
    return 0


def _seed_recipes(text: str) -> bool | list[str]:
    """--seed-recipes: auto (True), none (False) or a comma-separated list of recipes."""
    if text in ("auto", "none"):
        return text == "auto"
    return [r for r in text.split(",") if r]


# --- parser ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="slimgraph", description="Make neural networks smaller and faster: ONNX in, verified ONNX out.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def data_opts(sp):
        sp.add_argument("--data", metavar="D.npz", help="inputs: keys = model input names, arrays [N, ...]")
        sp.add_argument("--shape", action="append", metavar="NAME=1x3x224x224",
                        help="shape for generated inputs (dynamic dims default to 1); repeatable")

    sp = sub.add_parser(
        "inspect", help="opset, inputs/outputs, op counts, params, bytes, MACs; --runtime: what ORT runs",
        description="Show what MODEL is: opset, inputs/outputs, op counts, parameters, bytes, MACs. With "
        "--runtime, show what ONNX Runtime executes after its own optimizations: per node the kernel, "
        "provider, integer/float kind, input dtypes and share of profiled time; every float island and "
        "why it stays float; and, before running, warnings for known ORT pitfalls on this CPU (S8S8 "
        "QOperator on x86, u8s8 saturation without VNNI, ConvInteger with int8 weights).")
    sp.add_argument("model")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.add_argument("--runtime", action="store_true",
                    help="profile the model in ORT: kernels, float islands and why, pitfall warnings")
    sp.add_argument("--provider", choices=["cpu", "cuda"], default="cpu", help="with --runtime (default cpu)")
    sp.add_argument("--data", metavar="D.npz", help="with --runtime: inputs for the profiling run; "
                    "8-bit activation ranges are observed on them for the saturation check")
    sp.add_argument("--shape", action="append", metavar="NAME=1x3x224x224",
                    help="with --runtime and no --data: shape of the generated input; repeatable")
    sp.set_defaults(fn=cmd_inspect)

    sp = sub.add_parser("passes", help="list registered passes and built-in recipes")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(fn=cmd_passes)

    sp = sub.add_parser("run", help="run a pipeline of passes and save the result",
                        description="Run PIPELINE on MODEL and write OUT. PIPELINE is a recipe name "
                        "(cleanup, fuse, optimize), a YAML recipe file, or a one-line list such as "
                        "'cleanup,fold_batchnorm,upgrade_opset(target=21)'.")
    sp.add_argument("model")
    sp.add_argument("-p", "--pipeline", required=True, help="recipe name, YAML file, or 'pass1,pass2(k=v)'")
    sp.add_argument("-o", "--output", required=True, help="where to write the result (never the input)")
    data_opts(sp)
    sp.add_argument("--verify", action="store_true",
                    help="check structure and outputs after every pass against the input model")
    sp.add_argument("--tolerance", type=float, default=1e-5, help="max relative output change of exact passes")
    sp.add_argument("--report", metavar="R.md", help="write the per-pass report as markdown")
    sp.add_argument("--dump-dir", metavar="DIR", help="where to save a failing pass's input and reproducer")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("-q", "--quiet", action="store_true", help="no progress bar or table")
    sp.add_argument("-v", "--verbose", action="store_true", help="list passes that changed nothing too")
    sp.set_defaults(fn=cmd_run)

    sp = sub.add_parser(
        "quantize", help="int8-quantize with calibration data (shortcut for run -p int8)",
        description="Quantize MODEL to int8, calibrated on --data: the same as `slimgraph run MODEL -p int8 "
        "--data calib.npz -o OUT` (--format qdq: -p int8-qdq, QuantizeLinear/DequantizeLinear pairs for "
        "runtimes that fuse them themselves).")
    sp.add_argument("model")
    sp.add_argument("-o", "--output", required=True, help="where to write the quantized model (never the input)")
    sp.add_argument("--data", metavar="calib.npz",
                    help="calibration inputs (required): keys = model input names, arrays [N, ...]")
    sp.add_argument("--format", choices=sorted(QUANTIZE_RECIPES), default="qoperator",
                    help="qoperator: integer ORT kernels end to end (recipe int8, default); qdq: recipe int8-qdq")
    sp.add_argument("--verify", action="store_true",
                    help="check structure after every pass and measure the output error against the input model")
    sp.add_argument("--report", metavar="R.md", help="write the per-pass report as markdown")
    sp.add_argument("--tolerance", type=float, default=1e-5, help="max relative output change of exact passes")
    sp.add_argument("--dump-dir", metavar="DIR", help="where to save a failing pass's input and reproducer")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("-q", "--quiet", action="store_true", help="no progress bar or table")
    sp.add_argument("-v", "--verbose", action="store_true", help="list passes that changed nothing too")
    sp.set_defaults(fn=cmd_quantize)

    sp = sub.add_parser(
        "prune", help="prune channels (default), weights (--unstructured) or N:M (--n-m); shortcut for run",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Prune MODEL and write OUT. By default structured: whole channels are removed "
        "(cleanup, fuse, prune.structured, cleanup), so the model really shrinks and runs faster; the "
        "channel analysis cuts residuals, Concat/Split and depthwise convolutions consistently and "
        "leaves groups it cannot prove safe whole (listed). Prints channels and MACs per layer, "
        "before and after.",
        epilog="examples:\n"
        "  slimgraph prune model.onnx --ratio 0.5 -o model.pruned.onnx\n"
        "  slimgraph prune model.onnx --ratio 0.3 --mode latency -o fast.onnx      # by measured latency\n"
        "  slimgraph prune model.onnx --mode macs --target-macs 0.5 -o half.onnx    # half the MACs\n"
        "  slimgraph prune model.onnx --criterion apoz --data calib.npz -o out.onnx\n"
        "  slimgraph prune model.onnx --ratio 0.5 --exclude '/head/*' --exclude Gemm -o out.onnx\n"
        "  slimgraph prune model.onnx --unstructured --ratio 0.8 -o sparse.onnx     # 80% zeros, packed\n"
        "  slimgraph prune model.onnx --n-m 2:4 -o model.24.onnx\n")
    sp.add_argument("model")
    sp.add_argument("-o", "--output", required=True, help="where to write the pruned model (never the input)")
    sp.add_argument("--ratio", type=float, default=0.5,
                    help="fraction removed, in [0, 1): of each group's channels (structured), or of the "
                    "weights (--unstructured); e.g. --ratio 0.3 (default 0.5)")
    kind = sp.add_mutually_exclusive_group()
    kind.add_argument("--unstructured", action="store_true",
                      help="zero the smallest weights (sparsity = --ratio) and store them packed "
                      "(prune.magnitude + pack.sparse): a smaller file, same runtime graph")
    kind.add_argument("--n-m", metavar="N:M", help="semi-structured N:M masks (N of every M weights "
                      "kept) for sparse tensor cores, e.g. --n-m 2:4")
    sp.add_argument("--criterion", choices=["l1", "l2", "bn_scale", "apoz", "mean_activation", "random"],
                    default="l1", help="channel importance: weight norm (l1, l2), BatchNorm scale, or from "
                    "activations on --data (apoz, mean_activation); e.g. --criterion l2 (default l1)")
    sp.add_argument("--mode", choices=["uniform", "global", "macs", "latency"], default="uniform",
                    help="how many channels per layer: uniform (--ratio of each group), global (lowest "
                    "scores model-wide), macs (until --target-macs of the MACs are gone), latency "
                    "(by measured ORT latency of each layer's shape, cached per CPU); e.g. --mode latency")
    sp.add_argument("--target-macs", type=float, metavar="F",
                    help="with --mode macs/latency: fraction of MACs (latency: of predicted time) to "
                    "remove, in [0, 1); e.g. --target-macs 0.5")
    sp.add_argument("--multiple", type=int, default=8,
                    help="round kept channel counts to a multiple of this (ORT runs them faster); "
                    "e.g. --multiple 16 (default 8; 1 = no rounding)")
    sp.add_argument("--exclude", action="append", default=[], metavar="PAT",
                    help="leave layers matching this fnmatch pattern alone (node name, op type or torch "
                    "module path); repeatable, e.g. --exclude '/classifier/*' --exclude Gemm")
    sp.add_argument("--data", metavar="D.npz", help="sample inputs (keys = model input names, arrays "
                    "[N, ...]); needed by --criterion apoz/mean_activation and used by --verify")
    sp.add_argument("--report", metavar="R.md", help="write the per-pass report, with the per-layer "
                    "table, as markdown; e.g. --report prune.md")
    sp.add_argument("--verify", action="store_true",
                    help="check the model's structure after every pass and measure how far outputs moved")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("-q", "--quiet", action="store_true", help="no progress bar or tables")
    sp.set_defaults(fn=cmd_prune)

    sp = sub.add_parser("bench", help="ORT latency of one or more models (interleaved, median)")
    sp.add_argument("models", nargs="+")
    data_opts(sp)
    sp.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    sp.add_argument("--runs", type=int, default=30, help="timed runs per model (default 30)")
    sp.add_argument("--warmup", type=int, default=5)
    sp.add_argument("--provider", choices=["cpu", "cuda"], default="cpu")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(fn=cmd_bench)

    sp = sub.add_parser("compare", help="output differences of two models on the same inputs")
    sp.add_argument("a")
    sp.add_argument("b")
    data_opts(sp)
    sp.add_argument("--samples", type=int, default=8, help="generated samples when no --data (default 8)")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(fn=cmd_compare)

    sp = sub.add_parser(
        "search", help="autotune: search pass order and configs against accuracy, latency and size",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Search pipelines for MODEL: which passes, in which (legal) order, with which configs. "
        "Accuracy is your --eval function (called with each candidate's ONNX path, returning a number or a "
        "dict with 'accuracy') or the fidelity of the candidate's outputs to the original's on --data; latency "
        "(ORT, median of paired runs against the original, timed one candidate at a time) and file size are "
        "minimised as ratios to the original. Candidates whose accuracy drops more than --max-drop are over "
        "budget. The original is always evaluated. Writes DIR/best.onnx, best.yaml (a recipe: `slimgraph run "
        "MODEL -p DIR/best.yaml --data D.npz -o out.onnx` reproduces best.onnx), trials.csv/jsonl, report.md, "
        "pareto.png and search.db (optuna; --resume continues an interrupted search).",
        epilog="examples:\n"
        "  slimgraph search model.onnx --data calib.npz --trials 40 -o search/\n"
        "  slimgraph search model.onnx --data calib.npz --eval my_eval:accuracy --max-drop 0.01 -o search/\n"
        "  slimgraph search model.onnx --data calib.npz --strategy nsga2 --jobs 2 --space space.yaml -o s/\n"
        "  slimgraph search model.onnx --data calib.npz --executor ray --address HOST:6379 -o s/\n"
        "  slimgraph search model.onnx --data calib.npz -o search/ --resume      # after an interruption\n"
        "space files: see slimgraph/search/spaces/default.yaml (stages; pick all/one/any; narrowed domains)\n")
    sp.add_argument("model")
    sp.add_argument("-o", "--output", required=True, metavar="DIR", help="output folder (created; never the input)")
    sp.add_argument("--data", metavar="D.npz", help="inputs (keys = model input names, arrays [N, ...]; optional "
                    "'labels'): calibration, fidelity and training data")
    sp.add_argument("--eval", metavar="MODULE:FUNCTION", help="accuracy function, called with a candidate's ONNX "
                    "path; returns a number or a dict with 'accuracy' (a raise or NaN fails that trial only)")
    sp.add_argument("--max-drop", type=float, default=0.01, metavar="X",
                    help="allowed accuracy (or fidelity) drop from the original, e.g. 0.01 (default)")
    sp.add_argument("--objectives", default="latency,size", help="what to minimise besides keeping accuracy: "
                    "latency, size or both (default latency,size)")
    sp.add_argument("--metric", choices=["auto", "top1", "cosine", "rel_error"], default="auto",
                    help="built-in fidelity when no --eval (auto: top1 for score outputs, else cosine)")
    sp.add_argument("--trials", type=int, default=20, help="pipelines to evaluate (default 20)")
    sp.add_argument("--strategy", choices=["tpe", "nsga2", "random", "greedy", "exhaustive"], default="tpe",
                    help="search strategy (default tpe)")
    sp.add_argument("--space", metavar="SPACE.yaml", help="search space file (default: the built-in space)")
    sp.add_argument("--reference", metavar="R1,R2", help="built-in recipes to evaluate alone as reference rows, "
                    "e.g. int8,cluster-16")
    sp.add_argument("--seed-recipes", default="auto", metavar="auto|none|R1,R2",
                    help="built-in recipes tried alone as the first trials (a warm start; they count toward "
                    "--trials). auto (default): the --reference recipes, else int8-dynamic, int4-weights, "
                    "cluster-16, int8 (with --data), prune-50, sparse-80; none: only the space")
    sp.add_argument("--jobs", type=int, default=1, help="candidates built and scored in parallel (default 1)")
    sp.add_argument("--executor", choices=["local", "ray"], default="local",
                    help="local process pool (default) or a Ray cluster")
    sp.add_argument("--address", help="with --executor ray: HOST:PORT, ray://HOST:PORT or auto")
    sp.add_argument("--fallback-local", action="store_true",
                    help="run locally when Ray is missing or unreachable (otherwise that is an error)")
    sp.add_argument("--resume", action="store_true", help="continue the search stored in DIR/search.db")
    sp.add_argument("--no-cache", action="store_true", help="build every pipeline from the input model "
                    "(no reuse of shared prefixes)")
    sp.add_argument("--cache-dir", metavar="DIR", help="intermediate models (default DIR/cache); share it "
                    "between searches of the same model and data")
    sp.add_argument("--proxy-samples", type=int, default=32, help="samples of the cheap fidelity check that "
                    "skips hopeless candidates before the full evaluation (0: off; default 32)")
    sp.add_argument("--latency-runs", type=int, default=20, help="paired timed runs per candidate (default 20)")
    sp.add_argument("--threads", type=int, default=1, help="ORT intra-op threads when timing (default 1)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("-q", "--quiet", action="store_true", help="no progress display or summary")
    sp.set_defaults(fn=cmd_search)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.fn(args)
    except SlimgraphError as e:
        if args.debug:
            raise
        err.print(f"[bold red]slimgraph: error:[/] {e}", soft_wrap=True)
        return e.exit_code
    except KeyboardInterrupt:
        err.print("slimgraph: interrupted")
        return 130
    except Exception as e:  # the CLI boundary: a bug, reported in one line unless --debug
        if args.debug:
            raise
        err.print(f"[bold red]slimgraph: internal error:[/] {type(e).__name__}: {e} "
                  "(rerun with --debug for the traceback)", soft_wrap=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""The search's outputs: best.onnx, best.yaml (a recipe `slimgraph run` reproduces exactly),
trials.jsonl / trials.csv (every evaluated pipeline), report.md (baseline, budget, Pareto
front, every trial, failed trials) and pareto.png (accuracy vs latency and vs size)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

from slimgraph.search import objectives as obj
from slimgraph.search.candidate import Candidate

CSV_COLUMNS = ("number", "kind", "status", "feasible", "accuracy", "drop", "latency_ms", "latency_ratio",
               "size_bytes", "size_ratio", "proxy", "cache_hits", "steps_built", "build_seconds",
               "eval_seconds", "seeded", "duplicate_of", "pipeline", "error")


def summarise(out, baseline, references, trials, objectives, max_drop, strategy, seconds, notes):
    from slimgraph.search.api import SearchResult

    ok = [r for r in trials if r["status"] == "ok"]
    feasible = [r for r in ok if r["feasible"]]
    front = obj.pareto_front(trials, objectives)
    if feasible:
        best = max(feasible, key=lambda r: obj.score(r, objectives))
    else:  # nobody meets the budget: the closest to it, reported as such
        best = max(ok, key=lambda r: r["accuracy"], default=None)
    return SearchResult(Path(out), baseline, trials, references, front, best, bool(feasible), objectives,
                        max_drop, strategy, seconds, notes)


def _write(path: Path, text: str | bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(text.encode() if isinstance(text, str) else text)
    os.replace(tmp, path)


def write_outputs(result, model_path: Path, data_path: str | None) -> None:
    out = result.output
    if result.best is not None:
        tmp = out / ".best.onnx.tmp"
        shutil.copyfile(result.best["path"], tmp)
        os.replace(tmp, out / "best.onnx")
        cmd = f"slimgraph run {model_path} -p {out / 'best.yaml'}" + (f" --data {data_path}" if data_path else "") \
            + " -o best.onnx"
        desc = (f"Found by slimgraph search ({result.strategy}, trial {result.best['number']}): accuracy "
                f"{result.best['accuracy']:.4f} (drop {result.best['drop']:+.4f}), latency x"
                f"{result.best['latency_ratio']:.3f}, size x{result.best['size_ratio']:.3f} of the original"
                + ("" if result.budget_met else "; it does NOT meet the accuracy budget")
                + f". Reproduce: {cmd}")
        _write(out / "best.yaml", Candidate.from_spec(result.best["spec"]).to_yaml(desc))
    records = result.records
    _write(out / "trials.jsonl", "".join(json.dumps(r, default=str) + "\n" for r in records))
    buf = io.StringIO()
    w = csv.DictWriter(buf, CSV_COLUMNS, extrasaction="ignore")
    w.writeheader()
    for r in records:
        w.writerow({k: r.get(k) for k in CSV_COLUMNS})
    _write(out / "trials.csv", buf.getvalue())
    _write(out / "report.md", markdown(result))
    plot(result, out / "pareto.png")


def _f(v, fmt=".4f") -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def _row(r: dict, front_keys: set[str]) -> str:
    name = r["kind"] if r["kind"] != "trial" else str(r.get("number", ""))
    name += " (seeded)" if r.get("seeded") else ""
    mark = " *" if r["key"] in front_keys else ""
    return (f"| {name}{mark} | {r['status'] if r['status'] != 'ok' else ('ok' if r['feasible'] else 'over budget')} "
            f"| {_f(r.get('accuracy'))} | {_f(r.get('drop'), '+.4f')} | {_f(r.get('latency_ms'), '.3f')} "
            f"| {_f(r.get('latency_ratio'), '.3f')} | {r.get('size_bytes') or ''} | {_f(r.get('size_ratio'), '.3f')} "
            f"| {r.get('cache_hits', 0)}/{r.get('cache_hits', 0) + r.get('steps_built', 0)} | `{r['pipeline']}` |")


HEADER = ("| trial | status | accuracy | drop | latency (ms) | latency x | bytes | size x | cached steps | pipeline |\n"
          "|---|---|---:|---:|---:|---:|---:|---:|---:|---|\n")


def markdown(result) -> str:
    b = result.baseline
    front_keys = {r["key"] for r in result.front}
    lines = [
        "# slimgraph search report\n",
        f"Strategy `{result.strategy}`, {len(result.trials)} trials in {result.seconds:.1f} s; objectives: "
        f"accuracy (max), {', '.join(result.objectives)} (min, as ratios to the original); budget: accuracy drop "
        f"<= {result.max_drop}.\n",
        f"Baseline (the unmodified model): accuracy {_f(b['accuracy'])}, latency {_f(b['latency_ms'], '.3f')} ms "
        f"(timed against itself: x{_f(b['latency_ratio'], '.3f')}, the timing noise), {b['size_bytes']} bytes.\n",
    ]
    if result.budget_met:
        lines.append(f"**Budget met.** Best (highest geometric-mean gain in {', '.join(result.objectives)} within the "
                     f"budget): trial {result.best['number']}, `{result.best['pipeline']}`.\n")
    else:
        best = result.best
        lines.append("**No candidate meets the budget.** " + (
            f"The best found (highest accuracy) is trial {best['number']}, `{best['pipeline']}`, drop "
            f"{best['drop']:+.4f}; it is written as best.onnx/best.yaml anyway." if best else
            "No candidate could even be evaluated; see the failed trials.") + "\n")
    for n in result.notes:
        lines.append(f"Note: {n}\n")
    seeded = [r["seeded"] for r in result.trials if r.get("seeded")]
    if seeded:
        lines.append(f"Seeded: the first {len(seeded)} trials are built-in recipes applied alone "
                     f"({', '.join(seeded)}); they count toward the trials.\n")
    repeats = [r for r in result.trials if r.get("duplicate_of") is not None]
    if repeats:
        lines.append(f"{len(repeats)} trial(s) repeat an earlier pipeline (the space had nothing new left after "
                     "re-sampling): their stored results were reused.\n")
    lines.append("## Pareto front (within the budget)\n")
    lines.append(HEADER + "\n".join(_row(r, front_keys) for r in [b, *result.front]) + "\n")
    if result.references:
        lines.append("## Reference recipes (applied alone)\n")
        lines.append(HEADER + "\n".join(_row(r, front_keys) for r in result.references) + "\n")
    lines.append("## Every trial (* = on the Pareto front)\n")
    lines.append(HEADER + "\n".join(_row(r, front_keys) for r in result.trials) + "\n")
    failed = [r for r in result.records if r["status"] == "failed"]
    if failed:
        lines.append("## Failed trials\n")
        for r in failed:
            lines.append(f"- trial {r.get('number', r['kind'])} `{r['pipeline']}`: {r['error']}")
        lines.append("\nFull tracebacks are in trials.jsonl.\n")
    pruned = [r for r in result.trials if r["status"] == "pruned"]
    if pruned:
        lines.append(f"{len(pruned)} trial(s) were stopped by the cheap proxy check (fidelity on the first samples "
                     "far below the budget) and not fully evaluated.\n")
    return "\n".join(lines)


def plot(result, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    objectives = [o for o in ("latency", "size")]
    fig, axes = plt.subplots(1, len(objectives), figsize=(5.5 * len(objectives), 4.2), squeeze=False)
    front_keys = {r["key"] for r in result.front}
    ok = [r for r in result.trials if r["status"] == "ok"]
    for ax, o in zip(axes[0], objectives):
        refs = [r for r in result.references if r["status"] == "ok"]
        groups = [
            ("over budget", [r for r in ok if not r["feasible"]], dict(c="lightgray", marker="o")),
            ("within budget", [r for r in ok if r["feasible"] and r["key"] not in front_keys],
             dict(c="tab:blue", marker="o")),
            ("Pareto front", [r for r in ok if r["key"] in front_keys], dict(c="tab:red", marker="D")),
            ("references", refs, dict(c="tab:green", marker="s")),
            ("original", [result.baseline], dict(c="black", marker="*", s=120)),
        ]
        # zoom on the budget: far worse points are drawn on the bottom edge
        floor = result.baseline["accuracy"] - 4 * max(result.max_drop, 1e-3)
        top = max([r["accuracy"] for r in ok] + [result.baseline["accuracy"]]) + max(result.max_drop, 1e-3)
        for label, rows, style in groups:
            if rows:
                ax.scatter([r[f"{o}_ratio"] for r in rows], [max(r["accuracy"], floor) for r in rows],
                           label=label, **style)
        for r in refs:
            ax.annotate(r["pipeline"], (r[f"{o}_ratio"], max(r["accuracy"], floor)), fontsize=7, rotation=20)
        ax.set_ylim(floor - 0.3 * max(result.max_drop, 1e-3), top)
        ax.axhline(result.baseline["accuracy"] - result.max_drop, color="gray", ls="--", lw=0.8, label="budget")
        ax.set_xlabel(f"{o} (ratio to the original)")
        ax.set_ylabel("accuracy (below the axis: drawn at its bottom)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"slimgraph search ({result.strategy}, {len(result.trials)} trials)")
    fig.tight_layout()
    tmp = path.with_name(".pareto.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)

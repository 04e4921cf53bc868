"""What the training passes share: batches from the pass context, the optimizer and
schedule, the progress bar with the loss, divergence checks, and the constraints that
keep compression intact while weights move.

Constraints (applied after every optimizer step, so the model is never off them):
- zeros: every trainable tensor with exact zeros keeps them (pruned weights, N:M patterns;
  the gradient of a zero is masked too, so Adam's moments do not push it off);
- clusters: a tensor recorded by the "clusters" contract keeps one shared value per
  cluster: after the step each cluster's members are set to their mean. With SGD that
  is exactly the centroid moving by the mean of its members' gradients (the gradient
  aggregation of Deep Compression); with Adam it is the same up to per-element scaling.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator

import numpy as np

from slimgraph.errors import PassError
from slimgraph.ir.model import Model
from slimgraph.passes import contracts
from slimgraph.passes.base import PassConfig, PassContext, choice, float_range, int_range


@dataclasses.dataclass
class Constraint:
    """Masks and cluster labels of one parameter."""

    zero_mask: object | None = None  # torch bool tensor: True where the weight must stay 0
    labels: object | None = None  # torch long tensor, same shape: cluster of each element
    clusters: int = 0


def constraints(module, model: Model) -> dict[str, Constraint]:
    """Per trainable parameter key: what must hold after every step."""
    import torch

    by_name = {name: key for name, key in module._const_names.items() if key in module.params}
    clustered = {r["id"]: r for kind, r in contracts.records(model) if kind == "clusters"}
    out: dict[str, Constraint] = {}
    for name, key in by_name.items():
        p = module.params[key]
        c = Constraint()
        zeros = p.detach() == 0
        if p.dim() > 1 and zeros.any():
            c.zero_mask = zeros
        record = clustered.get(name)
        if record is not None:
            w = p.detach()
            axis = record.get("axis") if record.get("per") == "channel" else None
            rows = w.reshape(1, -1) if axis is None else w.movedim(axis, 0).reshape(w.shape[axis], -1)
            labels = torch.empty_like(rows, dtype=torch.long)
            offset = 0
            for r in range(rows.shape[0]):  # unique values per row: the codebook
                _, inverse = torch.unique(rows[r], return_inverse=True)
                labels[r] = inverse + offset
                offset += int(inverse.max()) + 1
            moved = labels.reshape(w.movedim(axis, 0).shape) if axis is not None else labels.reshape(w.shape)
            c.labels = moved.movedim(0, axis) if axis is not None else moved
            c.clusters = offset
        if c.zero_mask is not None or c.labels is not None:
            out[key] = c
    return out


def apply_constraints(module, cons: dict[str, Constraint]) -> None:
    import torch

    with torch.no_grad():
        for key, c in cons.items():
            p = module.params[key]
            if c.labels is not None:
                flat = c.labels.reshape(-1)
                sums = torch.zeros(c.clusters, dtype=p.dtype, device=p.device).index_add_(0, flat, p.reshape(-1))
                counts = torch.bincount(flat, minlength=c.clusters).to(p.dtype)
                p.copy_((sums / counts.clamp(min=1))[flat].reshape(p.shape))
            if c.zero_mask is not None:
                p.masked_fill_(c.zero_mask, 0.0)


def mask_gradients(module, cons: dict[str, Constraint]) -> None:
    for key, c in cons.items():
        p = module.params[key]
        if c.zero_mask is not None and p.grad is not None:
            p.grad.masked_fill_(c.zero_mask, 0.0)


def batches(data: dict[str, np.ndarray], labels: np.ndarray | None, batch_size: int, epochs: int,
            rng: np.random.Generator) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray | None]]:
    n = len(next(iter(data.values())))
    for _ in range(epochs):
        order = rng.permutation(n)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            yield {k: v[idx] for k, v in data.items()}, (None if labels is None else labels[idx])


def optimizer(params, name: str, lr: float, weight_decay: float, steps: int, schedule: str):
    import torch

    if name == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    elif schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1))
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    return opt, sched


def step(module, loss, opt, sched, cons: dict[str, Constraint], index: int, where: str) -> float:
    """One optimizer step that keeps the constraints; returns the loss value (stops on NaN)."""
    value = float(loss.detach())
    check_loss(value, index, where)
    opt.zero_grad()
    loss.backward()
    mask_gradients(module, cons)
    opt.step()
    sched.step()
    apply_constraints(module, cons)
    return value


def check_loss(loss: float, step: int, where: str) -> None:
    if not math.isfinite(loss):
        raise PassError(where, f"training diverged at step {step} (loss {loss}); lower lr (the input model is untouched)")


@contextlib.contextmanager
def progress(enabled: bool, total: int, description: str):
    """A rich progress bar over steps showing the running loss; yields update(loss)."""
    if not enabled:
        yield lambda loss: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
                  TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                  transient=True) as bar:
        task = bar.add_task(description, total=total, loss="-")
        yield lambda loss: bar.update(task, advance=1, loss=f"{loss:.4f}")


def training_data(ctx: PassContext, model: Model, where: str, *, need_labels: bool) -> tuple[dict, np.ndarray | None]:
    from slimgraph import data as sg_data

    if not ctx.data:
        raise PassError(where, "needs training data (--data D.npz with the model's inputs)")
    data = sg_data.check(ctx.data, model, where=f"{where}: training data")
    labels = None if ctx.labels is None else np.asarray(ctx.labels)
    if need_labels and labels is None:
        raise PassError(where, "needs labels: a 'labels' array in the .npz (or labels=...)")
    if labels is not None and len(labels) != sg_data.count(data):
        raise PassError(where, f"{len(labels)} labels for {sg_data.count(data)} samples")
    return data, labels


def device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


class TrainConfig(PassConfig):
    """The optimisation settings every training pass takes."""

    epochs: int = int_range(1, 1000, default=5)
    lr: float = float_range(1e-6, 1.0, default=1e-3, log=True)
    batch_size: int = int_range(1, 4096, default=64, log=True)
    optimizer: str = choice("adamw", "sgd", default="adamw")
    schedule: str = choice("cosine", "onecycle", "constant", default="cosine")
    weight_decay: float = float_range(0.0, 0.1, default=0.0)
    device: str = choice("auto", "cpu", "cuda", default="auto")


def tensors(feeds: dict[str, np.ndarray], dev: str) -> dict:
    import torch

    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(dev) for k, v in feeds.items()}


def summary(losses: list[float], steps: int, epochs: int, start: float) -> dict:
    """The statistics every training pass reports (the loss curve hidden from the table)."""
    import time

    return {"steps": steps, "loss_first": round(losses[0], 5),
            "loss_last_epoch": round(float(np.mean(losses[-max(1, steps // epochs):])), 5),
            "seconds": round(time.perf_counter() - start, 2),
            "_loss_curve": [round(v, 5) for v in losses[:: max(1, len(losses) // 200)]]}

"""Channel importance criteria for `prune.structured`: one score per channel of a group.

- l1 / l2: the norm of every weight entry of the channel, per weight tensor of the group
  (producers' output filters, consumers' input columns, depthwise filters; biases and
  BatchNorm parameters are not weights), each tensor's scores divided by their mean so
  layers of different scale count equally, then summed;
- consumer_l1 / consumer_l2: the norm of the weights that *read* the channel only (the
  next layers' input slices, each tensor divided by its mean, summed): how much the rest
  of the network listens to the channel. After BatchNorm folding a producer's filter norm
  ignores the folded bias, which often carries a ReLU channel's output, so the readers'
  weights rank channels better (digits CNN at 30% / 50% cut, no fine-tuning: see
  benchmarks/results/prune.md). Groups no weight reads (feeding outputs through
  pass-through ops only) fall back to l1 / l2;
- bn_scale: |gamma| of the group's BatchNormalization(s); after BatchNorm folding a group
  has none and falls back to l1;
- apoz / mean_activation: from the group's activations on sample data (ORT with the
  activations exposed as outputs): 1 - the fraction of non-positive values, or the mean
  absolute value;
- random: a seeded random score (a baseline for comparisons).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np

from slimgraph.ir.model import Model
from slimgraph.passes.prune.channels import ChannelAnalysis, Group

logger = logging.getLogger("slimgraph.passes.prune")

WEIGHT_ROLES = ("producer", "consumer", "depthwise")
ACTIVATION_CRITERIA = ("apoz", "mean_activation")
#: activations exposed per group (a group can span dozens of tensors in a residual stage)
MAX_VALUES_PER_GROUP = 4


def _normalised(v: np.ndarray) -> np.ndarray:
    mean = float(np.mean(v))
    return v / mean if mean > 0 else v


CONSUMER_CRITERIA = ("consumer_l1", "consumer_l2")


def weight_scores(group: Group, order: int, roles: tuple[str, ...] = WEIGHT_ROLES) -> np.ndarray:
    """Sum over the group's weight tensors (of `roles`) of each channel's normalised L1 or
    L2 norm; all weight roles when none of `roles` is present."""
    present = {s.role for s, _ in group.slices}
    if not present & set(roles):
        roles = WEIGHT_ROLES
    total = np.zeros(group.size)
    for s, rows in group.weight_rows():
        if s.role in roles and s.value.shape is not None and len(s.value.shape) >= 2:
            norms = np.abs(rows).sum(axis=1) if order == 1 else np.sqrt((rows ** 2).sum(axis=1))
            total += _normalised(norms)
    return total


def bn_scores(group: Group) -> np.ndarray | None:
    parts = [np.abs(rows[:, 0]) for s, rows in group.weight_rows() if s.role == "bn_scale"]
    return None if not parts else sum(_normalised(p) for p in parts)


def activation_scores(
    model: Model, analysis: ChannelAnalysis, groups: list[Group], data: Mapping[str, np.ndarray],
    criterion: str, samples: int,
) -> dict[int, np.ndarray]:
    """Per-group scores from activations on up to `samples` inputs of `data`."""
    from slimgraph.backends import ort

    probe = model.clone()
    wanted: dict[int, list[tuple[str, int, int]]] = {}
    outputs = {v.name for v in probe.graph.outputs}
    values = {o.name: o for n in probe.graph for o in n.outputs}
    for g in groups:
        picks = [(n, a, f) for n, a, f in g.values if n in values and values[n].shape is not None][:MAX_VALUES_PER_GROUP]
        wanted[g.id] = picks
        for name, _, _ in picks:
            if name not in outputs:
                probe.graph.outputs.append(values[name])
                outputs.add(name)
    n = min(samples, min(len(a) for a in data.values()))
    subset = {k: a[:n] for k, a in data.items()}
    results = ort.run_batched(ort.session(probe, optimization="disable"), subset)
    scores = {}
    for g in groups:
        total = np.zeros(g.size)
        for name, axis, factor in wanted[g.id]:
            # channel c owns rows [c*factor, (c+1)*factor) of the channel axis
            a = np.moveaxis(results[name], axis, 0).reshape(g.size, -1).astype(np.float64)
            s = (a > 0).mean(axis=1) if criterion == "apoz" else np.abs(a).mean(axis=1)
            total += _normalised(s)
        scores[g.id] = total if wanted[g.id] else weight_scores(g, 1)
    return scores


def scores(
    model: Model, analysis: ChannelAnalysis, groups: list[Group], criterion: str, *,
    data: Mapping[str, np.ndarray] | None = None, samples: int = 64, rng: np.random.Generator | None = None,
) -> dict[int, np.ndarray]:
    """{group id: per-channel importance} for `groups` under `criterion`."""
    if criterion in ACTIVATION_CRITERIA:
        return activation_scores(model, analysis, groups, data, criterion, samples)
    out = {}
    fallback = 0
    for g in groups:
        if criterion == "random":
            out[g.id] = (rng or np.random.default_rng(0)).random(g.size)
        elif criterion == "bn_scale":
            s = bn_scores(g)
            fallback += s is None
            out[g.id] = weight_scores(g, 1) if s is None else s
        elif criterion in CONSUMER_CRITERIA:
            out[g.id] = weight_scores(g, 1 if criterion == "consumer_l1" else 2, roles=("consumer",))
        else:
            out[g.id] = weight_scores(g, 1 if criterion == "l1" else 2)
    if fallback:
        logger.info("bn_scale: %d group(s) have no BatchNormalization (folded?); scored by l1", fallback)
    return out

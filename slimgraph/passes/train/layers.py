"""Layer dropping for transformer students (issue 6, `train.distill`'s starting point).

A student made by keeping every k-th encoder layer of a BERT-style teacher (Sanh et al.'s
DistilBERT initialisation) starts close to the teacher, so distillation converges in a
few hundred steps instead of training from scratch. `drop_layers` works on the torch
module (a Hugging Face `BertModel`, or a wrapper holding one such as `zoo.minilm_torch()`)
and returns a new module; `export_student` turns it into a slimgraph Model with the same
inputs and output as `zoo.minilm()`, ready for `train.distill(teacher=<minilm path>)`.

This module holds no pass: it imports torch only when called.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from slimgraph.errors import SlimgraphError


def _encoder_layers(module: Any) -> tuple[Any, Any]:
    """(the object owning `.layer`, the BERT config) found inside `module`."""
    for sub in module.modules():
        layers = getattr(getattr(sub, "encoder", None), "layer", None)
        if layers is not None and hasattr(sub, "config"):
            return sub.encoder, sub.config
    raise SlimgraphError(
        f"{type(module).__name__} has no BERT-style encoder (a submodule with .config and .encoder.layer): "
        "drop_layers needs a Hugging Face BertModel or a module wrapping one")


def kept_layers(count: int, keep_every: int | None = None, keep: Sequence[int] | None = None) -> list[int]:
    """Indices of the layers kept out of `count`: `keep` as given, or every `keep_every`-th
    starting from layer 0 (6 layers, keep_every=2: [0, 2, 4])."""
    if (keep_every is None) == (keep is None):
        raise SlimgraphError("give exactly one of keep_every=k or keep=[indices]")
    if keep is None:
        if keep_every < 1:
            raise SlimgraphError(f"keep_every must be >= 1, got {keep_every}")
        return list(range(0, count, keep_every))
    idx = [int(i) for i in keep]
    bad = [i for i in idx if not 0 <= i < count]
    if bad or not idx:
        raise SlimgraphError(f"keep={list(keep)}: indices must be in 0..{count - 1} and not empty")
    if sorted(set(idx)) != idx:
        raise SlimgraphError(f"keep={list(keep)} must be strictly increasing")
    return idx


def drop_layers(module: Any, keep_every: int | None = None, keep: Sequence[int] | None = None) -> Any:
    """A copy of `module` with only the kept encoder layers (weights copied from the
    teacher's layers, in order); `config.num_hidden_layers` is updated. The argument is
    not modified."""
    import torch

    student = copy.deepcopy(module)
    encoder, config = _encoder_layers(student)
    idx = kept_layers(len(encoder.layer), keep_every, keep)
    encoder.layer = torch.nn.ModuleList([encoder.layer[i] for i in idx])
    config.num_hidden_layers = len(idx)
    for i, layer in enumerate(encoder.layer):  # HF layers that know their index (cache slots)
        attn = getattr(getattr(layer, "attention", None), "self", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = i
    return student.eval()


def export_student(module: Any, sentences: Sequence[str] | None = None, length: int | None = None):
    """The student as a slimgraph Model with `zoo.minilm()`'s inputs (input_ids,
    attention_mask, token_type_ids: int64 [batch, length], `length` defaulting to
    MINILM_MAX_LENGTH) and output.

    A shorter `length` gives a cheaper model to train on short sentences: attention masks
    out the padding, so it computes the same embedding for every sentence that fits, and
    its initializers have the same names and shapes as the full-length export's
    (`copy_weights` moves the trained values back)."""
    import torch

    from slimgraph import zoo
    from slimgraph.ir.io import load

    length = length or zoo.MINILM_MAX_LENGTH
    if not 2 <= length <= zoo.MINILM_MAX_LENGTH:
        raise SlimgraphError(f"length={length}: must be in 2..{zoo.MINILM_MAX_LENGTH}")
    feeds = zoo.minilm_inputs(list(sentences or ["An example sentence to trace the encoder.", "A second one."]))
    example = tuple(torch.from_numpy(feeds[name][:, :length]) for name in zoo.MINILM_INPUTS)
    return load(module.eval(), example_inputs=example, input_names=list(zoo.MINILM_INPUTS),
                output_names=[zoo.MINILM_OUTPUT])


def copy_weights(source, target):
    """A copy of `target` whose initializers take the values of `source`'s initializers of
    the same name (e.g. a student trained at a short sequence length back into its
    full-length export). Every initializer of `target` must have a same-shaped match."""
    import numpy as np
    import onnx_ir as ir

    from slimgraph.ir.model import Model

    out: Model = target.clone()
    src = source.graph.initializers
    problems = [name for name, v in out.graph.initializers.items()
                if name not in src or tuple(src[name].const_value.shape) != tuple(v.const_value.shape)]
    if problems:
        raise SlimgraphError(f"copy_weights: {len(problems)} initializer(s) of the target have no same-shaped "
                             f"match in the source, e.g. {problems[:3]}: were both exported from one module?")
    for name, v in out.graph.initializers.items():
        v.const_value = ir.tensor(np.array(src[name].const_value.numpy()), name=name)
    return out

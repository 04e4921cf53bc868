"""train.distill: knowledge distillation into the model being compressed.

The student is the pipeline's model (pruned, clustered, ... and run through the torch
executor); the teacher is any model `slimgraph.load` takes (an ONNX path), or `input`:
the pipeline's own input model (so `prune.structured, train.distill(teacher=input)` is a
recipe). The teacher runs once over the whole data set through ONNX Runtime, in batches,
before training: its outputs (and matched features) are cached, not recomputed each epoch.
The loss is

    T^2 * KL(softmax(teacher / T) || softmax(student / T))      (soft targets, Hinton et al.)
  + hard_weight * cross-entropy(student, labels)                  (when labels are given)
  + feature_weight * sum over `features` of MSE(student[s], teacher[t])

so unlabeled data is enough (soft targets only). For embedding models whose output is not
a distribution (`loss: mse`, or `cosine`), the soft term compares the outputs directly.
Feature pairs name a student tensor and a teacher tensor of the same shape
(`features: ["student_name=teacher_name"]`): both are exposed as extra outputs.

Preservation is the same as `train.finetune`'s: pruned zeros and clusters are kept.
"""

from __future__ import annotations

import time

import numpy as np

from slimgraph.errors import PassError
from slimgraph.ir.model import Model
from slimgraph.passes.base import Pass, PassContext, PassResult, choice, float_range, register_pass
from slimgraph.passes.train import _loop


@register_pass
class Distill(Pass):
    """Knowledge distillation from a teacher model (KL on softened outputs, optional labels and features)."""

    name = "train.distill"
    exact = False
    requires = ("data", "torch")
    after = ("fold_batchnorm",)
    before = ("quantize.*", "pack.*")

    class Config(_loop.TrainConfig):
        #: the teacher: a model path (ONNX), or "input" (the pipeline's input model), run with ONNX Runtime
        teacher: str
        temperature: float = float_range(1.0, 20.0, default=4.0)
        #: "kl" (classifier logits), "mse" or "cosine" (embeddings)
        loss: str = choice("kl", "mse", "cosine", default="kl")
        #: weight of the hard-label cross-entropy (0: soft targets only; needs labels when > 0)
        hard_weight: float = float_range(0.0, 1.0, default=0.0)
        #: intermediate tensors matched by MSE: "student_tensor=teacher_tensor"
        features: tuple[str, ...] = ()
        feature_weight: float = float_range(0.0, 100.0, default=1.0)

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        import torch

        from slimgraph.backends.torch_exec import GraphModule

        cfg = self.config
        data, labels = _loop.training_data(ctx, model, self.name, need_labels=cfg.hard_weight > 0)
        pairs = [self._pair(f) for f in cfg.features]
        teacher_seconds = 0.0
        # handed in for this run only: a reused instance never trains on stale targets
        targets, self.teacher_outputs = self.teacher_outputs, None
        if targets is None:  # once per run, not per epoch
            teacher = _Teacher(self._teacher_source(ctx), [t for _, t in pairs], self.name)
            targets = teacher.outputs(data, cfg.batch_size)
            teacher_seconds = teacher.seconds
        self.last_teacher_outputs = targets
        model.graph.sort()
        student_model = _with_outputs(model, [s for s, _ in pairs], self.name)
        module = GraphModule(student_model)
        first_out = module.output_names[0]
        self._check_shapes(module, data, targets[0], first_out)
        # the cached targets travel with their samples through the shuffled batches
        keyed = {**data, **{f"{_TARGET}{i}": t for i, t in enumerate(targets)}}
        dev = _loop.device(cfg.device)
        module.to(dev)
        cons = _loop.constraints(module, model)
        n = len(next(iter(data.values())))
        steps = cfg.epochs * -(-n // cfg.batch_size)
        opt, sched = _loop.optimizer(module.parameters(), cfg.optimizer, cfg.lr, cfg.weight_decay, steps, cfg.schedule)
        rng = np.random.default_rng(ctx.seed)
        torch.manual_seed(ctx.seed)
        losses, start = [], time.perf_counter()
        with _loop.progress(ctx.progress, steps, self.name) as update:
            for step, (feeds, y) in enumerate(_loop.batches(keyed, labels, cfg.batch_size, cfg.epochs, rng)):
                t_out, *t_feats = (torch.from_numpy(feeds.pop(f"{_TARGET}{i}")).to(dev) for i in range(len(targets)))
                outs = module(**_loop.tensors(feeds, dev), as_dict=True)
                student = outs[first_out]
                loss = self._soft(student, t_out)
                if cfg.hard_weight > 0:
                    loss = loss + cfg.hard_weight * torch.nn.functional.cross_entropy(student, torch.from_numpy(y).to(dev).long())
                for (s_name, _), t_val in zip(pairs, t_feats):
                    loss = loss + cfg.feature_weight * torch.nn.functional.mse_loss(outs[s_name], t_val)
                value = _loop.step(module, loss, opt, sched, cons, step, self.name)
                losses.append(value)
                update(value)
        trained = module.cpu().to_model()
        for _ in pairs:  # drop the feature outputs again
            trained.graph.outputs.pop()
        model.ir = trained.ir
        return PassResult(model, True, {**_loop.summary(losses, steps, cfg.epochs, start),
                                        "teacher_seconds": round(teacher_seconds, 2),
                                        "constrained_tensors": len(cons)})

    #: The teacher's outputs [first output, *features] over the training data, set by a
    #: caller that distils again from the same teacher on the same data (prune.gradual, at
    #: every step) from the previous run's `last_teacher_outputs`; used by the next run only.
    teacher_outputs: list[np.ndarray] | None = None
    last_teacher_outputs: list[np.ndarray] | None = None

    def _teacher_source(self, ctx: PassContext):
        if self.config.teacher != "input":
            return self.config.teacher
        if ctx.input_model is None:
            raise PassError(self.name, "teacher 'input' is the pipeline's input model, but this pass runs outside "
                            "a pipeline: give a model path as teacher")
        return ctx.input_model.clone()

    def _check_shapes(self, module, data: dict, target: np.ndarray, name: str) -> None:
        """Compare the student's output with the teacher's on two samples, before training."""
        import torch

        with torch.no_grad():
            probe = module(**_loop.tensors({k: v[:2] for k, v in data.items()}, "cpu"), as_dict=True)[name]
        if tuple(probe.shape[1:]) != target.shape[1:]:
            raise PassError(self.name, f"student output {name!r} has shape (N, {', '.join(map(str, probe.shape[1:]))}), "
                            f"the teacher's (N, {', '.join(map(str, target.shape[1:]))}): they must match")

    def _pair(self, text: str) -> tuple[str, str]:
        if text.count("=") != 1:
            raise PassError(self.name, f"feature {text!r} is not 'student_tensor=teacher_tensor'")
        s, t = (p.strip() for p in text.split("="))
        return s, t

    def _soft(self, student, target):
        import torch.nn.functional as F

        cfg = self.config
        if cfg.loss == "mse":
            return F.mse_loss(student, target)
        if cfg.loss == "cosine":
            return (1 - F.cosine_similarity(student.reshape(len(student), -1), target.reshape(len(target), -1))).mean()
        t = cfg.temperature
        return F.kl_div(F.log_softmax(student / t, dim=-1), F.log_softmax(target / t, dim=-1),
                        reduction="batchmean", log_target=True) * t * t


_TARGET = "\0teacher:"  # key prefix of the cached teacher outputs in a batch (no input is named so)


class _Teacher:
    """The teacher on ORT: its first output, plus named intermediate tensors."""

    def __init__(self, source, features: list[str], where: str):
        from slimgraph.ir import load

        teacher = load(source)
        teacher = _with_outputs(teacher, features, where, role="teacher")
        self.model = teacher
        self.inputs = [v.name for v in teacher.graph.inputs]
        self.first = teacher.graph.outputs[0].name
        self.features = features
        self.seconds = 0.0

    def outputs(self, data: dict[str, np.ndarray], batch_size: int) -> list[np.ndarray]:
        """[first output, *features] over all of `data`, float32, run in batches."""
        from slimgraph.backends import ort

        missing = [k for k in self.inputs if k not in data]
        if missing:
            raise PassError("train.distill", f"the teacher needs inputs {missing} that the data lacks")
        start = time.perf_counter()
        out = ort.run_batched(ort.session(self.model), {k: data[k] for k in self.inputs}, batch_size=batch_size)
        self.seconds = time.perf_counter() - start
        return [np.ascontiguousarray(out[k], dtype=np.float32) for k in [self.first, *self.features]]


def _with_outputs(model: Model, names: list[str], where: str, role: str = "student") -> Model:
    """A copy of `model` that also outputs the named intermediate tensors."""
    if not names:
        return model.clone() if role == "teacher" else model
    m = model.clone()
    values = {v.name: v for node in m.graph for v in node.outputs}
    missing = [n for n in names if n not in values]
    if missing:
        raise PassError(where, f"{role} has no tensor(s) {missing} to match features on")
    for n in names:
        m.graph.outputs.append(values[n])
    return m

"""prune.gradual: Zhu & Gupta's gradual pruning, with fine-tuning between the steps.

The sparsity (or channel ratio) rises along the cubic schedule

    s_t = s_f + (s_i - s_f) * (1 - t / n)^3,   t = 1 .. n

so most of the pruning happens early, while the network still has capacity to recover,
and the last steps remove little. After each step `train.finetune` runs `epochs_per_step`
epochs (pruned zeros stay zero), and a final fine-tune of `final_epochs` follows.
Unstructured steps call `prune.magnitude`; structured steps call `prune.structured`
with the step's ratio of the channels that are left (so the kept fraction follows
1 - s_t overall).

With `teacher` set (`input`: the pipeline's input model, or an ONNX path), every
fine-tune is `train.distill` instead: the pruned model learns the teacher's softened
outputs (temperature `temperature`) plus `hard_weight` x the label cross-entropy, the
usual pairing of gradual pruning with knowledge distillation from the dense model. The
soft targets carry more than the labels (how alike the classes look), which is what
the heavily pruned model needs to recover the dense model's decisions.
"""

from __future__ import annotations

from slimgraph.ir.model import Model
from slimgraph.passes.base import Pass, PassConfig, PassContext, PassResult, choice, float_range, int_range, register_pass


def cubic_schedule(final: float, steps: int, initial: float = 0.0) -> list[float]:
    """Sparsity after each of `steps` steps (the last one is `final`)."""
    return [final + (initial - final) * (1 - t / steps) ** 3 for t in range(1, steps + 1)]


@register_pass
class PruneGradual(Pass):
    """Gradual (cubic-schedule) pruning with fine-tuning between steps, unstructured or structured."""

    name = "prune.gradual"
    exact = False
    requires = ("data", "labels", "torch")
    after = ("fold_batchnorm",)
    before = ("quantize.*", "pack.*", "cluster.*")

    class Config(PassConfig):
        sparsity: float = float_range(0.0, 0.99, default=0.8)
        kind: str = choice("unstructured", "structured", default="unstructured")
        steps: int = int_range(1, 50, default=4)
        epochs_per_step: int = int_range(1, 100, default=2)
        final_epochs: int = int_range(0, 1000, default=4)
        lr: float = float_range(1e-6, 1.0, default=1e-3, log=True)
        batch_size: int = int_range(1, 4096, default=64, log=True)
        #: passed to prune.magnitude / prune.structured
        keep_first_last: bool = True
        #: unstructured: one target per layer, or one magnitude ranking over the model
        scope: str = choice("layer", "global", default="layer")
        #: unstructured: fnmatch pattern -> final sparsity of matching layers (each on its own
        #: cubic schedule)
        per_layer: dict[str, float] = {}
        min_size: int = 64
        multiple: int = int_range(1, 64, default=8)
        exclude: tuple[str, ...] = ()
        #: distil from this model while fine-tuning: "input" (the pipeline's input) or a model path
        teacher: str | None = None
        temperature: float = float_range(1.0, 20.0, default=4.0)
        #: with a teacher: weight of the hard-label cross-entropy next to the soft targets
        hard_weight: float = float_range(0.0, 1.0, default=0.5)

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        from slimgraph.passes.base import get_pass

        cfg = self.config
        history, kept = [], 1.0
        self._teacher_outputs = None  # this run's teacher, this run's data
        layers = {pattern: cubic_schedule(final, cfg.steps) for pattern, final in cfg.per_layer.items()}
        for step, target in enumerate(cubic_schedule(cfg.sparsity, cfg.steps)):
            if cfg.kind == "unstructured":
                prune = get_pass("prune.magnitude")(sparsity=target, keep_first_last=cfg.keep_first_last,
                                                    min_size=cfg.min_size, exclude=cfg.exclude, scope=cfg.scope,
                                                    per_layer={p: s[step] for p, s in layers.items()})
            else:
                step_ratio = 1 - (1 - target) / kept  # of the channels still there
                kept = 1 - target
                prune = get_pass("prune.structured")(ratio=max(0.0, min(step_ratio, 0.99)), multiple=cfg.multiple,
                                                     exclude=cfg.exclude)
            prune.run(model, ctx)
            tuned = self._tune(model, ctx, cfg.epochs_per_step, "constant")
            history.append({"sparsity": round(target, 4), "loss": tuned.stats["loss_last_epoch"]})
        if cfg.final_epochs:
            self._tune(model, ctx, cfg.final_epochs, "cosine")
        return PassResult(model, True, {"steps": cfg.steps, "final_sparsity": cfg.sparsity, "table": history,
                                        "distilled": cfg.teacher is not None})

    def _tune(self, model: Model, ctx: PassContext, epochs: int, schedule: str) -> PassResult:
        """Fine-tune after a step: train.finetune, or train.distill with a teacher (whose
        outputs on the data are computed at the first step and reused by the later ones)."""
        from slimgraph.passes.base import get_pass

        cfg = self.config
        common = dict(epochs=epochs, lr=cfg.lr, batch_size=cfg.batch_size, schedule=schedule)
        if cfg.teacher is None:
            return get_pass("train.finetune")(**common).run(model, ctx)
        distill = get_pass("train.distill")(teacher=cfg.teacher, temperature=cfg.temperature,
                                            hard_weight=cfg.hard_weight, **common)
        distill.teacher_outputs = self._teacher_outputs
        result = distill.run(model, ctx)
        self._teacher_outputs = distill.last_teacher_outputs
        return result

"""train.finetune: supervised fine-tuning of the IR through the torch executor.

The model (whatever it came in as) becomes an `nn.Module` (`slimgraph.to_torch`), trains
on the pass context's data and labels with cross-entropy (classification: integer labels)
or MSE (float labels shaped like the output), and the trained values go back into the IR,
so the result continues through the same passes and lowering as any other model.

Compression survives training: pruned zeros (and so N:M patterns) stay zero and clustered
weights stay on their codebooks, with the centroids trained by gradient aggregation (see
`_loop`); the shapes cannot change. The PassManager checks the contracts after the pass.
A loss that turns NaN/inf stops with an error and leaves the input model as it was.
"""

from __future__ import annotations

import time

import numpy as np

from slimgraph.errors import PassError
from slimgraph.ir.model import Model
from slimgraph.passes.base import Pass, PassContext, PassResult, choice, register_pass
from slimgraph.passes.train import _loop


@register_pass
class Finetune(Pass):
    """Supervised fine-tuning (torch executor) that keeps pruned zeros, N:M and clusters."""

    name = "train.finetune"
    exact = False
    requires = ("data", "labels", "torch")
    # BatchNorm folded first (the executor keeps BN statistics fixed); quantization lowers the result
    after = ("fold_batchnorm",)
    before = ("quantize.*", "pack.*")

    class Config(_loop.TrainConfig):
        #: "auto": cross-entropy for integer labels, MSE for float labels
        loss: str = choice("auto", "cross_entropy", "mse", default="auto")
        #: the model output the loss reads (default: the first)
        output: str | None = None

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        import torch

        from slimgraph.backends.torch_exec import GraphModule

        cfg = self.config
        data, labels = _loop.training_data(ctx, model, self.name, need_labels=True)
        module = GraphModule(_sorted(model))
        out_index = self._output_index(module)
        dev = _loop.device(cfg.device)
        module.to(dev)
        cons = _loop.constraints(module, model)
        loss_fn = self._loss(labels)
        n = len(labels)
        steps = cfg.epochs * -(-n // cfg.batch_size)
        opt, sched = _loop.optimizer(module.parameters(), cfg.optimizer, cfg.lr, cfg.weight_decay, steps, cfg.schedule)
        rng = np.random.default_rng(ctx.seed)
        torch.manual_seed(ctx.seed)
        losses, start = [], time.perf_counter()
        with _loop.progress(ctx.progress, steps, self.name) as update:
            for step, (feeds, y) in enumerate(_loop.batches(data, labels, cfg.batch_size, cfg.epochs, rng)):
                inputs = _loop.tensors(feeds, dev)
                pred = module(**inputs)[out_index]
                loss = loss_fn(pred, torch.from_numpy(y).to(dev))
                value = _loop.step(module, loss, opt, sched, cons, step, self.name)
                losses.append(value)
                update(value)
        trained = module.cpu().to_model()
        model.ir = trained.ir
        return PassResult(model, True, {**_loop.summary(losses, steps, cfg.epochs, start), "epochs": cfg.epochs,
                                        "constrained_tensors": len(cons)})

    def _output_index(self, module) -> int:
        name = self.config.output
        if name is None:
            return 0
        if name not in module.output_names:
            raise PassError(self.name, f"output {name!r} is not one of the model's outputs {module.output_names}")
        return module.output_names.index(name)

    def _loss(self, labels: np.ndarray):
        import torch.nn.functional as F

        kind = self.config.loss
        if kind == "auto":
            kind = "cross_entropy" if np.issubdtype(labels.dtype, np.integer) else "mse"
        if kind == "cross_entropy":
            if not np.issubdtype(labels.dtype, np.integer):
                raise PassError(self.name, f"cross_entropy needs integer class labels, got {labels.dtype}")
            return lambda pred, y: F.cross_entropy(pred.reshape(len(y), -1), y.long())
        return lambda pred, y: F.mse_loss(pred, y.to(pred.dtype).reshape(pred.shape))


def _sorted(model: Model) -> Model:
    model.graph.sort()
    return model

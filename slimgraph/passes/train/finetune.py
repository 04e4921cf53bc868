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
from slimgraph.passes.base import Pass, PassConfig, PassContext, PassResult, choice, float_range, int_range, register_pass
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

    class Config(PassConfig):
        epochs: int = int_range(1, 1000, default=5)
        lr: float = float_range(1e-6, 1.0, default=1e-3, log=True)
        batch_size: int = int_range(1, 4096, default=64, log=True)
        optimizer: str = choice("adamw", "sgd", default="adamw")
        schedule: str = choice("cosine", "onecycle", "constant", default="cosine")
        weight_decay: float = float_range(0.0, 0.1, default=0.0)
        #: "auto": cross-entropy for integer labels, MSE for float labels
        loss: str = choice("auto", "cross_entropy", "mse", default="auto")
        #: the model output the loss reads (default: the first)
        output: str | None = None
        device: str = choice("auto", "cpu", "cuda", default="auto")

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
                inputs = {k: torch.from_numpy(np.ascontiguousarray(v)).to(dev) for k, v in feeds.items()}
                pred = module(**inputs)[out_index]
                loss = loss_fn(pred, torch.from_numpy(y).to(dev))
                value = _loop.step(module, loss, opt, sched, cons, step, self.name)
                losses.append(value)
                update(value)
        trained = module.cpu().to_model()
        model.ir = trained.ir
        return PassResult(model, True, {
            "steps": steps, "epochs": cfg.epochs, "loss_first": round(losses[0], 5),
            "loss_last_epoch": round(float(np.mean(losses[-max(1, steps // cfg.epochs):])), 5),
            "constrained_tensors": len(cons), "seconds": round(time.perf_counter() - start, 2),
            "_loss_curve": [round(v, 5) for v in losses[:: max(1, len(losses) // 200)]],
        })

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

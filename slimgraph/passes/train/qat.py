"""train.qat: quantization-aware training, exported through the integer-only lowering.

1. `quantize.static`'s planner runs first (calibration on the data, every choice of the
   post-training path: which ops are quantized, per-channel weights, 7-bit weights on
   CPUs that saturate, folded ReLUs, shared Concat ranges, ...) and annotates the plan on
   the nodes, exactly as for post-training quantization.
2. The model becomes a torch module (`slimgraph.to_torch`) in which every tensor the
   plan quantizes passes through a fake quantizer with those qparams: weights per channel,
   activations per tensor, with the **scales learnable** (LSQ, Esser et al. 2020: the
   rounding is a straight-through estimator, so the loss reaches the scales too) and
   zero points fixed.
3. Training (cross-entropy on labels) moves weights and scales together.
4. Export: each weight is written back on its learned grid (q * scale, exactly), the
   learned scales replace the planned ones in the annotations, and `lower_qoperator`
   emits the integer kernels from them. The lowering re-quantizes a weight on its grid
   to the same integers, so the deployed model computes what was trained: the only
   difference is integer vs float accumulation, at rounding boundaries.

`bits: 4` trains 4-bit weights (values -7..7 in int8 containers: ORT runs them with the
int8 kernels; the file stores int8).
"""

from __future__ import annotations

import time

import numpy as np

from slimgraph.ir.model import Model
from slimgraph.passes.base import Pass, PassConfig, PassContext, PassResult, choice, float_range, int_range, register_pass
from slimgraph.passes.train import _loop


def _fake_quant_module(scale: np.ndarray, zero: np.ndarray, qmin: int, qmax: int, axis: int | None, learn: bool):
    import torch

    class FakeQuant(torch.nn.Module):
        def __init__(self):
            super().__init__()
            s = torch.from_numpy(np.asarray(scale, np.float32).copy())
            self.log_scale = torch.nn.Parameter(torch.log(s), requires_grad=learn)
            self.register_buffer("zero", torch.from_numpy(np.asarray(zero, np.float32).copy()))
            self.qmin, self.qmax, self.axis = qmin, qmax, axis

        def _shaped(self, t, x):
            if self.axis is None or t.dim() == 0:
                return t
            shape = [1] * x.dim()
            shape[self.axis] = -1
            return t.reshape(shape)

        def scale(self):
            return torch.exp(self.log_scale)

        def forward(self, x):
            if not x.is_floating_point():
                return x
            s, z = self._shaped(self.scale(), x), self._shaped(self.zero, x)
            v = x / s + z
            q = torch.clamp(v + (torch.round(v) - v).detach(), self.qmin, self.qmax)  # STE
            return (q - z) * s

    return FakeQuant()


@register_pass
class QuantizationAwareTraining(Pass):
    """QAT with learnable scales (LSQ), 8- or 4-bit weights, exported through the integer lowering."""

    name = "train.qat"
    exact = False
    requires = ("data", "labels", "torch")
    after = ("fold_batchnorm", "prune.*", "cluster.*", "upgrade_opset", "train.finetune", "train.distill")
    before = ("pack.*",)

    class Config(PassConfig):
        #: weight bits: 8 ("auto": 7 where ORT's u8s8 kernels would saturate), or 4
        bits: str | int = choice("auto", 8, 4, default="auto")
        epochs: int = int_range(1, 1000, default=4)
        lr: float = float_range(1e-6, 1.0, default=5e-4, log=True)
        #: learning rate of the (log) scales
        scale_lr: float = float_range(1e-6, 1.0, default=1e-3, log=True)
        batch_size: int = int_range(1, 4096, default=64, log=True)
        learn_scales: bool = choice(True, False, default=True)
        #: weights quantized per output channel (False: one scale per tensor, as quantize.static's per_channel)
        per_channel: bool = choice(True, False, default=True)
        #: calibration samples for the initial plan
        samples: int = int_range(1, 100_000, default=256, log=True)
        device: str = choice("auto", "cpu", "cuda", default="auto")

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        import torch

        from slimgraph.backends.torch_exec import GraphModule
        from slimgraph.passes.quantize import lower_qoperator
        from slimgraph.passes.quantize._common import read_plan, write_plan
        from slimgraph.passes.quantize.qparams import QParams
        from slimgraph.passes.quantize.static import StaticQuantize

        cfg = self.config
        data, labels = _loop.training_data(ctx, model, self.name, need_labels=True)
        bits = "auto" if cfg.bits == "auto" else int(cfg.bits)
        planned = StaticQuantize(weight_bits=bits, samples=cfg.samples, per_channel=cfg.per_channel).plan(model, ctx)
        if planned is None:
            return PassResult(model, False, {"quantized": 0})
        model.graph.sort()
        # every quantized tensor once: value name -> its qparams (weights per channel)
        tensors: dict[str, QParams] = {}
        for node in model.graph:
            plan = read_plan(node)
            if plan is None:
                continue
            for i, qp in plan.inputs.items():
                if node.inputs[i] is not None:
                    tensors.setdefault(node.inputs[i].name, qp)
            for i, qp in plan.outputs.items():
                tensors.setdefault(node.outputs[i].name, qp)
        module = GraphModule(model)
        # tensors the plan gives identical qparams (a folded ReLU's input and output, the
        # inputs of a Concat, data movement) must keep them identical: one shared quantizer
        quantizers, shared = {}, {}
        for name, qp in tensors.items():
            key = (qp.dtype, qp.axis, qp.bits, np.asarray(qp.scale).tobytes(), np.asarray(qp.zero_point).tobytes())
            if key not in shared:
                qmin, qmax = qp.qmin_qmax
                shared[key] = _fake_quant_module(qp.scale, qp.zero_point, qmin, qmax, qp.axis, cfg.learn_scales)
            module.hook(name, shared[key])
            quantizers[name] = shared[key]
        dev = _loop.device(cfg.device)
        module.to(dev)
        cons = _loop.constraints(module, model)
        scale_params = [p for fq in shared.values() for p in fq.parameters()]
        weights = list(module.params.parameters())
        n = len(labels)
        steps = cfg.epochs * -(-n // cfg.batch_size)
        opt = torch.optim.AdamW([{"params": weights, "lr": cfg.lr}, {"params": scale_params, "lr": cfg.scale_lr}],
                                weight_decay=0.0)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
        rng = np.random.default_rng(ctx.seed)
        torch.manual_seed(ctx.seed)
        losses, start = [], time.perf_counter()
        with _loop.progress(ctx.progress, steps, self.name) as update:
            for step, (feeds, y) in enumerate(_loop.batches(data, labels, cfg.batch_size, cfg.epochs, rng)):
                inputs = _loop.tensors(feeds, dev)
                pred = module(**inputs)[0]
                loss = torch.nn.functional.cross_entropy(pred.reshape(len(y), -1), torch.from_numpy(y).to(dev).long())
                value = _loop.step(module, loss, opt, sched, cons, step, self.name)
                losses.append(value)
                update(value)
        module.cpu()
        probe = {k: v[:512] for k, v in data.items()}  # simulation vs deployment check
        with torch.no_grad():
            simulated = module(**{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in probe.items()})[0].numpy()
        # weights onto their learned grids, learned scales into the plan, then lower
        learned = {name: fq.scale().detach().numpy().astype(np.float32) for name, fq in quantizers.items()}
        with torch.no_grad():
            for name, key in module._const_names.items():
                if key in module.params and name in quantizers:
                    module.params[key].copy_(quantizers[name](module.params[key]))
        trained = module.to_model()
        for node in trained.graph:
            plan = read_plan(node)
            if plan is None:
                continue
            for side, values in ((plan.inputs, node.inputs), (plan.outputs, node.outputs)):
                for i, qp in list(side.items()):
                    v = values[i]
                    if v is not None and v.name in learned:
                        side[i] = QParams(learned[v.name].reshape(np.shape(qp.scale)), qp.zero_point, qp.dtype, qp.axis, qp.bits)
            write_plan(node, plan)
        model.ir = trained.ir
        emitted = lower_qoperator.lower(model, owner=self.name)
        from slimgraph.backends import ort

        (deployed,) = list(ort.run_batched(model, probe).values())[:1]
        agreement = float((deployed.reshape(len(deployed), -1).argmax(1) ==
                           simulated.reshape(len(simulated), -1).argmax(1)).mean())
        return PassResult(model, True, {
            "deploy_agreement": round(agreement, 4),
            "steps": steps, "quantized_tensors": len(tensors), "weight_bits": planned.get("weight_bits"),
            **_loop.summary(losses, steps, cfg.epochs, start), "emitted": emitted,
        })

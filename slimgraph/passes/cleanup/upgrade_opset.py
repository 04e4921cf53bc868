"""upgrade_opset: convert the model to a target opset of the default domain (exact).

Later passes emit ops of recent opsets (HardSwish 14, LayerNormalization 17, Gelu 20),
and old models (opset 7-12, from other toolchains) need them. Uses onnxscript's version
converter and falls back to onnx's C++ converter where the former has no adapter.
A model already at or above the target is left alone (never downgraded).
"""

from __future__ import annotations

from onnxscript.version_converter import ConvertVersionPass
from onnxscript.version_converter._version_converter import VersionConverterError

from slimgraph.errors import PassError
from slimgraph.passes.base import Pass, PassConfig, PassResult, int_range, register_pass
from slimgraph.passes.cleanup._onnx_ir import run_ir_pass


@register_pass
class UpgradeOpset(Pass):
    """Convert the default-domain opset up to `target` (exact; never downgrades)."""

    name = "upgrade_opset"
    after = ("lift_constants",)

    class Config(PassConfig):
        target: int = int_range(7, 23, default=21)

    def run(self, model, ctx) -> PassResult:
        current = model.opset
        target = self.config.target
        if current >= target:
            return PassResult(model, modified=False, stats={"from": current, "to": current})
        try:
            result = run_ir_pass(ConvertVersionPass(target_version=target, fallback=True), model)
        except (VersionConverterError, RuntimeError, ValueError) as e:
            raise PassError(self.name, f"cannot convert opset {current} -> {target}: {e}") from e
        if model.opset != target:
            raise PassError(self.name, f"converter left the model at opset {model.opset}, asked {target}")
        result.modified = True
        result.stats.update({"from": current, "to": target})
        return result

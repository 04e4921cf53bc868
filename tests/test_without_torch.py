"""torch is an optional extra: slimgraph imports, loads ONNX, runs passes and uses the zoo's
packaged models without it (here torch is made unimportable in a fresh interpreter)."""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import importlib.abc, sys

    class NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
            return None

    sys.meta_path.insert(0, NoTorch())
    import slimgraph
    from slimgraph import zoo
    from slimgraph.errors import ModelLoadError

    model = slimgraph.load(zoo.magika_model_path())
    result = slimgraph.run(model, "cleanup")
    path = next(p for p in zoo.silero_model_paths() if p.name == "silero_vad_16k_op15.onnx")
    assert set(zoo.silero_inputs(path)) == {"input", "state", "sr"}
    try:
        from slimgraph.ir.torch_import import from_torch
        from_torch(object(), None)
    except ModelLoadError as e:
        assert "pip install" in str(e), e
    else:
        raise AssertionError("from_torch without torch must raise ModelLoadError")
    assert "torch" not in sys.modules
    print("ok", len(result.model.graph))
""")


def test_onnx_path_and_zoo_work_without_torch():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("ok")

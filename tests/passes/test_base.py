import importlib.metadata
import sys
import types

import pytest

from slimgraph.errors import PassError, PipelineError
from slimgraph.passes import Pass, PassConfig, PassResult, choice, float_range, int_range, register_pass
from slimgraph.passes import base
from slimgraph.passes.base import search_domains
from tests.helpers import parse

TINY = """
<ir_version: 8, opset_import: ["" : 15]>
g (float[3] x) => (float[3] y) { y = Relu (x) }
"""


class _Configured(Pass):
    """A pass with every kind of search domain."""

    name = "test.configured"

    class Config(PassConfig):
        mode: str = choice("a", "b", default="a")
        k: int = int_range(2, 256, default=16, log=True)
        ratio: float = float_range(0.0, 0.9, default=0.5)

    def run(self, model, ctx):
        return PassResult(model, False)


def test_config_defaults_and_domains():
    p = _Configured(k=32)
    assert p.config.k == 32 and p.config.mode == "a"
    assert search_domains(_Configured.Config) == {
        "mode": {"choice": ["a", "b"]},
        "k": {"int": [2, 256], "log": True},
        "ratio": {"float": [0.0, 0.9], "log": False},
    }
    assert p.spec() == {"test.configured": {"k": 32}}
    assert repr(p) == "test.configured(k=32)"


@pytest.mark.parametrize("kwargs, message", [
    ({"k": 1}, "k: Input should be greater than or equal to 2"),
    ({"mode": "c"}, r"mode must be one of \['a', 'b'\], got 'c'"),
    ({"nope": 1}, "nope: Extra inputs are not permitted"),
])
def test_bad_config_is_a_pipeline_error_naming_the_field(kwargs, message):
    with pytest.raises(PipelineError, match=message):
        _Configured(**kwargs)


def test_modified_result_bumps_the_version():
    class Touch(Pass):
        name = "test.touch"

        def run(self, model, ctx):
            return PassResult(model, True)

    model = parse(TINY)
    Touch()(model)
    Touch()(model)
    assert model.version == 2


def test_run_must_return_a_pass_result():
    class Bad(Pass):
        name = "test.bad_result"

        def run(self, model, ctx):
            return model

    with pytest.raises(PassError, match="returned Model, not PassResult"):
        Bad()(parse(TINY))


def test_name_clash_is_refused():
    @register_pass
    class One(Pass):
        name = "test.clash"

        def run(self, model, ctx):
            return PassResult(model, False)

    with pytest.raises(TypeError, match="taken"):
        @register_pass
        class Two(Pass):
            name = "test.clash"

            def run(self, model, ctx):
                return PassResult(model, False)


def test_third_party_pass_registers_through_entry_point(monkeypatch):
    module = types.ModuleType("thirdparty_passes")

    class Plugin(Pass):
        """A pass shipped by another package."""

        name = "thirdparty.plugin"

        def run(self, model, ctx):
            return PassResult(model, False)

    module.Plugin = Plugin
    monkeypatch.setitem(sys.modules, "thirdparty_passes", module)
    ep = importlib.metadata.EntryPoint(name="plugin", value="thirdparty_passes:Plugin", group=base.ENTRY_POINT_GROUP)
    monkeypatch.setattr(base.importlib.metadata, "entry_points",
                        lambda group=None: [ep] if group == base.ENTRY_POINT_GROUP else [])
    monkeypatch.setattr(base, "_entry_points_loaded", False)
    assert base.get_pass("thirdparty.plugin") is Plugin

import pytest

from slimgraph.errors import PipelineError
from slimgraph.passes import Pass, PassResult, get_pass, register_pass
from slimgraph.passes.pipeline import FixedPoint, order_graph, order_violations, parse


def names(pipeline):
    return [p.name for p in pipeline.passes()]


def test_one_line_string_with_arguments():
    p = parse("lift_constants,upgrade_opset(target=17),fold_constants(output_size_limit=128, shape_inference=false)")
    assert names(p) == ["lift_constants", "upgrade_opset", "fold_constants"]
    steps = list(p.passes())
    assert steps[1].config.target == 17
    assert steps[2].config.output_size_limit == 128 and steps[2].config.shape_inference is False


def test_recipe_name_expands_with_its_fixed_point():
    p = parse("cleanup")
    assert names(p)[0] == "unpack"  # packed weights are folded back first
    assert isinstance(p.steps[1], FixedPoint)
    assert names(p)[1:7] == ["lift_constants", "fold_constants", "eliminate_identity", "simplify", "cse", "eliminate_dead"]


def test_yaml_file_and_python_list(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("passes:\n  - cse: {size_limit: 3}\n  - fixed_point: [lift_constants, eliminate_dead]\n")
    p = parse(str(f))
    assert names(p) == ["cse", "lift_constants", "eliminate_dead"]
    assert list(p.passes())[0].config.size_limit == 3
    assert names(parse(["cse", {"upgrade_opset": {"target": 18}}, get_pass("topo_sort")()])) == [
        "cse", "upgrade_opset", "topo_sort"]


def test_spec_round_trips_through_yaml(tmp_path):
    p = parse("cleanup,upgrade_opset(target=18)")
    f = tmp_path / "again.yaml"
    f.write_text(p.to_yaml())
    assert parse(str(f)).spec() == p.spec()


@pytest.mark.parametrize("text, message", [
    ("cleanup,fold_batchnrom", "unknown pass 'fold_batchnrom'"),
    ("upgrade_opset(target=banana)", "target"),
    ("upgrade_opset(targt=18)", "targt"),
    ("cse(size_limit 3)", "not key=value"),
    ("cse(size_limit=3", "unclosed"),
    ("", "empty pipeline"),
    ("cleanup(x=1)", "recipe and takes no arguments"),
    ("lift constants", "not `name`"),
])
def test_bad_pipeline_strings_name_the_problem(text, message):
    with pytest.raises(PipelineError, match=message):
        parse(text)


def test_unknown_pass_suggests_close_names():
    with pytest.raises(PipelineError, match="did you mean eliminate_dead"):
        parse("eliminate_ded")


def test_missing_recipe_file_is_a_pipeline_error(tmp_path):
    with pytest.raises(PipelineError, match="not found"):
        parse(str(tmp_path / "nope.yaml"))


@register_pass
class _Late(Pass):
    """Test pass that must come after cse."""

    name = "test.late"
    after = ("cse",)

    def run(self, model, ctx):
        return PassResult(model, False)


def test_order_constraints_are_reported_and_form_a_dag():
    p = list(parse("test.late,cse").passes())
    assert order_violations(p) == ["'test.late' must run after 'cse'"]
    assert order_violations(list(parse("cse,test.late").passes())) == []
    g = order_graph()
    assert g.has_edge("cse", "test.late")
    import networkx as nx

    assert nx.is_directed_acyclic_graph(g)


def test_a_pass_repeated_after_a_constrained_one_is_not_a_violation():
    from slimgraph.passes import get_pass
    from slimgraph.passes.pipeline import order_violations
    import slimgraph.passes.cluster  # noqa: F401  (registration)

    fold, kmeans = get_pass("fold_batchnorm")(), get_pass("cluster.kmeans")()
    assert order_violations([kmeans, fold]) == ["'cluster.kmeans' must run after 'fold_batchnorm'"]
    assert order_violations([fold, kmeans, fold]) == []  # the int8 recipe's own fuse, again


def test_order_patterns_exclude_with_a_bang():
    from slimgraph.passes.pipeline import matches_order

    pack_after = ("*", "!pack.*", "!short_names")
    assert matches_order("quantize.static", pack_after)
    assert matches_order("prune.magnitude", pack_after)
    assert not matches_order("pack.clusters", pack_after)
    assert not matches_order("short_names", pack_after)
    assert not matches_order("cse", ("!cse",))  # exclusions alone name nothing
    # the pack passes' declaration, read through the order check
    p = list(parse("pack.sparse,prune.magnitude").passes())
    assert "'pack.sparse' must run after 'prune.magnitude'" in order_violations(p)
    assert order_violations(list(parse("pack.sparse,pack.clusters,short_names").passes())) == []

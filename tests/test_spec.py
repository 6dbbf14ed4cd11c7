import json

import pytest

from rewrite import Spec, SpecError
from rewrite.passes.cleanup import CleanupSpec
from rewrite.passes.prune import PruneSpec


def test_spec_from_python_yaml_json_roundtrip(tmp_path):
    spec = Spec(passes=[CleanupSpec(), PruneSpec(granularity="head", amount=0.25)])
    y = tmp_path / "s.yaml"
    y.write_text(spec.to_yaml())
    j = tmp_path / "s.json"
    j.write_text(spec.to_json())
    assert Spec.from_yaml(y) == spec
    assert Spec.from_json(j) == spec
    assert Spec.load(str(y)) == spec
    assert Spec.load(spec.model_dump()) == spec
    assert [p.kind for p in Spec.from_yaml("passes:\n  - kind: cleanup\n").passes] == ["cleanup"]


def test_schema_has_pass_kinds():
    schema = json.dumps(Spec.model_json_schema())
    for kind in ("cleanup", "prune", "quantize", "skip", "token"):
        assert f'"{kind}"' in schema


@pytest.mark.parametrize(
    "data, path, words",
    [
        ({"passes": [{"kind": "shrink"}]}, "passes.0", ["unknown pass kind 'shrink'", "cleanup", "prune"]),
        ({"passes": [{"kind": "prune", "granularity": "chanel", "amount": 0.5}]}, "passes.0.granularity", ["chanel", "'channel'"]),
        ({"calibration": {"samples": "many"}}, "calibration.samples", ["many", "integer"]),
        ({"calibration": {"samples": 0}}, "calibration.samples", ["greater than or equal to 1"]),
        ({"passes": [{"kind": "prune", "granularity": "head", "amount": 1.5}]}, "passes.0.amount", ["1.5", "less than 1"]),
        ({"passes": [{"kind": "cleanup", "dropuot": True}]}, "passes.0", ["unknown field 'dropuot'"]),
        ({"exprt": {}}, "spec", ["unknown field 'exprt'"]),
        ({"passes": [{"kind": "prune", "granularity": "n:m", "n": 4, "m": 4}]}, "passes.0", ["n (4) must be smaller than m (4)"]),
        ({"passes": [{"kind": "quantize", "weights": {"bits": 5}}]}, "passes.0.weights.bits", ["5"]),
    ],
)
def test_invalid_spec_names_field_value_and_valid(data, path, words):
    with pytest.raises(SpecError) as info:
        Spec.parse(data)
    msg = str(info.value)
    assert path in msg, msg
    for w in words:
        assert w in msg, msg
    assert "pydantic" not in msg.lower() and "errors.pydantic.dev" not in msg


def test_missing_spec_file():
    with pytest.raises(SpecError, match="not found"):
        Spec.load("does/not/exist.yaml")


@pytest.mark.parametrize("data, line", [
    ({"passes": [{"kind": "skip", "layers": "two"}]},
     "invalid spec: passes.0.layers: should be a valid integer, a valid number or a valid list (got 'two')"),
    ({"passes": [{"kind": "skip", "layers": 0}]},
     "invalid spec: passes.0.layers: should be an integer greater than or equal to 1, a number greater than 0 or a valid list (got 0)"),
])
def test_a_value_that_fits_no_union_member_is_one_line(data, line):
    with pytest.raises(SpecError) as info:
        Spec.parse(data)
    assert str(info.value) == line


def test_several_problems_are_one_line():
    with pytest.raises(SpecError) as info:
        Spec.parse({"calibration": {"samples": -1}, "passes": [{"kind": "prune"}]})
    msg = str(info.value)
    assert "\n" not in msg and "calibration.samples" in msg and "passes.0.granularity: required field is missing" in msg


def test_yaml_and_json_syntax_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("passes:\n  - kind: cleanup\n   oops: [\n")
    with pytest.raises(SpecError, match=r"spec file .*bad\.yaml is not valid YAML at line 3") as info:
        Spec.load(bad)
    assert "\n" not in str(info.value)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"passes": [}')
    with pytest.raises(SpecError, match=r"spec file .*bad\.json is not valid JSON at line 1, column 13"):
        Spec.load(bad_json)


def test_pass_and_importance_kinds_come_from_their_registries():
    """The spec's pass union, kind list and schema are the registered passes' own spec classes; the
    importance fields accept exactly the registered importance kinds."""
    from rewrite.passes.importance import kinds
    from rewrite.pass_base import REGISTRY
    from rewrite.spec import PASS_SPECS, pass_kinds

    assert set(pass_kinds()) == set(REGISTRY) >= {"cleanup", "prune", "quantize", "rotate", "skip", "token"}
    assert all(REGISTRY[k].spec_class is PASS_SPECS[k] for k in REGISTRY)
    defs = Spec.model_json_schema()["$defs"]
    assert defs["PruneSpec"]["properties"]["amount"]["description"] == "Fraction removed within scope."
    for k in kinds.names("layer"):
        assert Spec.parse({"passes": [{"kind": "skip", "importance": k}]}).passes[0].importance == k
    with pytest.raises(SpecError, match="block_influence"):
        Spec.parse({"passes": [{"kind": "skip", "importance": "nope"}]})
    assert Spec.parse({"passes": [{"kind": "prune", "granularity": "neuron", "amount": 0.5, "lstsq": "oneshot"}]}).passes[0].lstsq == "oneshot"
    with pytest.raises(SpecError, match="passes.0.lstsq"):
        Spec.parse({"passes": [{"kind": "prune", "granularity": "neuron", "amount": 0.5, "lstsq": "twice"}]})

import json

import pytest

from rewrite import Spec, SpecError
from rewrite.spec import CleanupSpec, PruneSpec


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

"""Fuzzing the spec: whatever a user writes, only a one-line SpecError (or a valid Spec) comes out."""
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from rewrite import Spec, SpecError  # noqa: E402
from rewrite.spec import PASS_KINDS  # noqa: E402

# the spec's own vocabulary, so the fuzzer reaches deep fields instead of failing at the top
KEYS = ["passes", "calibration", "verify", "export", "budget", "kind", "granularity", "amount", "budget", "importance",
        "scope", "exclude", "allocation", "round_to", "compensate", "n", "m", "weights", "bits", "average", "group_size",
        "symmetric", "method", "allocate", "order", "embeddings", "activations", "mode", "smoothquant", "layers",
        "search", "beam_width", "protect", "keep", "after", "merge", "restore", "samples", "batch_size", "holdout",
        "onnx", "opset", "dynamic", "external_data", "latency", "size_mb", "flops", "params", "max_cosine_drop"]
WORDS = list(PASS_KINDS) + ["head", "neuron", "channel", "n:m", "wanda", "obs", "gptq", "awq", "beam", "auto",
                            "cls_attention", "fidelity_drop", "dynamic", "layerwise", "encoder.layer.*"]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10, 300), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(WORDS), st.text(max_size=8),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=6)), inner, max_size=5),
    ),
    max_leaves=20,
)
pass_dicts = st.fixed_dictionaries({"kind": st.sampled_from(WORDS)},
                                   optional={k: values for k in KEYS[6:40]})
specs = st.one_of(
    values,
    st.fixed_dictionaries({}, optional={"passes": st.lists(pass_dicts, max_size=3), "calibration": values,
                                        "verify": values, "export": values, "budget": values}),
)


def _check(run):
    try:
        spec = run()
    except SpecError as exc:
        msg = str(exc)
        assert msg and "\n" not in msg, repr(msg)
        assert "pydantic" not in msg.lower(), msg
        return
    assert isinstance(spec, Spec)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs)
def test_any_spec_value_gives_a_spec_or_one_line_spec_error(data):
    _check(lambda: Spec.parse(data))


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_any_yaml_text_gives_a_spec_or_one_line_spec_error(text):
    _check(lambda: Spec.from_yaml(text if "\n" in text else text + "\n"))


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=60))
def test_any_json_file_gives_a_spec_or_one_line_spec_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("j") / "spec.json"
    path.write_text(text, encoding="utf-8")
    _check(lambda: Spec.load(path))

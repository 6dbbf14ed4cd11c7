import pytest
import torch
from torch import nn

import rewrite
from rewrite import CaptureError


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Gate()

    def forward(self, x):
        return self.inner(x) + 1


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: not capturable
            return x * 2
        return x


def test_untraceable_model_names_module_line_and_fix():
    with pytest.raises(CaptureError) as info:
        rewrite.compile(Branchy(), None, example_inputs=(torch.randn(2, 4),))
    msg = str(info.value)
    assert "module 'inner' (Gate)" in msg, msg
    assert "test_capture_errors.py" in msg and "if x.sum() > 0" in msg, msg
    assert "fix:" in msg and "torch.where" in msg, msg


def test_missing_calibration_is_explained():
    from rewrite.calibration import CalibrationData
    from rewrite.inputs import Inputs

    data = CalibrationData.from_user(None, Inputs((torch.ones(1),), {}))
    with pytest.raises(rewrite.CalibrationError, match="needs calibration data"):
        data.require("the prune pass")


def test_calibration_structure_mismatch():
    from rewrite.calibration import CalibrationData
    from rewrite.inputs import Inputs

    with pytest.raises(rewrite.CalibrationError, match="does not match example_inputs"):
        CalibrationData.from_user([{"input_ids": torch.ones(1)}], Inputs((torch.ones(1),), {}))


def _ids(b, s, dtype=torch.long):
    return torch.ones(b, s, dtype=dtype)


@pytest.mark.parametrize("batch, words", [
    ({"input_ids": _ids(4, 7).unsqueeze(-1), "attention_mask": _ids(4, 7)},
     ["batch 1", "'input_ids'", "[4, 7, 1]", "expected [batch_size, sequence_length] torch.int64"]),
    ({"input_ids": _ids(4, 7, torch.float32), "attention_mask": _ids(4, 7)},
     ["batch 1", "'input_ids'", "torch.float32", "expected [batch_size, sequence_length] torch.int64", ".to(torch.int64)"]),
    ({"input_ids": [1, 2, 3], "attention_mask": _ids(4, 7)}, ["batch 1", "nested differently", "[batch_size, sequence_length]"]),
    ({"input_ids": _ids(4, 7)}, ["batch 1", "keywords ['input_ids']", "['attention_mask', 'input_ids']"]),
    ("some text", ["batch 1", "cannot use a str"]),
])
def test_wrong_calibration_batch_names_the_batch_and_the_expected_shape(batch, words):
    from rewrite.calibration import CalibrationData
    from rewrite.inputs import Inputs

    example = Inputs((), {"input_ids": _ids(2, 12), "attention_mask": _ids(2, 12)})
    good = {"input_ids": _ids(3, 5), "attention_mask": _ids(3, 5)}  # other batch and sequence sizes are fine
    with pytest.raises(rewrite.CalibrationError) as info:
        CalibrationData.from_user([good, batch], example)
    msg = str(info.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg


def test_wrong_image_size_in_calibration_is_refused_before_capture():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    model(torch.randn(1, 3, 8, 8))
    with pytest.raises(rewrite.CalibrationError, match=r"batch 0 .* shape \[2, 3, 9, 9\].*expected \[batch_size, 3, 8, 8\]"):
        rewrite.compile(model, None, example_inputs=(torch.randn(2, 3, 8, 8),), calibration=[(torch.randn(2, 3, 9, 9),)])

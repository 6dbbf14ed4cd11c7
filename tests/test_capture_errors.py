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

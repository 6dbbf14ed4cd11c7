import pytest
import torch

import rewrite
from rewrite import PassError, zoo
from rewrite.pass_base import Property
from rewrite.passmanager import Pass, PassResult, check_order


class _Quantizes(Pass):
    kind = "q"
    establishes = frozenset({Property.QUANTIZED})


class _Prunes(Pass):
    kind = "p"
    requires_absent = {Property.QUANTIZED: "a quantized weight cannot be sliced into structured groups"}


class _Reads(Pass):
    kind = "r"
    reads = frozenset({"importance"})


class _Writes(Pass):
    kind = "w"
    writes = frozenset({"importance"})


def test_impossible_order_is_rejected_with_reason():
    check_order([_Prunes(None), _Quantizes(None)])
    with pytest.raises(PassError, match=r"passes\[1\] \(p\) cannot run after passes\[0\] \(q\): a quantized weight"):
        check_order([_Quantizes(None), _Prunes(None)])


def test_missing_annotation_is_rejected():
    check_order([_Writes(None), _Reads(None)])
    with pytest.raises(PassError, match="reads \\['importance'\\]"):
        check_order([_Reads(None), _Writes(None)])


def test_report_has_a_row_per_pass_and_renders():
    z = zoo.load("rescat_cnn")
    out = rewrite.compile(z.model, {"passes": [{"kind": "cleanup"}, {"kind": "cleanup"}]},
                          example_inputs=z.example, calibration=z.calibration)
    r = out.report
    assert [p.name for p in r.passes] == ["0:cleanup", "1:cleanup"]
    assert r.after.params < r.before.params and r.after.flops == r.before.flops > 0  # BN folded away
    assert r.passes[0].fidelity.batches >= 1
    md, table, js = r.to_markdown(), r.to_table(), r.to_json()
    assert "| 0:cleanup |" in md and "total (after/before)" in table and '"passes"' in js
    assert "batch norms folded" in md

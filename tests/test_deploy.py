"""The CLI default: specs/minilm-deploy.yaml composes every rewrite on the real model, exported and verified."""
import json

import pytest

from rewrite.cli import main


@pytest.mark.slow
def test_cli_default_compiles_the_deploy_spec(minilm, tmp_path):
    assert main(["compile", "--out", str(tmp_path), "--eval-pairs", "200"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    kinds = [p["kind"] for p in report["passes"]]
    assert kinds == ["cleanup", "skip", "prune", "prune", "quantize"]
    assert len(report["passes"][1]["details"]["removed"]) == 1  # one of six blocks skipped
    assert report["after"]["flops"] < 0.7 * report["before"]["flops"]  # 5/6 blocks, 3/4 of their width: ~0.63
    export = report["exports"][0]
    assert export["verified"] and export["bytes"] < 10e6, export  # fp32 is 91 MB
    assert any("int8 activations" in n for n in export["notes"])  # W4A8: the export says how it was checked
    assert (tmp_path / "model.onnx").stat().st_size == export["bytes"]
    metrics = report["metrics"]
    assert metrics["stsb_dev_spearman_rewritten"] > metrics["stsb_dev_spearman_original"] - 5.0
    assert (tmp_path / "report.md").read_text().startswith("# rewrite report")

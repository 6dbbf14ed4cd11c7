import json


from rewrite.cli import main


def test_schema_command(capsys):
    assert main(["schema"]) == 0
    assert '"passes"' in capsys.readouterr().out


def test_bad_spec_prints_one_message(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("passes:\n  - kind: prune\n    granularity: heads\n    amount: 0.3\n")
    assert main(["compile", str(bad), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: invalid spec: passes.0.granularity") and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_model_factory(tmp_path, capsys):
    assert main(["compile", "--model", "rewrite.zoo_factories:mlp", "--out", str(tmp_path)]) == 0
    assert "no spec given: using cleanup.yaml" in capsys.readouterr().err
    assert (tmp_path / "model.onnx").exists() and (tmp_path / "report.md").exists()
    assert json.loads((tmp_path / "report.json").read_text())["exports"][0]["verified"] is True

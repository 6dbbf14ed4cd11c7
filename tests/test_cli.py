import json

import pytest
import torch

from rewrite.cli import main


def test_schema_command(capsys):
    assert main(["schema"]) == 0
    assert '"passes"' in capsys.readouterr().out


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("rewrite ")


def test_bad_spec_prints_one_message(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("passes:\n  - kind: prune\n    granularity: heads\n    amount: 0.3\n")
    assert main(["compile", str(bad), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: invalid spec: passes.0.granularity") and "Traceback" not in err
    assert err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_wrong_type_is_one_line_and_yaml_errors_name_the_file(tmp_path, capsys):
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("passes:\n  - kind: skip\n    layers: two\n")
    assert main(["compile", str(wrong), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err == "error: invalid spec: passes.0.layers: should be a valid integer, a valid number or a valid list (got 'two')\n"
    broken = tmp_path / "broken.yaml"
    broken.write_text("passes: [\n")
    assert main(["compile", str(broken), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: spec file {broken} is not valid YAML at line") and err.count("\n") == 1


def test_unwritable_out_fails_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["compile", "--model", "rewrite.zoo_factories:mlp", "--out", str(blocker / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write to --out") and "is a file" in err and err.count("\n") == 1
    assert "capture" not in err  # nothing was compiled


def test_model_factory(tmp_path, capsys):
    assert main(["compile", "--model", "rewrite.zoo_factories:mlp", "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "no spec given: using cleanup.yaml" in err
    for stage in ("capture MLP", "pass 1/1: cleanup", "export ONNX", "verify in onnxruntime", "measure onnxruntime latency"):
        assert f"{stage}" in err, (stage, err)
    assert "passed." in err
    assert (tmp_path / "model.onnx").exists() and (tmp_path / "report.md").exists()
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["exports"][0]["verified"] is True
    assert report["latency"]["before_ms"] > 0 and report["latency"]["shape"] == "x 4x32"
    assert "latency ms" in (tmp_path / "report.md").read_text()


def test_quiet_prints_only_the_report(tmp_path, capsys):
    assert main(["compile", "-q", "--model", "rewrite.zoo_factories:mlp", "--out", str(tmp_path), "--no-latency"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out.startswith("rewrite report: MLP")


def test_calibration_file_of_batches(tmp_path, capsys):
    good = tmp_path / "calib.pt"
    torch.save([(torch.randn(4, 32),) for _ in range(3)], good)
    assert main(["compile", "-q", "--model", "rewrite.zoo_factories:mlp", "--calibration", str(good),
                 "--out", str(tmp_path / "o"), "--no-latency"]) == 0
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["calibration"].startswith("8 samples in 2 batches; 4 held back")
    bad = tmp_path / "bad.pt"
    torch.save([(torch.randn(4, 32),), (torch.randn(4, 31),)], bad)
    assert main(["compile", "-q", "--model", "rewrite.zoo_factories:mlp", "--calibration", str(bad), "--out", str(tmp_path / "o2")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: calibration batch 1 does not match example_inputs") and "[batch_size, 32]" in err
    assert err.count("\n") == 1 and not (tmp_path / "o2").exists()


def test_text_calibration_needs_a_tokenizer(tmp_path, capsys):
    text = tmp_path / "calib.txt"
    text.write_text("a sentence\nanother one\n")
    assert main(["compile", "-q", "--model", "rewrite.zoo_factories:mlp", "--calibration", str(text), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "is text, but this model has no tokenizer" in err and err.count("\n") == 1


def test_text_and_jsonl_calibration_are_tokenized_like_the_example(tmp_path):
    from rewrite.calibration_files import load_calibration_file
    from rewrite.inputs import Inputs

    def tokenizer(texts, **kwargs):
        n = max(len(t.split()) for t in texts)
        ids = torch.tensor([[len(w) for w in t.split()] + [0] * (n - len(t.split())) for t in texts])
        return {"input_ids": ids, "attention_mask": (ids > 0).long(), "token_type_ids": torch.zeros_like(ids)}

    example = Inputs((), {"input_ids": torch.ones(2, 5, dtype=torch.long), "attention_mask": torch.ones(2, 5, dtype=torch.long)})
    lines = tmp_path / "c.jsonl"
    lines.write_text('{"text": "one two three"}\n"four five"\n\n{"text": "six"}\n')
    batches = load_calibration_file(lines, example, tokenizer=tokenizer, batch_size=2)
    assert [sorted(b.kwargs) for b in batches] == [["attention_mask", "input_ids"]] * 2
    assert batches[0].kwargs["input_ids"].tolist() == [[3, 3, 5], [4, 4, 0]]
    lines.write_text('{"label": 1}\n')
    with pytest.raises(Exception, match="line 1: expected an object with a string 'text' field"):
        load_calibration_file(lines, example, tokenizer=tokenizer)


def test_interrupted_compile_leaves_no_files(tmp_path, capsys, monkeypatch):
    from rewrite.backends import onnx as onnx_backend

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_backend, "verify_onnx", interrupt)
    out = tmp_path / "out"
    assert main(["compile", "-q", "--model", "rewrite.zoo_factories:mlp", "--out", str(out)]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("the user's file")
    assert main(["compile", "-q", "--model", "rewrite.zoo_factories:mlp", "--out", str(out)]) == 130
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_unexpected_errors_are_one_line_unless_verbose(tmp_path, capsys, monkeypatch):
    (tmp_path / "badfactory.py").write_text("def build():\n    raise ValueError('boom\\nsecond line')\n")
    monkeypatch.chdir(tmp_path)
    assert main(["compile", "-q", "--model", "badfactory:build", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err == "error: ValueError: boom second line (run with -v for the traceback)\n"
    assert main(["compile", "-v", "--model", "badfactory:build", "--out", str(tmp_path / "o")]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_library_calls_print_nothing_unless_asked(capfd, tmp_path):
    import rewrite
    from rewrite import zoo

    z = zoo.load("mlp")
    spec = {"passes": [{"kind": "prune", "granularity": "neuron", "amount": 0.9}]}  # also logs a fidelity warning
    compiled = rewrite.compile(z.model, spec, example_inputs=z.example, calibration=z.calibration)
    compiled.export(tmp_path / "m.onnx")
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""
    assert compiled.report.warnings  # the warning is in the report, not on the console
    rewrite.compile(z.model, spec, example_inputs=z.example, calibration=z.calibration, progress=True)
    err = capfd.readouterr().err
    assert "capture MLP with torch.export: done in" in err and "pass 1/1: prune (granularity=neuron): done in" in err
    assert "prune: refit layer by layer" in err  # the bar of the pass's calibration sweep (default importance obs)


def test_tvm_build_without_a_saved_form_writes_no_library_and_says_so(tmp_path, capsys, monkeypatch):
    """A TVM build with no save() (CUDA launched from torch) must not claim a model.tvm.so."""
    from rewrite.compiler import Compiled

    class Unsaveable:
        verify_note = "verified"

    monkeypatch.setattr(Compiled, "build", lambda self, *a, **k: Unsaveable())
    assert main(["compile", "--model", "rewrite.zoo_factories:mlp", "--out", str(tmp_path), "--backend", "tvm",
                 "--no-latency"]) == 0
    err = capsys.readouterr().err
    assert not (tmp_path / "model.tvm.so").exists()
    assert "model.tvm.so" not in err and "no library written (Unsaveable has no saved form)" in err

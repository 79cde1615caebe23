"""The ``actsteer`` command line (fit / generate / inspect) on a tiny Llama saved to disk."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import actsteer
from actsteer.hf_integration.cli import concept_score, main, read_texts

SOURCE = [f"the cat sat on mat number {i} today" for i in range(10)]
TARGET = [f"STORMY SEAS AND WAVES {i}!!" for i in range(10)]


@pytest.fixture
def saved_model(tiny_lm_factory, tmp_path):
    model, tok = tiny_lm_factory("llama")
    path = tmp_path / "tiny-llama"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture
def text_files(tmp_path):
    src = tmp_path / "source.txt"
    src.write_text("\n".join(SOURCE) + "\n\n")  # a trailing blank line is ignored
    tgt = tmp_path / "target.jsonl"
    tgt.write_text("\n".join(json.dumps({"text": t}) for t in TARGET))
    return src, tgt


def test_read_texts_txt_and_jsonl(text_files, tmp_path):
    src, tgt = text_files
    assert read_texts(src) == SOURCE
    assert read_texts(tgt) == TARGET
    plain = tmp_path / "plain.jsonl"
    plain.write_text('"one"\n"two"\n')
    assert read_texts(plain) == ["one", "two"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": 3}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1 must be a JSON string"):
        read_texts(bad)


def test_cli_fit_inspect_generate(saved_model, text_files, tmp_path, capsys):
    src, tgt = text_files
    out = tmp_path / "concept.safetensors"
    args = ["fit", "--model", str(saved_model), "--source", str(src), "--target", str(tgt), "-o", str(out),
            "--modules", "all-norms", "--support", "all"]
    assert main(args) == 0
    assert "Wrote" in capsys.readouterr().out
    t = actsteer.Transport.load(out)
    assert len(t) == 5 and t.n_source == 10 and t.support == "all"

    # refuses to overwrite without --overwrite (and says so in the command's terms)
    assert main(args) == 2
    assert "exists; pass --overwrite to replace it" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0
    capsys.readouterr()

    assert main(["inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "method: linear-act" in shown and "model.layers.0.input_layernorm" in shown and "sites: 5" in shown

    assert main(["generate", "--model", str(saved_model), "--steer", str(out), "--sweep", "0,1",
                 "--prompt", "hello", "--prompt", "bye", "--max-new-tokens", "4"]) == 0
    shown = capsys.readouterr().out
    assert shown.count("strength     0:") == 2 and shown.count("strength     1:") == 2


def test_cli_reports_errors_without_traceback(saved_model, text_files, tmp_path, capsys):
    src, _ = text_files
    one = tmp_path / "one.txt"
    one.write_text("just one line\n")
    code = main(["fit", "--model", str(saved_model), "--source", str(src), "--target", str(one), "-o", str(tmp_path / "x")])
    assert code == 2
    assert "at least 2 texts" in capsys.readouterr().err
    assert main(["inspect", str(src)]) == 2
    assert "not a readable safetensors file" in capsys.readouterr().err


def test_cli_entry_point_help():
    # the console script's module runs as `python -m actsteer`
    res = subprocess.run([sys.executable, "-m", "actsteer", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "demo" in res.stdout and "inspect" in res.stdout


def test_concept_score_counts_keywords():
    assert concept_score("The waves hit the beach near the harbor.") == 3
    assert concept_score("We had pasta for dinner.") == 0

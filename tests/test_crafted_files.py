"""Crafted transport files (issue 21, items 2 and 6): metadata that is valid JSON but hostile (nested 100k deep, a
5001-digit integer, a 45 MB string), text that would drive a terminal, a flipped bit in the tensor data, and format
versions that are not numbers. Each is refused with one short line naming the file, or shown escaped.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from support.comfy import comfy_dirs, pack  # noqa: F401  (fixtures)

import actsteer
from actsteer.core import printable
from actsteer.core.io import FORMAT_VERSION
from actsteer.core.io import FORMAT
from actsteer.hf_integration.cli import main

ESC = "\x1b"
CSI_C1 = "\x9b"  # the 8-bit CSI, which some terminals honour too
HOSTILE = f"{ESC}]0;pwned{chr(7)}{ESC}[2J{ESC}[1A{CSI_C1}2K\u202egnp.exe"  # title, erase screen, line up, bidi


def _tensors(sites: int = 1, d: int = 4) -> dict[str, torch.Tensor]:
    out = {}
    for i in range(sites):
        out |= {f"maps.{i}.omega": torch.ones(d), f"maps.{i}.beta": torch.linspace(-1, 1, d),
                f"maps.{i}.lo": torch.full((d,), -float("inf")), f"maps.{i}.hi": torch.full((d,), float("inf")),
                f"maps.{i}.target_lo": torch.full((d,), -float("inf")),
                f"maps.{i}.target_hi": torch.full((d,), float("inf")), f"maps.{i}.dead": torch.zeros(d, dtype=torch.uint8)}
    return out


def write_raw(path: Path, transport_json: str, *, version: str = "1", actsteer_version: str = "0.1.0",
              tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """A file whose header holds ``transport_json`` verbatim (as a hostile writer could make it)."""
    header = {"format": FORMAT, "format_version": version, "actsteer_version": actsteer_version,
              "transport": transport_json}
    save_file(_tensors() if tensors is None else tensors, str(path), metadata=header)
    return path


def _info(**fields) -> dict:
    return {"method": "linear-act", "pooling": "mean", "support": "observed", "mode": "sequential", "sites": ["a"],
            "n_source": 8, "n_target": 8, "model": {}, "description": "", "extra": {}, **fields}


def _with(**fields) -> str:
    return json.dumps(_info(**fields))


DEEP = 100_000
CRAFTED = [
    ("nested-100k-deep", _with()[:-1] + ', "deep": ' + "[" * DEEP + "]" * DEEP + "}", r"nested more than \d+ levels deep"),
    ("nested-in-model", _with(model={"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": {"i": {"j": [[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]}}}}}}}}}}),
     r"nested more than \d+ levels deep"),
    ("5001-digit-integer", _with()[:-1] + ', "n_source": ' + "9" * 5001 + "}", r"a number of 5001 digits"),
    ("5001-digit-in-extra", _with()[:-1].replace('"extra": {}', '"extra": {"seed": ' + "1" * 5001 + "}") + "}",
     r"a number of 5001 digits"),
    ("huge-model-class", _with(model={"class": "C" * 3_000_000}), r"header field 'model' holds a text of 3000000 characters"),
    ("huge-extra-key", _with(extra={"k" * 100_000: 1}), r"header field 'extra' holds a text of 100000 characters"),
    ("control-chars-in-method", _with(method="linear" + HOSTILE), r"'method' contains control characters"),
    ("control-chars-in-pooling", _with(pooling="mean" + ESC), r"'pooling' contains control characters"),
]


@pytest.mark.parametrize(("case", "text", "match"), CRAFTED, ids=[c[0] for c in CRAFTED])
def test_crafted_metadata_is_refused_in_one_short_line_naming_the_file(tmp_path, case, text, match):
    path = write_raw(tmp_path / f"{case}.safetensors", text)
    with pytest.raises(ValueError, match=match) as info:
        actsteer.Transport.load(path)
    message = str(info.value)
    assert message.startswith(str(path)) and len(message) < 600 and "\n" not in message, message[:1000]
    assert ESC not in message and CSI_C1 not in message


@pytest.mark.parametrize("version", ["1.0", "", "²", "0", "-1", " 1", "1\n"])
def test_crafted_format_version_that_is_not_a_number_is_malformed_not_upgrade(tmp_path, version):
    path = write_raw(tmp_path / "v.safetensors", _with(), version=version, actsteer_version=HOSTILE)
    with pytest.raises(ValueError, match=r"malformed format version") as info:
        actsteer.Transport.load(path)
    assert "upgrade" not in str(info.value) and ESC not in str(info.value)


def test_crafted_newer_format_version_still_says_upgrade(tmp_path):
    newer = str(FORMAT_VERSION + 1)
    path = write_raw(tmp_path / "vnew.safetensors", _with(), version=newer, actsteer_version="9.9" + HOSTILE)
    with pytest.raises(ValueError, match=rf"version '{newer}' \(written by actsteer 9\.9\\x1b.*upgrade actsteer") as info:
        actsteer.Transport.load(path)
    assert ESC not in str(info.value)


def _saved(tmp_path: Path, **metadata) -> Path:
    t = actsteer.Transport({"a": actsteer.UnitMap(torch.linspace(0.5, 2, 8), torch.linspace(-1, 1, 8)),
                            "b": actsteer.UnitMap(torch.ones(8), torch.zeros(8))}, **metadata)
    return t.save(tmp_path / "t.safetensors")


def test_crafted_a_flipped_bit_in_the_tensor_data_is_detected(tmp_path):
    path = _saved(tmp_path)
    data = bytearray(path.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    data[8 + header_len + 5] ^= 0x10  # one bit of the first tensor's bytes
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"checksum.*the tensor data was changed after it was saved") as info:
        actsteer.Transport.load(path)
    assert str(info.value).startswith(str(path))


def test_crafted_files_without_a_checksum_still_load(tmp_path):
    path = write_raw(tmp_path / "old.safetensors", _with())  # as written before checksums (and by hand)
    assert actsteer.Transport.load(path).sites == ["a"]


def test_crafted_a_malformed_checksum_is_refused(tmp_path):
    path = _saved(tmp_path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(path), metadata={**meta, "tensors_sha256": "zz" + HOSTILE})
    with pytest.raises(ValueError, match=r"malformed checksum") as info:
        actsteer.Transport.load(path)
    assert ESC not in str(info.value)


def test_crafted_save_refuses_what_load_would_refuse(tmp_path):
    deep: list = []
    for _ in range(40):
        deep = [deep]
    for metadata, match in [({"extra": {"deep": deep}}, "nested more than"), ({"model": {"class": "C" * 100_000}}, "text of 100000"),
                            ({"extra": {"n": 10**40}}, "a number of 41 digits")]:
        with pytest.raises(ValueError, match=match):
            _saved(tmp_path, **metadata)
    assert not (tmp_path / "t.safetensors").exists()


def test_crafted_repr_of_a_transport_with_a_huge_model_name_stays_short():
    t = actsteer.Transport({"a": actsteer.UnitMap(torch.ones(2), torch.zeros(2))}, model={"class": "C" * 1_000_000})
    assert len(repr(t)) < 600


# Terminals --------------------------------------------------------------------------------------------------
def test_printable_escapes_control_and_format_characters():
    assert printable("model.layers.0") == "model.layers.0"
    shown = printable("a" + HOSTILE + "\n\tb", limit=1000)
    assert shown.isprintable() and "\\x1b" in shown and "\\u202e" in shown and "\\x9b" in shown and "\\n" in shown
    assert printable("x" * 10_000_000, limit=20) == "x" * 19 + "… (10000000 characters)"
    assert printable("é ü 漢字 ok") == "é ü 漢字 ok"


def test_crafted_inspect_never_prints_terminal_controls(tmp_path, capsys):
    info = _info(description="line one\n" + HOSTILE, model={"class": HOSTILE, "name_or_path": "org/m" + HOSTILE},
                 extra={HOSTILE: [HOSTILE]})
    path = write_raw(tmp_path / "evil.safetensors", json.dumps(info), actsteer_version="0.1" + HOSTILE)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert all(ch.isprintable() or ch in "\n" for ch in out), repr(out)
    assert re.search(r"written by actsteer 0\.1\\x1b\]0;pwned", out)
    assert "\\u202egnp.exe" in out and "line one" in out
    t = actsteer.Transport.load(path)
    assert actsteer.core.fitted_on(t).isprintable() and "\\x1b" in actsteer.core.fitted_on(t)


def test_crafted_comfyui_load_gives_one_short_line(pack, comfy_dirs):
    import nodes

    folder = comfy_dirs

    load = nodes.NODE_CLASS_MAPPINGS["ActSteerLoad"]
    for case, text, _ in CRAFTED[:5]:
        write_raw(folder / f"{case}.safetensors", text)
        with pytest.raises(ValueError, match=f"Cannot read transport file '{case}.safetensors'") as info:
            load.execute(transport_name=f"{case}.safetensors")
        assert len(str(info.value)) < 600 and "\n" not in str(info.value)
    evil = folder / "evil.safetensors"
    write_raw(evil, json.dumps(_info(model={"class": HOSTILE * 1000})))
    summary = load.execute(transport_name="evil.safetensors").ui.as_dict()["text"][0]
    assert summary.isprintable() and len(summary) < 400 and ESC not in summary

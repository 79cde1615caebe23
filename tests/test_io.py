"""The transport file format (`actsteer.core.io`): bit-exact round trips and clear errors; never unpickles."""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from actsteer import Transport, UnitMap
from actsteer.core.io import FORMAT_VERSION, read_header

INF = float("inf")
SITES = ["model.layers.10.mlp", "transformer_blocks.3:1", "a", "single_transformer_blocks.0.norm:0"]


def _unit_map(d: int, g: torch.Generator) -> UnitMap:
    lo = torch.randn(d, generator=g) - 2.0
    lo[0] = -INF  # infinite bounds must survive the trip
    hi = torch.randn(d, generator=g) + 2.0
    hi[-1] = INF
    return UnitMap(
        omega=torch.rand(d, generator=g) * 3.0,
        beta=torch.randn(d, generator=g) * 1e-3,
        lo=lo,
        hi=hi,
        target_lo=lo * 0.5,
        target_hi=hi * 2.0,
        dead=torch.rand(d, generator=g) > 0.5,
    )


@pytest.fixture
def transport() -> Transport:
    g = torch.Generator().manual_seed(0)
    maps = {site: _unit_map(d, g) for site, d in zip(SITES, (7, 5, 1, 3))}
    return Transport(
        maps, method="linear-act", pooling="mean", support=[0.01, 0.99], mode="sequential", n_source=24,
        n_target=31, model={"class": "LlamaForCausalLM", "name_or_path": "tiny/llama", "hidden_size": 64},
        description="tests: Ünïcode ✓", extra={"fit": {"forward_calls": 1, "batches": [1, 2]}},
    )


def _rewrite(src: Path, dst: Path, *, drop: str | None = None, **metadata: str) -> Path:
    """Copy a saved transport with some header fields replaced and optionally one tensor dropped."""
    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != drop}
    save_file(tensors, str(dst), metadata={**meta, **metadata})
    return dst


class _Payload:
    """Unpickling this creates the directory `marker`: proof that code in the file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


# Round trip ---------------------------------------------------------------------------------------


def test_io_round_trip_is_bit_exact(transport, tmp_path):
    path = transport.save(tmp_path / "t.safetensors")
    loaded = Transport.load(path)
    assert loaded == transport
    assert loaded.sites == SITES
    assert loaded.metadata() == transport.metadata()
    for site in SITES:
        for field, value in transport[site].to_tensors().items():
            got = getattr(loaded[site], field)
            assert got.dtype == value.dtype and torch.equal(got, value), (site, field)


def test_io_header_records_format(transport, tmp_path):
    header = read_header(transport.save(tmp_path / "t"))
    assert header["format"] == "actsteer.transport"
    # affine transports are written as version 1, so that releases reading only version 1 still load them;
    # version 2 (FORMAT_VERSION) is used for files that hold quantile maps (tests/test_quantile_io.py)
    assert header["format_version"] == "1" and FORMAT_VERSION == 2
    assert json.loads(header["transport"])["sites"] == SITES


@pytest.mark.parametrize(
    ("name", "written"), [("t", "t.safetensors"), ("t.bin", "t.bin.safetensors"), ("t.safetensors", "t.safetensors")]
)
def test_io_save_appends_safetensors_suffix(transport, tmp_path, name, written):
    path = transport.save(tmp_path / name)
    assert path == tmp_path / written and path.is_file()
    assert Transport.load(path) == transport


def test_io_save_creates_parent_folders_and_leaves_no_temp_files(transport, tmp_path):
    path = transport.save(tmp_path / "a" / "b" / "t")
    assert sorted(p.name for p in path.parent.iterdir()) == ["t.safetensors"]


def test_io_save_refuses_to_overwrite(transport, tmp_path):
    path = transport.save(tmp_path / "t")
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
        transport.replace(description="other").save(path)
    assert path.read_bytes() == before
    assert Transport.load(path) == transport
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.safetensors"]


def test_io_save_overwrite_replaces(transport, tmp_path):
    path = transport.save(tmp_path / "t")
    smaller = transport.select(["a"]).replace(method="caa")
    assert smaller.save(path, overwrite=True) == path
    assert Transport.load(path) == smaller


def test_io_round_trip_of_unit_maps_with_default_support(tmp_path):
    t = Transport({"s": UnitMap(omega=torch.ones(3), beta=torch.zeros(3))})
    assert Transport.load(t.save(tmp_path / "t")) == t


# Errors -------------------------------------------------------------------------------------------


def test_io_load_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="No transport file at .*nothing.safetensors"):
        Transport.load(tmp_path / "nothing.safetensors")


@pytest.mark.parametrize("content", [b"method: linear-act\nsites: [a]\n", b"", b"\x00" * 3])
def test_io_load_non_safetensors_file_raises(tmp_path, content):
    path = tmp_path / "t.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="is not a readable safetensors file .*truncated or corrupt"):
        Transport.load(path)


@pytest.mark.parametrize("keep", [0.5, 0.98])
def test_io_load_truncated_file_raises(transport, tmp_path, keep):
    data = transport.save(tmp_path / "full").read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError, match="cut.safetensors is not a readable safetensors file"):
        Transport.load(path)


def test_io_load_foreign_safetensors_raises(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"weight": torch.ones(2, 2)}, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="is a safetensors file but not an actsteer transport"):
        Transport.load(path)


@pytest.mark.parametrize("version", [str(FORMAT_VERSION + 1), "1.5", ""])
def test_io_load_unknown_format_version_raises(transport, tmp_path, version):
    path = _rewrite(transport.save(tmp_path / "t"), tmp_path / "future.safetensors", format_version=version)
    if version.isdigit():  # a newer version: upgrade; anything else is a damaged file (tests/test_crafted_files.py)
        expected = re.escape(f"format version '{version}'") + f".*reads versions up to {FORMAT_VERSION}: upgrade actsteer"
    else:
        expected = re.escape(f"malformed format version '{version}'") + ".*the file is damaged"
    with pytest.raises(ValueError, match=expected):
        Transport.load(path)


def test_io_load_missing_tensor_raises(transport, tmp_path):
    path = _rewrite(transport.save(tmp_path / "t"), tmp_path / "partial.safetensors", drop="maps.1.beta")
    with pytest.raises(ValueError, match=r"tensors \['beta'\] of site 'transformer_blocks.3:1' are missing"):
        Transport.load(path)


@pytest.mark.parametrize("text", ['{"method": "linear-act", "sites": [', '{"method": "linear-act"}', "[1, 2]", "null"])
def test_io_load_corrupt_metadata_raises(transport, tmp_path, text):
    path = _rewrite(transport.save(tmp_path / "t"), tmp_path / "corrupt.safetensors", transport=text)
    with pytest.raises(ValueError, match="the transport metadata is corrupt"):
        Transport.load(path)


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_io_load_pickle_is_rejected_without_unpickling(tmp_path, writer):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.safetensors"
    with open(path, "wb") as f:
        torch.save(_Payload(marker), f) if writer == "torch.save" else pickle.dump(_Payload(marker), f)

    with pytest.raises(ValueError, match="not a readable safetensors file"):
        Transport.load(path)
    assert not marker.exists()

    # positive control: the payload is live, so the check above proves it was never unpickled
    if writer == "torch.save":  # (torch.load hands a '.safetensors' name to safetensors: copy it first)
        copy = tmp_path / "evil.pt"
        copy.write_bytes(path.read_bytes())
        torch.load(copy, weights_only=False)
    else:
        with open(path, "rb") as f:
            pickle.load(f)
    assert marker.is_dir()


def test_io_load_unknown_metadata_key_is_kept_in_extra(transport, tmp_path):
    # a key a later actsteer adds without bumping format_version must not make the file unreadable
    info = {**transport.metadata(), "added_later": 1}
    path = _rewrite(transport.save(tmp_path / "t"), tmp_path / "newer.safetensors", transport=json.dumps(info))
    loaded = Transport.load(path)
    assert loaded.extra["unknown_metadata"] == {"added_later": 1}
    assert loaded.sites == transport.sites

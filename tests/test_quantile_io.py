"""The file format with quantile maps (format version 2): round trips, old files, and damaged files refused."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import actsteer
from actsteer.core import QuantileMap, read_header
from actsteer.core.io import FIELDS


@pytest.fixture
def mixed() -> actsteer.Transport:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(100, 4, generator=g), torch.randn(100, 4, generator=g).exp()
    return actsteer.Transport({"s.0": actsteer.estimate(a, b, method="quantile", knots=8),
                               "s.1": actsteer.estimate(a, b)}, method="quantile", description="mixed kinds")


def _v1_tensors(d: int = 3) -> dict[str, torch.Tensor]:
    inf = torch.full((d,), float("inf"))
    return {"maps.0.omega": torch.full((d,), 2.0), "maps.0.beta": torch.ones(d), "maps.0.lo": -inf,
            "maps.0.hi": inf.clone(), "maps.0.target_lo": -inf.clone(), "maps.0.target_hi": inf.clone(),
            "maps.0.dead": torch.zeros(d, dtype=torch.uint8)}


def _header(version: str, sites: list[str]) -> dict[str, str]:
    return {"format": "actsteer.transport", "format_version": version, "actsteer_version": "0.0.1",
            "transport": json.dumps({"method": "linear-act", "sites": sites})}


def test_quantile_transport_round_trip_is_version_2(mixed, tmp_path):
    path = mixed.save(tmp_path / "q")
    assert read_header(path)["format_version"] == "2"
    loaded = actsteer.Transport.load(path)
    assert loaded == mixed
    assert isinstance(loaded["s.0"], QuantileMap) and type(loaded["s.1"]) is actsteer.UnitMap
    x = torch.randn(2, 5, 4)
    assert torch.equal(loaded["s.0"](x), mixed["s.0"](x))


def test_transport_equality_tells_a_quantile_map_from_its_affine_summary(mixed):
    summary = mixed.replace({"s.0": mixed["s.0"].to_affine(), "s.1": mixed["s.1"]})
    assert summary != mixed


def test_old_version_1_file_still_loads(tmp_path):
    path = tmp_path / "old.safetensors"
    save_file(_v1_tensors(), str(path), metadata=_header("1", ["layer"]))
    t = actsteer.Transport.load(path)
    assert type(t["layer"]) is actsteer.UnitMap and t["layer"].omega.tolist() == [2.0, 2.0, 2.0]


def test_affine_transports_are_still_written_as_version_1(mixed, tmp_path):
    affine = mixed.select(["s.1"])
    assert read_header(affine.save(tmp_path / "a"))["format_version"] == "1"


@pytest.mark.parametrize(
    ("version", "extra", "match"),
    [
        ("1", {"maps.0.knots": torch.zeros(2, 3), "maps.0.values": torch.zeros(2, 3)}, "does not define"),
        ("2", {"maps.0.knots": torch.zeros(2, 3)}, "not all of"),
        ("2", {"maps.0.knots": torch.zeros(3), "maps.0.values": torch.zeros(3)}, r"must be \(K, 3\)"),
        ("2", {"maps.0.knots": torch.zeros(1, 3), "maps.0.values": torch.zeros(1, 3)}, "K >= 2"),
        ("2", {"maps.0.knots": torch.tensor([[1.0] * 3, [0.0] * 3]), "maps.0.values": torch.zeros(2, 3)},
         "must be monotone"),
        ("2", {"maps.0.knots": torch.zeros(2, 3), "maps.0.values": torch.tensor([[0.0] * 3, [float("nan")] * 3])},
         "NaN"),
        ("2", {"maps.0.extra": torch.zeros(3)}, "does not define"),
    ],
)
def test_damaged_quantile_files_are_refused(tmp_path, version, extra, match):
    path = tmp_path / "bad.safetensors"
    save_file({**_v1_tensors(), **extra}, str(path), metadata=_header(version, ["layer"]))
    with pytest.raises(ValueError, match=match):
        actsteer.Transport.load(path)


def test_save_refuses_an_unusable_quantile_map(tmp_path):
    bad = QuantileMap(torch.ones(2), torch.zeros(2), knots=torch.tensor([[1.0, 0.0], [0.0, 1.0]]),
                      values=torch.zeros(2, 2))
    with pytest.raises(ValueError, match="must be monotone"):
        actsteer.Transport({"s": bad}).save(tmp_path / "bad")


def test_format_fields_are_the_unit_map_fields():
    assert FIELDS == tuple(f for f in actsteer.UnitMap(torch.ones(1), torch.zeros(1)).to_tensors())

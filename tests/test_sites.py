"""Site names: parsing ``"module.path:k"``, listing, resolving patterns, near misses, and unit widths."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import actsteer
from actsteer.core.sites import get_module, infer_width, iter_site_modules, parse_site, resolve_sites


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Linear(8, 8)
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
        self.norm = nn.LayerNorm(8)


class _DualBlock(nn.Module):
    """Returns a tuple (image stream, text stream), like FLUX double-stream blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.img = nn.Linear(8, 8)
        self.txt = nn.Linear(8, 8)


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.layers = nn.ModuleList([_Block() for _ in range(3)])
        self.transformer_blocks = nn.ModuleList([_DualBlock() for _ in range(2)])
        self.single_transformer_blocks = nn.ModuleList([nn.Linear(8, 8) for _ in range(12)])
        self.add_module("ln(post)", nn.LayerNorm(8))  # a name that is not a regex for itself


@pytest.fixture
def model() -> nn.Module:
    torch.manual_seed(0)
    return _Toy()


# parse_site ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("site", "parsed"),
    [
        ("a.b", ("a.b", None)), ("a.b:1", ("a.b", 1)), ("blocks.3:0", ("blocks.3", 0)), ("x:12", ("x", 12)),
        ("", ("", None)),
    ],
)
def test_sites_parse_site_splits_tuple_index(site, parsed):
    assert parse_site(site) == parsed


@pytest.mark.parametrize("site", ["a.b:", "a.b:x", "a.b:[0-1]", "a.b:-1"])
def test_sites_parse_site_rejects_bad_index(site):
    with pytest.raises(ValueError, match=re.escape(f"Bad site name '{site}'") + ".*integer k"):
        parse_site(site)


# list_sites ---------------------------------------------------------------------------------------


def test_sites_list_sites_in_registration_order(model):
    names = actsteer.list_sites(model)
    assert names == [n for n, _ in model.named_modules() if n]
    assert names[:3] == ["embed", "layers", "layers.0"] and "" not in names
    assert actsteer.list_sites(model, r"layers\.\d+\.norm") == ["layers.0.norm", "layers.1.norm", "layers.2.norm"]
    assert actsteer.list_sites(model, "layers.0") == ["layers.0"]  # full match only
    assert actsteer.list_sites(model, "nothing") == []


# resolve_sites ------------------------------------------------------------------------------------


def test_sites_resolve_regex_in_registration_order(model):
    assert resolve_sites(model, r"layers\.\d+\.mlp") == ["layers.0.mlp", "layers.1.mlp", "layers.2.mlp"]
    # several patterns merge without duplicates, in registration order whatever the pattern order
    merged = resolve_sites(model, ["layers.2.norm", r"layers\.[01]\.norm", "layers.2.norm", "embed"])
    assert merged == ["embed", "layers.0.norm", "layers.1.norm", "layers.2.norm"]
    assert resolve_sites(model, r"(?:layers)\.0\.norm") == ["layers.0.norm"]  # ':' inside a regex group


def test_sites_resolve_exact_names(model):
    assert resolve_sites(model, "layers.1.mlp") == ["layers.1.mlp"]  # not layers.1.mlp.0 etc.
    assert resolve_sites(model, "layers.1.mlp.2") == ["layers.1.mlp.2"]
    assert resolve_sites(model, "ln(post)") == ["ln(post)"]  # as a regex it would only match 'lnpost'
    assert resolve_sites(model, "ln(post):0") == ["ln(post):0"]


def test_sites_resolve_tuple_index_suffix(model):
    assert resolve_sites(model, r"transformer_blocks\.\d+:1") == ["transformer_blocks.0:1", "transformer_blocks.1:1"]
    assert resolve_sites(model, "transformer_blocks.0:12") == ["transformer_blocks.0:12"]


@pytest.mark.parametrize("suffix", [":[0-1]", ":(0|1)", ":[01]"])
def test_sites_resolve_expands_index_sets(model, suffix):
    assert resolve_sites(model, r"transformer_blocks\.\d+" + suffix) == [
        "transformer_blocks.0:0", "transformer_blocks.0:1", "transformer_blocks.1:0", "transformer_blocks.1:1",
    ]


def test_sites_resolve_never_rewrites_plain_names(model):
    # ml-act appended a regex's literal ':[0-1]' to plain names, and mutated the name inside its loop so
    # that only the first of several ':k' regexes could match (REFERENCE_NOTES.md section 4)
    sites = resolve_sites(model, [r".*blocks\.0:0", r".*blocks\.0:1", "transformer_blocks.1"])
    assert sites == [
        "transformer_blocks.0:0", "transformer_blocks.0:1", "transformer_blocks.1",
        "single_transformer_blocks.0:0", "single_transformer_blocks.0:1",
    ]
    assert all("[" not in s for s in resolve_sites(model, r".*transformer_blocks\.\d+:[0-1]"))


def test_sites_resolve_flux_default_patterns(model):
    # the reference's FLUX default matched zero single blocks; here '[0-9]' is one digit: blocks 0-9
    sites = resolve_sites(model, [r"transformer_blocks.[0-9]+:[0-1]", r"single_transformer_blocks.[0-9]:0"])
    assert sites[:4] == [
        "transformer_blocks.0:0", "transformer_blocks.0:1", "transformer_blocks.1:0", "transformer_blocks.1:1",
    ]
    assert sites[4:] == [f"single_transformer_blocks.{i}:0" for i in range(10)]


def test_sites_resolve_no_match_suggests_near_misses(model):
    with pytest.raises(ValueError) as info:
        resolve_sites(model, ["layers.0.mlp", "layers.5.mlp"])
    message = str(info.value)
    assert message.startswith("Site pattern 'layers.5.mlp' matches no module of _Toy; closest: 'layers.")
    assert "'layers.0.mlp'" in message and message.endswith("see actsteer.list_sites(model)")


def test_sites_resolve_no_match_without_near_miss(model):
    with pytest.raises(ValueError, match=r"^Site pattern 'zzzz' matches no module of _Toy; see actsteer.list_sites"):
        resolve_sites(model, "zzzz")


def test_sites_resolve_bad_regex_raises(model):
    with pytest.raises(ValueError, match=r"Bad site pattern 'layers\.\(': "):
        resolve_sites(model, "layers.(")


# modules and widths -------------------------------------------------------------------------------


def test_sites_get_module_and_iter_site_modules(model):
    assert get_module(model, "layers.1.mlp") is model.layers[1].mlp
    assert get_module(model, "") is model
    assert iter_site_modules(model, ["transformer_blocks.1:0"]) == [
        ("transformer_blocks.1:0", "transformer_blocks.1", 0, model.transformer_blocks[1])
    ]
    with pytest.raises(KeyError, match="Site 'layers.9.mlp' not found in _Toy .*closest: 'layers.[0-2].mlp'"):
        get_module(model, "layers.9.mlp")


class LlamaRMSNorm(nn.Module):
    """The shape of transformers' *RMSNorm classes: a (D,) weight and no normalized_shape."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))


class _Sized(nn.Module):
    """A module that says its output width through an attribute, as non-torch layers do."""

    def __init__(self, **width: int) -> None:
        super().__init__()
        for name, value in width.items():
            setattr(self, name, value)


@pytest.mark.parametrize(
    ("module", "width"),
    [
        (nn.Linear(3, 7), 7),
        (nn.LayerNorm(6), 6),
        (nn.LayerNorm(6, elementwise_affine=False), 6),
        (nn.GroupNorm(2, 8), 8),
        (nn.Conv2d(3, 5, 1), 5),
        (nn.Conv1d(3, 4, 1), 4),
        (nn.RMSNorm(9), 9),
        (LlamaRMSNorm(12), 12),
        (nn.Embedding(10, 4), 4),
        (nn.BatchNorm2d(6), 6),
        (nn.GELU(), None),
        (nn.Sequential(nn.Linear(2, 3)), None),
        (_Sized(hidden_size=16), 16),  # transformer blocks that say their width (ComfyUI's FLUX blocks, HF layers)
        (_Sized(hidden_dim=24), 24),
        (_Sized(output_size_per_partition=5), 5),  # vLLM's parallel linears: this rank's share
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else str(v),
)
def test_sites_infer_width(module, width):
    assert infer_width(module) == width


def test_sites_a_look_alike_name_says_which_character_differs(tiny_llama):
    """A site typed with a Cyrillic 'а' looks like the real one: the message spells out the difference (issue 21)."""
    model, _ = tiny_llama
    fake = "model.l\u0430yers.0.mlp"  # CYRILLIC SMALL LETTER A
    t = actsteer.Transport({fake: actsteer.UnitMap(torch.ones(64), torch.zeros(64))})
    for call in (lambda: actsteer.steer(model, t).__enter__(), lambda: resolve_sites(model, [fake])):
        with pytest.raises((KeyError, ValueError)) as info:
            call()
        message = info.value.args[0]  # (str() of a KeyError is the repr of its message)
        assert "closest: 'model.layers.0.mlp'" in message
        assert re.search(r"character 8 is '\\u0430' \(U\+0430 CYRILLIC SMALL LETTER A\), not 'a' \(U\+0061", message)

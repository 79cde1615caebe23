"""The quantile map and LinEAS through the diffusers host (`fit_pipeline`, `steer_pipeline`) on tiny random SDXL
and FLUX pipelines."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support.tiny_pipelines import (  # noqa: F401  (one_thread, sdxl, flux: fixtures)
    flux,
    flux_call_kwargs,
    make_flux_pipeline,
    make_sdxl_pipeline,
    one_thread,
    sdxl,
    sdxl_call_kwargs,
)

import actsteer
from actsteer.core import QuantileMap
from actsteer.hf_integration.pipeline_fit import fit_pipeline
from actsteer.hf_integration.pipelines import steer_pipeline

SOURCE = ["a cat", "a dog on grass", "a red car", "a small house", "a tall tree", "a bird in the sky"]
TARGET = [f"watercolor, {s}, soft watercolor painting" for s in SOURCE]
SIZE_KW = dict(height=32, width=32)
FLUX_KW = dict(height=32, width=32, max_sequence_length=48)
FAST_LINEAS = {"steps": 4, "eval_every": 2}


def _weights(pipe) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v.clone() for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)
            for k, v in c.state_dict().items()}


def _image(pipe, transport, strength, arch):
    call = dict(sdxl_call_kwargs() if arch == "sdxl" else flux_call_kwargs(), output_type="np")  # fresh generator
    if transport is None:
        return pipe("a horse", **call).images
    with steer_pipeline(pipe, transport, strength=strength):
        return pipe("a horse", **call).images


@pytest.mark.parametrize("arch", ["sdxl", "flux"])
def test_fit_pipeline_quantile_and_steer(arch, request):
    pipe = request.getfixturevalue(arch)
    fit_kw = SIZE_KW if arch == "sdxl" else FLUX_KW
    t = fit_pipeline(pipe, SOURCE, TARGET, method="quantile", modules="fast", progress=False,
                     estimate_options={"knots": 4}, **fit_kw)
    assert t.method == "quantile" and all(isinstance(m, QuantileMap) for m in t.values())
    plain = _image(pipe, None, 0.0, arch)
    assert np.array_equal(_image(pipe, t, 0.0, arch), plain)
    assert not np.array_equal(_image(pipe, t, 1.0, arch), plain)


@pytest.mark.parametrize("arch", ["sdxl", "flux"])
def test_fit_pipeline_lineas_trains_through_the_denoiser(arch, request):
    pipe = request.getfixturevalue(arch)
    fit_kw = SIZE_KW if arch == "sdxl" else FLUX_KW
    before = _weights(pipe)
    t = fit_pipeline(pipe, SOURCE, TARGET, method="lineas", modules="fast", progress=False,
                     estimate_options=FAST_LINEAS, **fit_kw)
    assert t.method == "lineas" and all(type(m) is actsteer.UnitMap for m in t.values())
    assert t.extra["fit"]["backward_calls"] == 4 and t.extra["fit"]["pipeline_calls"] >= 4
    moved = sum(int(((m.omega != 1) | (m.beta != 0)).sum()) for m in t.values())
    assert moved > 0
    after = _weights(pipe)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not np.array_equal(_image(pipe, t, 1.0, arch), _image(pipe, None, 0.0, arch))


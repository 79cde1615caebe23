"""AcT Apply with ComfyUI's TorchCompileModel mechanism (`comfy_api.torch_helpers.set_torch_compile_wrapper`:
an APPLY_MODEL wrapper that swaps in ``torch.compile(diffusion_model)`` for each call), in both node orders.

The node itself offers only the inductor and cudagraphs backends; the tests call the helper it calls with the
``"eager"`` backend, so dynamo's tracing, guards and graph reuse are the real ones and the outputs bit-identical.
"""

from __future__ import annotations

import pytest
import torch
from support.comfy import clip, encode, forward_hook_count, ksample, one_thread, pack, tiny_sdxl  # noqa: F401
from test_comfy_patching import _apply, _random_transport, _sites
from torch._dynamo.utils import counters


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compiled(model):
    from comfy_api.torch_helpers import set_torch_compile_wrapper

    out = model.clone()
    set_torch_compile_wrapper(model=out, backend="eager")
    return out


@pytest.mark.slow
def test_apply_and_torch_compile_model_in_either_order_match_eager(pack, clip):  # noqa: F811
    model = tiny_sdxl(0)
    pos, neg = encode(clip, "a photo of a cat"), encode(clip, "blurry")
    transport = _random_transport(pack, model, _sites("sdxl")[0])
    plain = ksample(model, pos, neg)
    steered = ksample(_apply(pack, model, transport, 1.0), pos, neg)
    assert not torch.equal(steered, plain)

    compiled = _compiled(model)
    assert torch.equal(ksample(compiled, pos, neg), plain)  # compiled first, unsteered: no dispatcher traced
    # TorchCompileModel -> Apply: the compiled module is the one just used unsteered; its graphs are not reused
    assert torch.equal(ksample(_apply(pack, compiled, transport, 1.0), pos, neg), steered)
    graphs = counters["stats"]["unique_graphs"]
    # Apply -> TorchCompileModel, twice (a new sampling run binds new handles): served by the cached graphs
    for _ in range(2):
        assert torch.equal(ksample(_compiled(_apply(pack, model, transport, 1.0)), pos, neg), steered)
    assert counters["stats"]["unique_graphs"] == graphs
    assert torch.equal(ksample(compiled, pos, neg), plain)
    assert forward_hook_count(model) == 0 and "forward" not in model.model.diffusion_model.out[0].__dict__

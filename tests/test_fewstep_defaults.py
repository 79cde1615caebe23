"""The defaults an artist gets (`actsteer.fit_pipeline`'s, which ComfyUI Learn's mirror: Linear-AcT, sequential,
observed support, the denoiser's ``auto`` sites, the first step), measured at strength 1 on the committed few-step
miniature (tests/support/miniature/fewstep: 4 Euler steps at guidance 0, the setting of SDXL-Lightning and
FLUX.1-schnell). The thresholds are the issue-23 figures of benchmarks/RESULTS.md ("Few-step miniature") with a
margin for the smaller sample here (24 held-out captions, one seed). The model does not keep a picture's content
when its caption changes (the prompt itself keeps 0.08-0.61 of it), so content is asserted against the prompt: the
steer must keep at least what the prompt keeps, less a margin."""

from __future__ import annotations

import pytest
import torch
from support.miniature.fewstep import metrics, styles
from support.miniature.fewstep import model as M
from support.miniature.fewstep.judges import Judges

import actsteer

pytestmark = pytest.mark.slow

# style -> least presence at strength 1 (measured on 32 captions x 2 seeds: dark 1.00, sepia 0.80); the unsteered
# images show the style in at most UNSTEERED_MAX of cases; content kept >= the prompt's - CONTENT_MARGIN
EXPECTED: dict[str, float] = {"dark": 0.9, "sepia": 0.6}
UNSTEERED_MAX = 0.1
CONTENT_MARGIN = 0.15
N_FIT, N_EVAL = 32, 24


@pytest.fixture(scope="module")
def setting():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    pipe, judges = M.load_pipeline(), Judges.load()
    fit_attrs, eval_attrs = metrics.split_prompts(N_FIT, N_EVAL, seed=0)
    prompts = metrics.captions(eval_attrs)
    plain = metrics.generate(pipe, prompts, seed=1000)
    yield pipe, judges, fit_attrs, eval_attrs, prompts, plain
    torch.set_num_threads(n)


@pytest.mark.parametrize("style", list(EXPECTED))
def test_default_fit_at_strength_one_adds_the_style_and_keeps_the_content(setting, style):
    pipe, judges, fit_attrs, eval_attrs, prompts, plain = setting
    source, target = metrics.captions(fit_attrs), metrics.captions(fit_attrs, suffix=f", {style}")
    transport = actsteer.fit_pipeline(pipe, source, target, num_inference_steps=M.STEPS, guidance_scale=0.0,
                                      progress=False)
    assert transport.method == "linear-act" and transport.support == "observed"
    with actsteer.steer(pipe, transport, strength=1.0):
        steered = metrics.generate(pipe, prompts, seed=1000)
    prompted = metrics.generate(pipe, metrics.captions(eval_attrs, suffix=f", {style}"), seed=1000)
    colour_kept = style not in styles.COLOUR_STYLES
    before = metrics.score(judges, plain, eval_attrs, style=style)
    after = metrics.score(judges, steered, eval_attrs, plain, style=style, colour_kept=colour_kept)
    prompt = metrics.score(judges, prompted, eval_attrs, plain, style=style, colour_kept=colour_kept)
    assert before["style_presence"] <= UNSTEERED_MAX, before
    assert after["style_presence"] >= EXPECTED[style], after
    assert after["content_kept"] >= prompt["content_kept"] - CONTENT_MARGIN, (after, prompt)

"""The few-step miniature (tests/support/miniature/fewstep): dataset, captions, tokenizer, schedule, and the committed
pipeline and judges loading into real diffusers/transformers classes."""

from __future__ import annotations

import doctest
import json
import numpy as np
import pytest
import torch

from support.miniature.fewstep import judges as judges_module
from support.miniature.fewstep import metrics, styles
from support.miniature.fewstep import model as M


def test_fewstep_doctests_pass():
    for module in (styles, judges_module):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.attempted > 0 and result.failed == 0, module.__name__


def test_captions_name_the_style_last_and_plain_has_no_word():
    a = styles.Attributes(shape="triangle", colour="purple", position="right", size="small", style="halftone")
    assert styles.caption(a) == "a small purple triangle on the right, halftone"
    assert styles.caption(a, size=False, colour=False, position=False, style=False) == "a triangle"
    plain = styles.Attributes("circle", "red", "center", "large")
    assert styles.caption(plain) == "a large red circle in the center"
    with pytest.raises(ValueError, match="Attributes.style='neon'"):
        styles.Attributes("circle", "red", "center", "large", "neon")


def test_every_style_changes_the_picture_as_documented():
    def draw(style: str) -> np.ndarray:
        attrs = styles.Attributes("square", "blue", "left", "large", style)
        return styles.render(attrs, np.random.default_rng(3)).astype(int)

    plain = draw("plain")
    corner = (0, 31)  # background far from the shape
    assert tuple(plain[corner]) == (255, 255, 255)
    assert tuple(draw("dark")[corner]) == tuple(styles.DARK_GROUND.astype(int))
    assert tuple(draw("pastel")[corner]) == tuple(styles.PASTEL_PAPER.astype(int))
    sepia = draw("sepia")
    assert np.all(np.abs(sepia[..., 1] - np.round(sepia[..., 0] * styles.SEPIA_TONE[1])) <= 1)  # one hue
    blurry = draw("blurry")
    assert len(np.unique(blurry.reshape(-1, 3), axis=0)) > 10 and len(np.unique(plain.reshape(-1, 3), axis=0)) == 2
    halftone, outlined = draw("halftone"), draw("outlined")
    centre = (16, 9)
    assert tuple(plain[centre]) == styles.COLOURS["blue"] and tuple(outlined[centre]) == (255, 255, 255)
    painted = (halftone != 255).any(-1)
    full = (halftone == np.array(styles.COLOURS["blue"])).all(-1)
    assert full.sum() < painted.sum() and full.any()  # dots on a tint


def test_training_captions_drop_attributes_at_the_stated_rates():
    rng = np.random.default_rng(1)
    attrs = [styles.sample_attributes(rng, style="sepia") for _ in range(4000)]
    texts = [styles.training_caption(a, rng) for a in attrs]
    assert abs(np.mean([t == "" for t in texts]) - styles.UNCONDITIONAL) < 0.02
    assert abs(np.mean([a.colour in t for a, t in zip(attrs, texts) if t]) - styles.KEEP["colour"]) < 0.03
    assert all(t.endswith(", sepia") for t in texts if t)


def test_tokenizer_gives_one_token_per_caption_word():
    tok = M.make_tokenizer()
    for word in styles.words():
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word


def test_train_timesteps_are_the_ones_the_1_to_4_step_sampler_visits():
    assert M._train_timesteps() == M.TRAIN_TIMESTEPS
    scheduler = M.sampling_scheduler()
    scheduler.set_timesteps(4)
    assert [int(t) for t in scheduler.timesteps] == [999, 749, 499, 249]


def test_split_prompts_are_disjoint():
    fit, held_out = metrics.split_prompts(32, 32, seed=0)
    assert len(fit) == len(held_out) == 32 and not set(fit) & set(held_out)
    assert all(a.style == "plain" for a in fit + held_out)


def test_score_counts_content_kept_per_image():
    class Fixed:
        def __init__(self, labels):
            self.labels = labels

        def predict(self, images):
            return self.labels[int(images[0, 0, 0, 0] > 0)]

        def features(self, images):
            return torch.ones(len(images), 2) / 2 ** 0.5

    ref = {"style": ["plain"] * 2, "shape": ["circle", "square"], "colour": ["red", "red"],
           "position": ["left", "left"]}
    new = {"style": ["dark", "plain"], "shape": ["circle", "square"], "colour": ["blue", "red"],
           "position": ["left", "right"]}
    judges = Fixed([ref, new])
    attrs = [styles.Attributes("circle", "red", "left", "small")] * 2
    images, reference = torch.ones(2, 3, 32, 32), -torch.ones(2, 3, 32, 32)
    with_colour = metrics.score(judges, images, attrs, reference, style="dark")
    without = metrics.score(judges, images, attrs, reference, style="dark", colour_kept=False)
    assert with_colour["style_presence"] == 0.5 and with_colour["content_kept"] == 0.0  # colour / position moved
    assert without["content_kept"] == 0.5 and without["shape_kept"] == 1.0


@pytest.fixture(scope="module")
def committed_pipeline():
    return M.load_pipeline()


def test_committed_pipeline_loads_into_real_diffusers_classes(committed_pipeline):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    pipe = committed_pipeline
    assert isinstance(pipe, StableDiffusionPipeline) and isinstance(pipe.scheduler, EulerDiscreteScheduler)
    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.text_encoder, CLIPTextModel)
    assert isinstance(pipe.vae, AutoencoderKL) and isinstance(pipe.tokenizer, CLIPTokenizer)
    assert pipe.tokenizer.get_vocab() == M.make_tokenizer().get_vocab()
    out = pipe(["a red circle, sepia"], **M.call_kwargs(0)).images
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()
    log = json.loads((M.PIPELINE_DIR / "train_log.json").read_text())
    assert log["args"]["seed"] == "0" and log["history"] and log["train_timesteps"] == list(M.TRAIN_TIMESTEPS)
    size = sum(p.stat().st_size for p in M.PIPELINE_DIR.rglob("*") if p.is_file())
    assert size <= 10 * 2**20


def test_committed_judges_are_accurate_on_new_images():
    judges = judges_module.Judges.load()
    stored = json.loads(judges.metadata["heldout_accuracy"])
    measured = judges_module.accuracy(judges, 400, seed=12345)
    for attribute in judges_module.ATTRIBUTES:
        assert measured[attribute] >= 0.97 and stored[attribute] >= 0.98, (attribute, measured, stored)

"""The miniature diffusion evidence kit (tests/support/miniature): dataset, captions, tokenizer, identity VAE, and the
committed pipeline and judges loading into real diffusers/transformers classes.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from support.miniature import judges as judges_module
from support.miniature import metrics, shapes
from support.miniature import model as M


def test_shapes_caption_names_every_attribute_and_only_nonflat_styles():
    a = shapes.Attributes(shape="triangle", colour="purple", style="speckled", position="right", size="small")
    assert shapes.caption(a) == "a small purple triangle on the right, speckled"
    assert shapes.caption(a, size=False, colour=False, position=False) == "a triangle, speckled"
    flat = shapes.Attributes(shape="circle", colour="red", style="flat", position="center", size="large")
    assert shapes.caption(flat) == "a large red circle in the center"
    with pytest.raises(ValueError, match="Attributes.colour='pink'"):
        shapes.Attributes(shape="circle", colour="pink", style="flat", position="center", size="large")


def test_shapes_render_draws_the_attributes():
    rng = np.random.default_rng(0)
    for colour, rgb in shapes.COLOURS.items():
        for style in shapes.STYLES:
            attrs = shapes.Attributes(shape="square", colour=colour, style=style, position="left", size="large")
            image = shapes.render(attrs, rng)
            painted = (image != shapes.BACKGROUND).any(-1)
            full = (image == np.array(rgb, dtype=np.uint8)).all(-1)
            assert full.any() and (np.nonzero(painted)[1].mean() < shapes.SIZE / 2)  # on the left
            if style == "flat":
                assert (full == painted).all()  # one colour, no tint
            elif style == "striped":
                rows_full = full.any(1)
                assert rows_full.sum() < painted.any(1).sum()  # some painted rows carry only the tint
            elif style == "outlined":
                assert not painted[painted.shape[0] // 2, int(shapes.POSITIONS["left"])]  # hollow centre


def test_shapes_training_captions_drop_attributes_at_the_stated_rates():
    rng = np.random.default_rng(1)
    attrs = [shapes.sample_attributes(rng, style="striped") for _ in range(4000)]
    texts = [shapes.training_caption(a, rng) for a in attrs]
    empty = np.mean([t == "" for t in texts])
    named = [t for t in texts if t]
    colour = np.mean([a.colour in t for a, t in zip(attrs, texts) if t])
    assert abs(empty - shapes.UNCONDITIONAL) < 0.02
    assert abs(colour - shapes.KEEP["colour"]) < 0.03
    assert all(t.endswith(", striped") for t in named)  # non-flat styles are always named


def test_tokenizer_gives_one_token_per_caption_word():
    tok = M.make_tokenizer()
    for word in shapes.words():
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word
    text = "a large red circle on the left, striped"
    ids = tok(text, padding="max_length", max_length=tok.model_max_length).input_ids
    assert len(ids) == M.MAX_TOKENS and ids[:2] == [0, tok.convert_tokens_to_ids("a</w>")]


def test_identity_vae_encodes_and_decodes_pixels_unchanged():
    vae = M.identity_vae()
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 4 - 2
    with torch.no_grad():
        latent = vae.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(latent, x, rtol=0, atol=1e-4)
        torch.testing.assert_close(vae.decode(latent).sample, x, rtol=0, atol=1e-4)


def test_metrics_split_prompts_are_disjoint_and_filtered():
    fit, held_out = metrics.split_prompts(8, 10, seed=0, colour="red")
    assert len(fit) == 8 and len(held_out) == 10 and not set(fit) & set(held_out)
    assert all(a.colour == "red" for a in fit + held_out)
    with pytest.raises(ValueError, match="Only 18 combinations"):
        metrics.split_prompts(10, 10, colour="red")


@pytest.fixture(scope="module")
def committed_pipeline():
    return M.load_pipeline()


def test_committed_pipeline_loads_into_real_diffusers_classes(committed_pipeline):
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    pipe = committed_pipeline
    assert isinstance(pipe, StableDiffusionPipeline)
    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.text_encoder, CLIPTextModel)
    assert isinstance(pipe.vae, AutoencoderKL) and isinstance(pipe.tokenizer, CLIPTokenizer)
    assert pipe.tokenizer.get_vocab() == M.make_tokenizer().get_vocab()
    # the committed VAE is exactly the constructed identity one
    for (name, p), q in zip(pipe.vae.state_dict().items(), M.identity_vae().state_dict().values()):
        assert torch.equal(p, q), name
    out = pipe(["a red circle"], **M.call_kwargs(0, num_inference_steps=2)).images
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()
    log = json.loads((M.PIPELINE_DIR / "train_log.json").read_text())
    assert log["args"]["seed"] == "0" and log["history"]


def test_committed_judges_are_accurate_on_new_images():
    judges = judges_module.Judges.load()
    stored = json.loads(judges.metadata["heldout_accuracy"])
    measured = judges_module.accuracy(judges, 300, seed=12345)
    for attribute in judges_module.ATTRIBUTES:
        assert measured[attribute] >= 0.95 and stored[attribute] >= 0.95, (attribute, measured, stored)

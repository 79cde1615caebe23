"""actsteer.eval.clip_scores with a tiny random-weight open_clip model (no CLIP weights exist offline)."""

from __future__ import annotations

import json

import pytest
import torch

open_clip = pytest.importorskip("open_clip", reason="the [clip] extra (open_clip_torch) is not installed")
from PIL import Image  # noqa: E402

from actsteer.eval import clip_scores  # noqa: E402

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "actsteer-tiny-clip.json"
    path.write_text(json.dumps(TINY))
    open_clip.add_model_config(path)
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("actsteer-tiny-clip", pretrained=None)
    return model.eval(), preprocess, open_clip.get_tokenizer("actsteer-tiny-clip")


def _image(seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(64, 64, 3, generator=g) * 255).to(torch.uint8).numpy())


def test_clip_scores_shapes_ranges_and_self_similarity(tiny_clip):
    images = [_image(i) for i in range(3)]
    scores = clip_scores(images, images, "a watercolor painting", model=tiny_clip)
    assert scores.presence.shape == (3,) and scores.image_similarity.shape == (3,)
    assert ((scores.presence >= 0) & (scores.presence <= 1)).all()
    torch.testing.assert_close(scores.image_similarity, torch.ones(3), rtol=0, atol=1e-5)
    other = clip_scores(images, [_image(10 + i) for i in range(3)], "a watercolor painting", model=tiny_clip)
    assert (other.image_similarity < 0.9999).all()
    assert set(other.summary()) == {"presence", "image_similarity"}


def test_clip_scores_uses_the_logit_scale(tiny_clip):
    model, preprocess, tokenizer = tiny_clip
    images = [_image(i) for i in range(4)]
    with torch.no_grad():
        model.logit_scale.fill_(0.0)  # exp(0) = 1: the reference's temperature-1 softmax
        flat = clip_scores(images, None, "a dog", model=tiny_clip).presence
        model.logit_scale.fill_(torch.log(torch.tensor(100.0)).item())
        sharp = clip_scores(images, None, "a dog", model=tiny_clip).presence
    assert (flat - 0.5).abs().max() < (sharp - 0.5).abs().max()


def test_clip_scores_rejects_bad_input(tiny_clip):
    with pytest.raises(ValueError, match="empty"):
        clip_scores([], None, "x", model=tiny_clip)
    with pytest.raises(ValueError, match="one reference per image"):
        clip_scores([_image(0)], [_image(1), _image(2)], "x", model=tiny_clip)

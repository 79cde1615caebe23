"""Tiny random-weight SDXL and FLUX pipelines built offline, like diffusers' own ``get_dummy_components()``.

Components follow diffusers' tests (tests/pipelines/stable_diffusion_xl/test_stable_diffusion_xl.py and
tests/pipelines/flux/test_pipeline_flux.py); the CLIP and T5 tokenizers are built in memory from a
character vocabulary, so nothing is downloaded (ENVIRONMENT.md, "Tiny random models").
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import string  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# Characters the toy tokenizers know; anything else becomes the unknown token.
_CHARS = string.ascii_lowercase + string.digits + ".,;:!?'-()"
TEXT_VOCAB = 1000  # vocab size of the tiny text encoders (>= the toy vocabularies below)
SIZE = 32  # image height and width used by the tests


def make_clip_tokenizer():
    """A CLIP BPE tokenizer over single characters (no merges), padded to 77 tokens like the real one."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in _CHARS:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    tok = CLIPTokenizer(vocab=vocab, merges=[], unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.model_max_length = 77  # else SDXL/FLUX pad to 1e30 tokens
    return tok


def make_t5_tokenizer():
    """A T5 (Unigram) tokenizer over single characters, with ``"▁"``-prefixed word starts."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in _CHARS] + [("▁" + c, -2.5) for c in _CHARS]
    tok = T5Tokenizer(vocab=pieces, extra_ids=0)
    tok.model_max_length = 512
    return tok


def _clip_config():
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37,
        layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=2, vocab_size=TEXT_VOCAB,
        hidden_act="gelu", projection_dim=32,
    )


TINY_UNET_CONFIG = dict(
    block_out_channels=(2, 4), layers_per_block=2, sample_size=SIZE // 2, in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
    cross_attention_dim=64, norm_num_groups=1,
)


def make_sdxl_unet(*, seed: int = 0, **overrides):
    """The SDXL-style UNet of diffusers' fast tests: 2 levels (DownBlock2D, CrossAttnDownBlock2D), GroupNorm(1, C),
    1 and 2 transformer blocks per attention; 67 normalization layers. ``overrides`` change config fields
    (the text encoders give ``cross_attention_dim=64`` and ``projection_class_embeddings_input_dim=80``)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**{**TINY_UNET_CONFIG, **overrides})


# The SDXL base 1.0 UNet config (build it on the meta device: no memory, names only).
SDXL_UNET_CONFIG = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)


def make_sdxl_pipeline(*, seed: int = 0, **unet_overrides):
    """A tiny `StableDiffusionXLPipeline` with the UNet of diffusers' fast tests (img2img: ``from_pipe``).

    UNet: 2 levels (DownBlock2D, CrossAttnDownBlock2D), GroupNorm(1, C), 3 transformer blocks; 32x32 images
    give 16x16 latents. The Euler scheduler uses "trailing" spacing, so the first step is t=999 whatever the
    number of steps (like SDXL-Lightning in the paper). Weights are seeded with ``seed``; ``unet_overrides``
    change UNet config fields (see `make_sdxl_unet`).
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    unet = make_sdxl_unet(seed=seed, **unet_overrides)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, steps_offset=1, beta_schedule="scaled_linear", timestep_spacing="trailing",
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=[8, 16], in_channels=3, out_channels=3, norm_num_groups=8,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], latent_channels=4, sample_size=SIZE,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_clip_config())
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config())
    pipe = StableDiffusionXLPipeline(
        unet=unet, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=make_clip_tokenizer(),
        text_encoder_2=text_encoder_2, tokenizer_2=make_clip_tokenizer(), image_encoder=None,
        feature_extractor=None,
    )
    return _ready(pipe)


def make_flux_pipeline(
    *, seed: int = 0, num_layers: int = 2, num_single_layers: int = 2, attention_head_dim: int = 16,
    axes_dims_rope: tuple[int, int, int] = (4, 4, 8),
):
    """A tiny `FluxPipeline` (schnell-like: no guidance embedding) with 2 double and 2 single blocks.

    Transformer: 2 heads of ``attention_head_dim`` (16: hidden 32; ``axes_dims_rope`` must sum to it), joint
    attention dim 32; the VAE has one level and 1 latent channel, so a 32x32 image is 16x16 = 256 image
    tokens after 2x2 packing.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=attention_head_dim, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=list(axes_dims_rope),
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_clip_config())
    torch.manual_seed(seed)
    text_encoder_2 = T5EncoderModel(
        T5Config(vocab_size=TEXT_VOCAB, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                 relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        sample_size=SIZE, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
        latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5035,
    )
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=make_clip_tokenizer(), tokenizer_2=make_t5_tokenizer(), transformer=transformer, vae=vae,
        image_encoder=None, feature_extractor=None,
    )
    return _ready(pipe)


def _ready(pipe):
    """Eval mode for every component, as ``from_pretrained`` leaves them (fresh modules are in training mode,
    and T5's dropout would make every call random); no progress bars."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl_call_kwargs(seed: int = 0, **overrides):
    """Call arguments for the tiny SDXL pipeline: 32x32, 2 steps, CFG 5, a seeded CPU generator."""
    kw = dict(height=SIZE, width=SIZE, num_inference_steps=2, guidance_scale=5.0, output_type="pt",
              generator=torch.Generator("cpu").manual_seed(seed))
    kw.update(overrides)
    return kw


def flux_call_kwargs(seed: int = 0, **overrides):
    """Call arguments for the tiny FLUX pipeline: 32x32, 2 steps, guidance 0, T5 length 48 (one token per char)."""
    kw = dict(height=SIZE, width=SIZE, num_inference_steps=2, guidance_scale=0.0, max_sequence_length=48,
              output_type="pt", generator=torch.Generator("cpu").manual_seed(seed))
    kw.update(overrides)
    return kw


# Fixtures for the pipeline test modules (import them by name: ``from support.tiny_pipelines import one_thread``)
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread for the module: tiny models on 2 shared cores run several times faster without it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def sdxl():
    """The tiny SDXL pipeline, one per module."""
    return make_sdxl_pipeline()


@pytest.fixture(scope="module")
def flux():
    """The tiny FLUX pipeline, one per module."""
    return make_flux_pipeline()

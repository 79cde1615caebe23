"""The miniature text-to-image model: a real diffusers `StableDiffusionPipeline` working in pixel space.

Components, all real diffusers/transformers classes:

- tokenizer: a `CLIPTokenizer` whose BPE vocabulary is learned in memory from the caption words
  (`shapes.words`), so every caption word is one token; ``model_max_length`` is 16 (captions have at most 11);
- text encoder: a 2-layer `CLIPTextModel` (hidden 64), trained together with the UNet;
- UNet: a `UNet2DConditionModel` on 32x32x3 pixels, 3 levels (16, 32, 64 channels), cross-attention on the
  8x8 level and in the mid block (about 1 M parameters), v-prediction on a cosine schedule;
- VAE: an `AutoencoderKL` with one block (no downsampling) whose weights are *set*, not trained, so that
  encode and decode are the identity on pixels to about 1e-5 (`identity_vae`): the model is a pixel-space
  diffusion model, yet the pipeline is a standard SD1-style one that `actsteer.fit_pipeline`, `actsteer.steer`
  and `actsteer.strength_grid` accept unchanged (its UNet is a ``UNet2DConditionModel``: arch "sdxl");
- schedulers: `DDPMScheduler` for training, `DDIMScheduler` ("trailing" spacing, so the first step is the
  noisiest, t=999) for sampling.

The committed weights are a diffusers folder (``weights/pipeline``), loaded with ``from_pretrained``.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import torch

from . import shapes

WEIGHTS = Path(__file__).resolve().parent / "weights"
PIPELINE_DIR = WEIGHTS / "pipeline"
MAX_TOKENS = 16  # tokenizer.model_max_length and the text encoder's positions
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

UNET_CONFIG: dict[str, Any] = dict(
    sample_size=shapes.SIZE, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32, 64),
    # cross-attention only at 8x8 and in the mid block: self-attention over 16x16 tokens took 30% of a step
    down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    cross_attention_dim=64, attention_head_dim=2, norm_num_groups=8,  # attention_head_dim: the number of heads
)
SCHEDULER_CONFIG: dict[str, Any] = dict(
    num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", clip_sample=False,
    timestep_spacing="trailing", steps_offset=1,
)


# Tokenizer ------------------------------------------------------------------------------------------------
def _symbols(word: str) -> tuple[str, ...]:
    # CLIP's BPE splits a word into characters and marks the last one with "</w>"
    return (*word[:-1], word[-1] + "</w>")


def learn_merges(vocabulary: list[str]) -> list[tuple[str, str]]:
    """BPE merges that turn every word of ``vocabulary`` into a single token (most frequent pair first).

    Merges are learned the standard way (each word counted once, ties broken alphabetically), so applying
    them in rank order, as the tokenizer does, reproduces the learned segmentation.

    Example:
        >>> learn_merges(["red", "bed"])
        [('e', 'd</w>'), ('b', 'ed</w>'), ('r', 'ed</w>')]
    """
    words = [_symbols(w) for w in vocabulary]
    merges: list[tuple[str, str]] = []
    while any(len(w) > 1 for w in words):
        counts = collections.Counter(p for w in words for p in zip(w, w[1:]))
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        merged = []
        for w in words:
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged.append(tuple(out))
        words = merged
    return merges


def make_tokenizer():
    """A `CLIPTokenizer` over the caption words (one token each) plus single characters for anything else."""
    from transformers import CLIPTokenizer

    merges = learn_merges(shapes.words())
    vocab = {BOS: 0, EOS: 1}
    for c in "abcdefghijklmnopqrstuvwxyz0123456789,.'-":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = CLIPTokenizer(vocab=vocab, merges=merges, unk_token=EOS, pad_token=EOS, bos_token=BOS, eos_token=EOS)
    tok.model_max_length = MAX_TOKENS
    return tok


# Components -----------------------------------------------------------------------------------------------
def make_text_encoder(vocab_size: int, *, seed: int = 0):
    """A fresh 2-layer `CLIPTextModel` (hidden 64, 4 heads, 16 positions)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=64,
    )
    return CLIPTextModel(config)


def make_unet(*, seed: int = 0):
    """A fresh `UNet2DConditionModel` with `UNET_CONFIG`."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**UNET_CONFIG)


_CARRY = 1000.0  # constant channels that make GroupNorm's statistics independent of the image (see below)
_BIAS = 20.0  # SiLU(y + 20) == y + 20 to float32 precision for |y| < 5


def identity_vae():
    """An `AutoencoderKL` with one block whose encode (mean) and decode are the identity on pixels.

    The pixel ``x`` (3 channels) enters ``conv_in`` as 8 channels ``[x, -x, 1000, -1000]``: the one
    GroupNorm group then has mean 0 and a standard deviation of 500 to a relative 1e-6 whatever ``x`` is,
    so the norm's affine weight (500) restores ``x``; its bias (+20) keeps SiLU in its linear range, and
    ``conv_out`` subtracts it again. Every resnet's second convolution is zero (each block is then its
    skip connection), the mid block has no attention, and the encoder's log-variance is -30 (the
    distribution's lower clamp), so a sample equals the mean to 3e-7. Nothing here is learned.

    Example:
        >>> vae = identity_vae()
        >>> x = torch.rand(2, 3, 32, 32) * 2 - 1
        >>> bool((vae.decode(x).sample - x).abs().max() < 1e-4)
        True
    """
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=3, block_out_channels=(8,), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",), norm_num_groups=1,
        sample_size=shapes.SIZE, scaling_factor=1.0, use_quant_conv=False, use_post_quant_conv=False,
        mid_block_add_attention=False, force_upcast=False,
    )
    with torch.no_grad():
        for p in vae.parameters():
            p.zero_()
        for coder in (vae.encoder, vae.decoder):
            for c in range(3):  # conv_in: [x, -x, C, -C]
                coder.conv_in.weight[c, c, 1, 1] = 1.0
                coder.conv_in.weight[3 + c, c, 1, 1] = -1.0
            coder.conv_in.bias[6], coder.conv_in.bias[7] = _CARRY, -_CARRY
            for m in coder.modules():  # GroupNorms of the resnets: any finite output (conv2 is zero after them)
                if isinstance(m, torch.nn.GroupNorm):
                    m.weight.fill_(1.0)
            # std over the group = sqrt((sum_c mean(x_c^2) + C^2) / 4) ~ C / 2
            coder.conv_norm_out.weight.fill_(_CARRY / 2)
            coder.conv_norm_out.bias[:3] = _BIAS
        for c in range(3):
            vae.decoder.conv_out.weight[c, c, 1, 1] = 1.0
            vae.encoder.conv_out.weight[c, c, 1, 1] = 1.0  # the mean
        vae.decoder.conv_out.bias.fill_(-_BIAS)
        vae.encoder.conv_out.bias[:3] = -_BIAS
        vae.encoder.conv_out.bias[3:] = -30.0  # log-variance
    return vae.eval()


def training_scheduler():
    """The `DDPMScheduler` the model is trained with (cosine betas, v-prediction, 1000 steps)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SCHEDULER_CONFIG)


def sampling_scheduler():
    """The `DDIMScheduler` used for sampling, with the training schedule and "trailing" spacing."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SCHEDULER_CONFIG, set_alpha_to_one=True)


def assemble(unet, text_encoder, tokenizer=None, scheduler=None):
    """A `StableDiffusionPipeline` from the components (no safety checker), in eval mode, no progress bars."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=identity_vae(), text_encoder=text_encoder, tokenizer=tokenizer or make_tokenizer(), unet=unet,
        scheduler=scheduler or sampling_scheduler(), safety_checker=None, feature_extractor=None,
        image_encoder=None, requires_safety_checker=False,
    )
    for component in (pipe.unet, pipe.text_encoder, pipe.vae):
        component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_pipeline(path: str | Path = PIPELINE_DIR):
    """Load the committed miniature pipeline (a diffusers folder) on the CPU, in float32.

    Raises:
        FileNotFoundError: no ``model_index.json`` under ``path``; run ``python -m tests.support.miniature.train``.
    """
    from diffusers import StableDiffusionPipeline

    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"No miniature pipeline at {path}: train it with `python -m tests.support.miniature.train --out {path}`"
        )
    pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call_kwargs(seed: int | list[int] = 0, **overrides: Any) -> dict[str, Any]:
    """Sampling arguments for the miniature pipeline: 20 DDIM steps, guidance 3, float tensors in [0, 1]."""
    seeds = [seed] if isinstance(seed, int) else list(seed)
    generator = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    kw: dict[str, Any] = dict(num_inference_steps=20, guidance_scale=3.0, output_type="pt",
                              generator=generator if len(generator) > 1 else generator[0])
    kw.update(overrides)
    return kw

"""The few-step miniature: a real diffusers `StableDiffusionPipeline` in pixel space, sampled in 1, 2 or 4 steps.

The components are those of the 10-step miniature (`support.miniature.model`: a 2-layer `CLIPTextModel`, a
1 M-parameter `UNet2DConditionModel` on 32x32x3 pixels with v-prediction on a cosine schedule, the hand-set
identity `AutoencoderKL`), with a tokenizer over this dataset's words. What differs is how it is trained and
sampled, after SDXL-Lightning and FLUX.1-schnell:

- sampling: `EulerDiscreteScheduler` with "trailing" timesteps (SDXL-Lightning's recommended scheduler), 4 steps
  (t = 999, 749, 499, 249; 2 steps: 999, 499; 1 step: 999), guidance 0 (``guidance_scale=0``: one conditional
  UNet call per step);
- training (`train.py`): only at the timesteps those 1-4-step schedules visit (``TRAIN_TIMESTEPS``), so every
  update trains a step the sampler takes; 10% empty captions, so that guidance 1-8 can also be measured.

The committed weights are a diffusers folder (``weights/pipeline``), loaded with ``from_pretrained``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


from .. import model as base
from . import styles

WEIGHTS = Path(__file__).resolve().parent / "weights"
PIPELINE_DIR = WEIGHTS / "pipeline"
STEPS = 4  # the default sampler: 4 Euler steps at guidance 0
SCHEDULER_CONFIG: dict[str, Any] = dict(
    num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
    timestep_spacing="trailing", steps_offset=1,
)


def _train_timesteps() -> tuple[int, ...]:
    from diffusers import EulerDiscreteScheduler

    scheduler = EulerDiscreteScheduler(**SCHEDULER_CONFIG)
    out: set[int] = set()
    for n in (1, 2, 3, 4):
        scheduler.set_timesteps(n)
        out.update(int(t) for t in scheduler.timesteps.round())
    return tuple(sorted(out, reverse=True))


TRAIN_TIMESTEPS = (999, 749, 666, 499, 332, 249)  # what the 1- to 4-step trailing schedules visit (tested)


def make_tokenizer():
    """A `CLIPTokenizer` over this dataset's caption words (one token each), as `support.miniature.model`."""
    from transformers import CLIPTokenizer

    merges = base.learn_merges(styles.words())
    vocab = {base.BOS: 0, base.EOS: 1}
    for c in "abcdefghijklmnopqrstuvwxyz0123456789,.'-":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = CLIPTokenizer(vocab=vocab, merges=merges, unk_token=base.EOS, pad_token=base.EOS, bos_token=base.BOS,
                        eos_token=base.EOS)
    tok.model_max_length = base.MAX_TOKENS
    return tok


def training_scheduler():
    """The `DDPMScheduler` whose noise schedule training uses (cosine betas, v-prediction)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SCHEDULER_CONFIG, clip_sample=False)


def sampling_scheduler():
    """`EulerDiscreteScheduler`, trailing timesteps: 4 steps visit t = 999, 749, 499, 249."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(**SCHEDULER_CONFIG)


def assemble(unet, text_encoder, tokenizer=None, scheduler=None):
    """A `StableDiffusionPipeline` from the components, with the identity VAE and the Euler sampler."""
    return base.assemble(unet, text_encoder, tokenizer or make_tokenizer(), scheduler or sampling_scheduler())


def load_pipeline(path: str | Path = PIPELINE_DIR):
    """Load the committed few-step miniature (a diffusers folder) on the CPU, in float32.

    Raises:
        FileNotFoundError: no ``model_index.json`` under ``path``; run ``tests/support/miniature/fewstep/train.py``.
    """
    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"No few-step miniature at {path}: train it with "
            f"`python -m tests.support.miniature.fewstep.train --out {path}`"
        )
    return base.load_pipeline(path)


def call_kwargs(seed: int | list[int] = 0, **overrides: Any) -> dict[str, Any]:
    """Sampling arguments: 4 Euler steps, guidance 0, float tensors in [0, 1]; ``overrides`` change them."""
    return base.call_kwargs(seed, **{"num_inference_steps": STEPS, "guidance_scale": 0.0, **overrides})

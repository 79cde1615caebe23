"""Train the miniature text-to-image model (UNet + CLIP text encoder) on the procedural shapes, on a CPU.

Each step draws a fresh batch from `shapes.batch` (captions with the training dropout), noises it with the
`DDPMScheduler` (cosine betas), and regresses the v-prediction target with a plain (uniformly weighted) MSE,
AdamW with warm-up and cosine decay, gradient clipping at 1, and an exponential moving average (EMA) of the
weights, which is what is saved. Text encoder and UNet are trained together.

Why uniform weights: AcT fits diffusion maps on the responses of the first, noisiest steps, as the paper does
on distilled models, whose first step already draws a coarse image. At low SNR the v-target is about -x0, so the
plain v-loss trains the early steps to predict the caption's average image (which shows the fixed-phase stripes).
Min-SNR weights (``--snr-gamma 5``, Hang et al. 2023) give those steps a weight of ~SNR ~ 0. Measured at the same
budget (`tests.support.miniature.evaluate`, benchmarks/RESULTS.md): with min-SNR-5 the model drew equally good samples
but no stripes in its x0 prediction at t=899..599 (contrast <= 0); with uniform weights it draws them there.

The committed weights were made with (see benchmarks/RESULTS.md, "Diffusion in miniature", for the wall time):
    nice -n 10 .venv/bin/python -m tests.support.miniature.train --out tests/support/miniature/weights/pipeline
(it ran as ``--out /tmp/mini/repro``; ``train_log.json`` in the weights folder has the loss curve, wall and CPU
time). Two runs of the same command give the same bits (checked on 40-step runs).

The run is deterministic for a given seed, step count and thread count (``--threads``, default 1).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from . import model as M  # noqa: E402
from . import shapes  # noqa: E402

logger = logging.getLogger("miniature.train")


def _tokens(tokenizer, captions: list[str]) -> torch.Tensor:
    # exactly what StableDiffusionPipeline.encode_prompt does
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def _lr(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(
    out: Path, *, steps: int, batch_size: int, lr: float, seed: int, ema_decay: float, log_every: int,
    warmup: int = 200, snr_gamma: float = 0.0, save_every: int = 0,
) -> dict:
    """Train and save the EMA weights as a diffusers `StableDiffusionPipeline` folder at ``out``; return the log."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    tokenizer = M.make_tokenizer()
    text_encoder = M.make_text_encoder(len(tokenizer), seed=seed).train()
    unet = M.make_unet(seed=seed).train()
    scheduler = M.training_scheduler()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    ema = [p.detach().clone() for p in params]
    alphas = scheduler.alphas_cumprod
    snr = alphas / (1 - alphas)
    # min-SNR-gamma weights for v-prediction when snr_gamma > 0, else uniform (see the module docstring)
    weight = snr.clamp(max=snr_gamma) / (snr + 1) if snr_gamma > 0 else torch.ones_like(snr)
    history, start, cpu_start, window = [], time.time(), time.process_time(), []
    for step in range(steps):
        x0, captions, _ = shapes.batch(batch_size, rng, training=True)
        noise = torch.randn_like(x0)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,))
        xt = scheduler.add_noise(x0, noise, t)
        target = scheduler.get_velocity(x0, noise, t)
        cond = text_encoder(_tokens(tokenizer, captions))[0]
        pred = unet(xt, t, cond).sample
        loss = (weight[t] * (pred - target).pow(2).mean(dim=(1, 2, 3))).mean()
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr, warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        window.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            elapsed, cpu = time.time() - start, time.process_time() - cpu_start
            history.append({"step": step + 1, "loss": float(np.mean(window)), "elapsed_s": round(elapsed, 1),
                            "cpu_s": round(cpu, 1)})
            logger.info("step %d/%d  loss %.4f  %.0f s wall (%.2f s/step), %.0f s CPU", step + 1, steps,
                        np.mean(window), elapsed, elapsed / (step + 1), cpu)
            window = []
        if save_every and (step + 1) % save_every == 0 and step + 1 < steps:
            _save(out / f"step{step + 1}", unet, text_encoder, tokenizer, params, ema)
    _save(out, unet, text_encoder, tokenizer, params, ema)
    return {"history": history, "wall_s": round(time.time() - start, 1),
            "cpu_s": round(time.process_time() - cpu_start, 1)}


def _save(out: Path, unet, text_encoder, tokenizer, params: list[torch.Tensor], ema: list[torch.Tensor],
          assemble=M.assemble) -> None:
    """Save the EMA weights as a diffusers folder built by ``assemble`` (the training weights are put back afterwards).

    Building the pipeline constructs an `AutoencoderKL`, whose initialisation draws from torch's global generator:
    ``fork_rng`` keeps that from changing the rest of the run, so snapshots (``--save-every``) change nothing.
    """
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        current = [p.detach().clone() for p in params]
        for p, e in zip(params, ema):
            p.copy_(e)
        pipe = assemble(unet.eval(), text_encoder.eval(), tokenizer)
        out.mkdir(parents=True, exist_ok=True)
        pipe.save_pretrained(out, safe_serialization=True)
        for p, c in zip(params, current):
            p.copy_(c)
    unet.train()
    text_encoder.train()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=M.PIPELINE_DIR, help="diffusers folder to write")
    parser.add_argument("--steps", type=int, default=1600)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--ema-decay", type=float, default=0.998)
    parser.add_argument("--snr-gamma", type=float, default=0.0, help="min-SNR loss weights; 0 = uniform")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (results depend on it)")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--save-every", type=int, default=0, help="also save EMA snapshots to OUT/step<N>")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    log = train(args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                ema_decay=args.ema_decay, log_every=args.log_every, save_every=args.save_every,
                snr_gamma=args.snr_gamma)
    log.update({
        "command": " ".join([Path(sys.executable).name, "-m", "tests.support.miniature.train", *(argv or sys.argv[1:])]),
        "args": {k: str(v) for k, v in vars(args).items()},
        "torch": torch.__version__, "threads": args.threads, "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
    })
    (args.out / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")
    logger.info("saved %s (%.0f s)", args.out, log["wall_s"])


if __name__ == "__main__":
    main()

"""Train the few-step miniature (UNet + CLIP text encoder) directly at the timesteps its sampler visits, on a CPU.

Each step draws a fresh batch from `styles.batch` (captions with the training dropout), picks each row's timestep
uniformly from `model.TRAIN_TIMESTEPS` (the timesteps of the 1- to 4-step trailing schedules: 999, 749, 666, 499,
332, 249), noises it with the cosine schedule and regresses the v-prediction target (plain MSE), with AdamW,
warm-up and cosine decay, gradient clipping at 1 and an EMA of the weights, which is what is saved.

Why trained directly and not distilled (benchmarks/RESULTS.md, "Diffusion in miniature, few-step"): the committed
10-step model knows none of the global styles, so distilling needs a new teacher first (one more training run,
then its many-step samples as targets), which does not fit 45 minutes of one CPU thread; training only at the
sampler's timesteps gives each of them about 1/6 of the updates instead of 1/1000, which is what a few-step
sampler needs. At t = 999 the v-target is about -x0, so the first step predicts the caption's average picture:
for the palette styles (the whole canvas changes) that picture already shows the style.

The committed weights were made with (43.5 min of CPU on one thread, 50 min wall on the shared 2-core VM):
    python -m tests.support.miniature.fewstep.train --out /work/scratch/i23/run2 --steps 2200 --save-every 550
and copied to ``weights/pipeline`` without the snapshots (``train_log.json`` there has the loss curve per sampler
timestep, wall and CPU time). Deterministic for a given seed, step count and thread count (``--threads``, default 1).
They follow the palette styles (dark, sepia, pastel) but not shape, colour or position: see benchmarks/RESULTS.md,
"Few-step miniature".
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from .. import model as base  # noqa: E402
from ..train import _lr, _tokens  # noqa: E402
from ..train import _save as base_save  # noqa: E402
from . import model as M  # noqa: E402
from . import styles  # noqa: E402

logger = logging.getLogger("miniature.fewstep.train")


def train(out: Path, *, steps: int, batch_size: int, lr: float, seed: int, ema_decay: float, log_every: int,
          warmup: int = 200, save_every: int = 0, sampler_share: float = 0.5) -> dict:
    """Train and save the EMA weights as a diffusers `StableDiffusionPipeline` folder at ``out``; return the log."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    tokenizer = M.make_tokenizer()
    text_encoder = base.make_text_encoder(len(tokenizer), seed=seed).train()
    unet = base.make_unet(seed=seed).train()
    scheduler = M.training_scheduler()
    timesteps = torch.tensor(M.TRAIN_TIMESTEPS)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    ema = [p.detach().clone() for p in params]
    history, start, cpu_start, window = [], time.time(), time.process_time(), []
    per_t: dict[int, list[float]] = {int(t): [] for t in timesteps}
    for step in range(steps):
        x0, captions, _ = styles.batch(batch_size, rng, training=True)
        noise = torch.randn_like(x0)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,))
        on_schedule = torch.rand(batch_size) < sampler_share
        t[on_schedule] = timesteps[torch.randint(0, len(timesteps), (int(on_schedule.sum()),))]
        xt = scheduler.add_noise(x0, noise, t)
        target = scheduler.get_velocity(x0, noise, t)
        cond = text_encoder(_tokens(tokenizer, captions))[0]
        pred = unet(xt, t, cond).sample
        rows = (pred - target).pow(2).mean(dim=(1, 2, 3))
        loss = rows.mean()
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
        for ti, r in zip(t.tolist(), rows.detach().tolist()):
            if ti in per_t:
                per_t[ti].append(r)
        if (step + 1) % log_every == 0 or step + 1 == steps:
            elapsed, cpu = time.time() - start, time.process_time() - cpu_start
            history.append({"step": step + 1, "loss": float(np.mean(window)), "elapsed_s": round(elapsed, 1),
                            "cpu_s": round(cpu, 1),
                            "loss_by_t": {str(k): round(float(np.mean(v)), 4) for k, v in per_t.items() if v}})
            logger.info("step %d/%d  loss %.4f  %.0f s wall (%.2f s/step), %.0f s CPU", step + 1, steps,
                        np.mean(window), elapsed, elapsed / (step + 1), cpu)
            window = []
            per_t = {k: [] for k in per_t}
        if save_every and (step + 1) % save_every == 0 and step + 1 < steps:
            _save(out / f"step{step + 1}", unet, text_encoder, tokenizer, params, ema)
    _save(out, unet, text_encoder, tokenizer, params, ema)
    return {"history": history, "wall_s": round(time.time() - start, 1),
            "cpu_s": round(time.process_time() - cpu_start, 1)}


def _save(out: Path, unet, text_encoder, tokenizer, params: list[torch.Tensor], ema: list[torch.Tensor]) -> None:
    """The first miniature's `_save` (EMA weights saved, training weights put back, the global RNG left as it was),
    assembling this miniature's few-step pipeline."""
    base_save(out, unet, text_encoder, tokenizer, params, ema, assemble=M.assemble)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=M.PIPELINE_DIR, help="diffusers folder to write")
    parser.add_argument("--steps", type=int, default=2200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--ema-decay", type=float, default=0.998)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (results depend on it)")
    parser.add_argument("--sampler-share", type=float, default=0.5,
                        help="fraction of rows at the sampler's timesteps (the rest: uniform over 0..999)")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--save-every", type=int, default=0, help="also save EMA snapshots to OUT/step<N>")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    log = train(args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                ema_decay=args.ema_decay, log_every=args.log_every, save_every=args.save_every,
                sampler_share=args.sampler_share)
    log.update({
        "command": " ".join(["python", "-m", "tests.support.miniature.fewstep.train",
                             *(sys.argv[1:] if argv is None else argv)]),
        "args": {k: str(v) for k, v in vars(args).items()}, "train_timesteps": list(M.TRAIN_TIMESTEPS),
        "torch": torch.__version__, "threads": args.threads, "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "load_average_end": os.getloadavg(),
    })
    (args.out / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")
    logger.info("saved %s (%.0f s wall, %.0f s CPU)", args.out, log["wall_s"], log["cpu_s"])


if __name__ == "__main__":
    main()

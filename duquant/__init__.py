"""DuQuant (W4A4 post-training quantization with smoothing, block rotations and permutations) for MoE LLMs."""

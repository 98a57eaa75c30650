"""MoEQuant's two MoE-specific parts, as comparators to EAQuant: expert-balanced self-sampled
calibration (`ebss`) and affinity-guided GPTQ (`agq`). GPTQ itself is `duquant.gptq`, since it also
rounds DuQuant-transformed weights without either part."""

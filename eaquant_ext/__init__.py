"""EAQuant's MoE-specific steps, plugged into the DuQuant pipeline through `duquant.pipeline.Extensions`."""

"""Export: a trained student as a folder plain diffusers loads (full pipeline, LoRA, single file), and ``onestep sample``."""

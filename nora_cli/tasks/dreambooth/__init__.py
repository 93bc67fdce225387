"""DreamBooth LoRA for Stable Diffusion: the training job, the pipeline, diffusers export."""

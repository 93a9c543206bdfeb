"""Training: masking schedules, collators, the conversion/SFT trainer and the diffusion GRPO trainer."""

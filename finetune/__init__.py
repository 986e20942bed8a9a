"""Preference-reward fine-tuning: DDPO, Flow-GRPO, Diffusion-DPO and reward backprop on a trained checkpoint."""

"""Few-step distillation of a trained model: progressive, latent consistency (LCM, LCM-LoRA) and reflow."""

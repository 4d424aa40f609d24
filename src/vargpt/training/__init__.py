"""Training: losses, stages (SFT, DPO, editing), the trainer loop, checkpoints."""

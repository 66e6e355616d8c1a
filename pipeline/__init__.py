"""Ray-distributed PyTorch training pipeline."""

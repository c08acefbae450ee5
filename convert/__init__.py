"""Conversion of PyTorch Lens checkpoints (safetensors) into JAX parameter pytrees."""

"""Pipelines: prompt -> image (text-to-image today), built from the components a checkpoint holds."""

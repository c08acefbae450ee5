"""Sampling: the flow-matching schedule, guidance, resolution buckets and the jitted sampler."""

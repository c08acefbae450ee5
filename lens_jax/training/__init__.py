"""Fine-tuning Lens: the flow-matching objective, LoRA and the trainer."""

from .objective import TimestepSampler, flow_matching_loss, flow_matching_terms, sample_sigmas  # noqa: F401
from .results import TrainedRun, load_trained  # noqa: F401

__all__ = ["flow_matching_loss", "flow_matching_terms", "TimestepSampler", "sample_sigmas", "load_trained", "TrainedRun"]

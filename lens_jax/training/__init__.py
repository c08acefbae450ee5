"""Fine-tuning Lens: the flow-matching objective, LoRA and the trainer."""

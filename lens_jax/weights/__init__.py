"""Everything that reads or writes checkpoints: safetensors, key-mapping tables, layouts, orbax, the hub."""

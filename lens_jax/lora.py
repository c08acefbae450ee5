"""LoRA for the Lens DiT, public entry point (re-exports only).

    adapter = lens_jax.lora.load("my_lora.safetensors")            # peft, kohya or comfy, detected
    tr = lens_jax.transformer.load("Lens/transformer").with_lora(adapter, 0.8)
    lens_jax.lora.save(adapter, "out.safetensors", format="kohya")
    sd = lens_jax.lora.state_dict(adapter, format="peft")          # names and PyTorch layouts

Adapters are pytrees `{module_path: LoraWeights(lora_A, lora_B, alpha)}` (see `lens_jax.models.lora`);
files are read and written by `lens_jax.weights.lora_formats`. See docs/lora.md.
"""

from .models.lora import (  # noqa: F401
    DEFAULT_TARGETS,
    Adapter,
    LoraWeights,
    check_adapter,
    init_adapter,
    lora_targets,
    merge,
    merge_many,
    module_shapes,
    unmerge,
)
from .weights.lora_formats import FORMATS, detect_format, from_state_dict, load, metadata, save, state_dict  # noqa: F401

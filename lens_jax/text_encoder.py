"""Lens' text encoder (GPT-OSS-20B multi-layer features), public entry point.

    te = lens_jax.text_encoder.load("Lens/text_encoder")      # MXFP4 experts stay packed
    features = te(input_ids, attention_mask)                   # hidden states after layers 5, 11, 17, 23
    new_tokens = te.generate(input_ids, attention_mask, max_new_tokens=64)   # GPT-OSS as a causal LM

The network lives in `lens_jax.models.text_encoder`, its checkpoint mapping in `lens_jax.weights.text_encoder`.
"""

from .models.text_encoder import (  # noqa: F401
    DEFAULT_SELECTED_LAYERS,
    MOE_IMPLS,
    TextEncoder,
    TextEncoderConfig,
    apply,
    check_selected_layers,
    init_params,
    is_packed,
    num_layers,
    param_axes,
)
from .models.gpt_oss_decode import CausalLM  # noqa: F401
from .weights.text_encoder import load, resolve_folder  # noqa: F401

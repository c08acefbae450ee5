"""The Lens DiT, public entry point: `load(path)` and the pure functions underneath.

    tr = lens_jax.transformer.load("Lens/transformer", dtype=jnp.bfloat16)
    v = tr(hidden_states, encoder_hidden_states, encoder_hidden_states_mask, timestep, img_shapes=[(1, h, w)])
    v = lens_jax.transformer.apply(tr.params, tr.config, ...)       # jit-able, pure

The network lives in `lens_jax.models.transformer`, its checkpoint mapping in `lens_jax.weights.dit`.
"""

from .models.transformer import (  # noqa: F401
    LensTransformer,
    TransformerConfig,
    apply,
    block,
    default_attention_impl,
    embed_text,
    init_params,
    param_axes,
    rope_tables,
    timestep_embedding,
)
from .weights.dit import load, to_torch_state_dict  # noqa: F401
from .weights.export import export_comfy, export_diffusers  # noqa: F401

"""GPT-OSS (HF `GptOssForCausalLM` names) -> the JAX text-encoder pytree.

Two source layouts exist:
  * float: `model.layers.N.mlp.experts.gate_up_proj` [E, hidden, 2I] and `down_proj` [E, I, hidden]
    (transformers' in-memory layout, what `save_pretrained` writes for a float model);
  * MXFP4 (`openai/gpt-oss-*`, Lens' `text_encoder/`): `*_blocks` uint8 [E, out, in/32, 16] and
    `*_scales` uint8 [E, out, in/32] instead of those two tensors.
An MXFP4 checkpoint is either dequantised at conversion (exact) or kept packed (copied as
uint8, dequantised inside the forward). `model.norm.weight` and `lm_head.weight` (the causal-LM
head, used by the prompt reasoner's decoding) are loaded with `lm_head=True` and skipped
otherwise: Lens' features are raw decoder-layer outputs.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Sequence
from pathlib import Path

import jax
import ml_dtypes
import jax.numpy as jnp
from jax.typing import DTypeLike
import numpy as np

from ..errors import CheckpointError, CheckpointNotFoundError
from ..models import mxfp4
from ..models.gpt_oss_decode import CausalLM
from ..models.dtypes import resolve_dtype
from ..models.text_encoder import DEFAULT_SELECTED_LAYERS, TextEncoderConfig, check_selected_layers, init_params

from .mapping import COPY, LINEAR, Rule, Transform, check_state_dict, convert_state_dict, expected_shapes, unflatten
from .safetensors_io import SafetensorsReader, open_checkpoint

__all__ = [
    "MXFP4_DEQUANT",
    "IGNORED",
    "text_encoder_rules",
    "source_layout",
    "text_encoder_expected_shapes",
    "convert_text_encoder_weights",
    "convert_text_encoder",
]

def _dequantize_experts(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """[E, out, G, 16] blocks + [E, out, G] scales -> [E, in, out], one expert at a time.

    The result is bfloat16, which holds every MXFP4 value exactly (2 significant bits, f32's
    exponent range), so f32 targets get the same values while the float32 temporaries stay at
    one expert instead of a whole layer.
    """
    e, rows, groups, _ = blocks.shape
    out = np.empty((e, groups * mxfp4.BLOCK, rows), ml_dtypes.bfloat16)
    for i in range(e):
        out[i] = mxfp4.dequantize_np(blocks[i], scales[i]).T
    return out


# Target per layer: [E, in, out] (transformers' parameter layout). Sources: the on-disk MXFP4 pair.
MXFP4_DEQUANT = Transform(
    "mxfp4_dequant",
    lambda t: mxfp4.packed_shapes((t[0], t[2], t[1])),
    _dequantize_experts,
)

IGNORED = (r"^lm_head\.weight$", r"^model\.norm\.weight$")  # skipped unless the head is loaded
HEAD_KEYS = ("lm_head.weight", "model.norm.weight")

# The causal-LM head: optional mapping rules, added when the head is loaded.
HEAD_RULES = (
    Rule("norm.weight", "model.norm.weight"),
    Rule("lm_head.kernel", "lm_head.weight", LINEAR),
)

_L = "model.layers.{i}."
_EXPERTS = _L + "mlp.experts."


def _linear(target: str, source: str, bias: bool) -> list[Rule]:
    rules = [Rule(f"{target}.kernel", f"{source}.weight", LINEAR)]
    if bias:
        rules.append(Rule(f"{target}.bias", f"{source}.bias", COPY))
    return rules


def text_encoder_rules(attention_bias: bool = True, layout: str = "float", keep_mxfp4: bool = False,
                       lm_head: bool = False) -> list[Rule]:
    """The mapping as data. `layout` is the checkpoint's expert layout ("float" or "mxfp4");
    `lm_head` adds the final norm and the LM head."""
    if layout not in ("float", "mxfp4"):
        raise ValueError(f"unknown expert layout {layout!r}")
    if keep_mxfp4 and layout != "mxfp4":
        raise ValueError("keep_mxfp4 needs an MXFP4 checkpoint (experts stored as *_blocks/*_scales).")
    rules = [
        Rule("embed_tokens.embedding", "model.embed_tokens.weight"),
        Rule("layers.input_layernorm.weight", _L + "input_layernorm.weight"),
        Rule("layers.post_attention_layernorm.weight", _L + "post_attention_layernorm.weight"),
        Rule("layers.self_attn.sinks", _L + "self_attn.sinks"),
        *[r for n in ("q_proj", "k_proj", "v_proj", "o_proj")
          for r in _linear(f"layers.self_attn.{n}", _L + f"self_attn.{n}", attention_bias)],
        *_linear("layers.mlp.router", _L + "mlp.router", True),
        Rule("layers.mlp.experts.gate_up_proj_bias", _EXPERTS + "gate_up_proj_bias"),
        Rule("layers.mlp.experts.down_proj_bias", _EXPERTS + "down_proj_bias"),
    ]
    for name in ("gate_up_proj", "down_proj"):
        target = f"layers.mlp.experts.{name}"
        if layout == "float":
            rules.append(Rule(target, _EXPERTS + name))
        elif keep_mxfp4:
            rules.append(Rule(f"{target}_blocks", _EXPERTS + f"{name}_blocks"))
            rules.append(Rule(f"{target}_scales", _EXPERTS + f"{name}_scales"))
        else:
            rules.append(Rule(target, (_EXPERTS + f"{name}_blocks", _EXPERTS + f"{name}_scales"), MXFP4_DEQUANT))
    if lm_head:
        rules.extend(HEAD_RULES)
    return rules


def has_lm_head(reader: SafetensorsReader) -> bool:
    """Whether the checkpoint holds the causal-LM head (`lm_head.weight` and `model.norm.weight`)."""
    keys = set(reader.keys())
    return all(k in keys for k in HEAD_KEYS)


def source_layout(reader: SafetensorsReader) -> str:
    """"mxfp4" when the checkpoint stores packed experts, else "float"."""
    return "mxfp4" if any(k.endswith("mlp.experts.gate_up_proj_blocks") for k in reader.keys()) else "float"


def text_encoder_expected_shapes(config, dtype, packed: bool, lm_head: bool = False) -> dict:
    abstract = jax.eval_shape(lambda: init_params(config, jax.random.key(0), dtype, packed=packed, lm_head=lm_head))
    return expected_shapes(abstract)


def _later_layers_pattern(first_unused: int, total: int) -> str | None:
    if first_unused >= total:
        return None
    return r"^model\.layers\.(" + "|".join(str(i) for i in range(first_unused, total)) + r")\."


def convert_text_encoder_weights(reader: SafetensorsReader, config, dtype=np.float32, keep_mxfp4: bool | None = None,
                                 num_layers: int | None = None, progress=None, lm_head: bool = False) -> dict:
    """Strictly map a GPT-OSS state dict to the JAX pytree (numpy leaves).

    `num_layers` keeps only the first decoder layers (later ones must exist and are skipped).
    `lm_head` also maps `model.norm.weight` and `lm_head.weight` (they must exist).
    """
    layout = source_layout(reader)
    packed = (layout == "mxfp4") if keep_mxfp4 is None else bool(keep_mxfp4)
    if lm_head and not has_lm_head(reader):
        raise CheckpointError(
            "the text encoder checkpoint has no causal-LM head (lm_head.weight + model.norm.weight); text "
            "generation needs a GptOssForCausalLM checkpoint such as Lens' text_encoder/ or openai/gpt-oss-20b."
        )
    rules = text_encoder_rules(config.attention_bias, layout, packed, lm_head)
    total = config.num_hidden_layers
    n = total if num_layers is None else int(num_layers)
    if not 1 <= n <= total:
        raise ValueError(f"num_layers must be in [1, {total}], got {n}.")
    ignore = [] if lm_head else list(IGNORED)
    later = _later_layers_pattern(n, total)
    if later:
        ignore.append(later)
    flat = convert_state_dict(
        reader, rules, text_encoder_expected_shapes(config.truncated(n), dtype, packed, lm_head),
        ignore=ignore, what=f"GPT-OSS text encoder checkpoint ({layout} experts)", progress=progress,
    )
    return unflatten(flat)


def check_text_encoder(path: str | os.PathLike, dtype=np.float32, keep_mxfp4: bool | None = None,
                       num_layers: int | None = None) -> None:
    """Check a GPT-OSS folder without reading any tensor: config, every safetensors header and file
    size, and every needed key's shape (what `convert_text_encoder` would fail on, found up front)."""
    folder = Path(path)
    if folder.is_file():
        folder = folder.parent
    if not (folder / "config.json").exists():
        raise CheckpointError(f"no config.json in {folder}: pass an HF GPT-OSS folder (config.json + "
                              "model*.safetensors), e.g. a Lens checkpoint's text_encoder/.")
    config = TextEncoderConfig.from_json(folder / "config.json")
    reader = open_checkpoint(folder)
    layout = source_layout(reader)
    packed = (layout == "mxfp4") if keep_mxfp4 is None else bool(keep_mxfp4)
    n = config.num_hidden_layers if num_layers is None else int(num_layers)
    ignore = list(IGNORED)
    later = _later_layers_pattern(n, config.num_hidden_layers)
    if later:
        ignore.append(later)
    check_state_dict(reader, text_encoder_rules(config.attention_bias, layout, packed),
                     text_encoder_expected_shapes(config.truncated(n), dtype, packed), ignore=ignore,
                     what=f"GPT-OSS text encoder checkpoint ({layout} experts)")


def convert_text_encoder(path: str | os.PathLike, dtype=np.float32, keep_mxfp4: bool | None = None,
                         num_layers: int | None = None, progress=None, lm_head: bool = False):
    """Read an HF GPT-OSS folder -> (TextEncoderConfig, params with numpy leaves).

    The config returned is the checkpoint's full config even when `num_layers` truncates the params.
    """
    folder = Path(path)
    if not folder.exists():
        raise CheckpointError(f"text encoder path {folder} does not exist.")
    if folder.is_file():
        folder = folder.parent
    config_path = folder / "config.json"
    if not config_path.exists():
        raise CheckpointError(
            f"no config.json in {folder}: pass an HF GPT-OSS folder (config.json + model*.safetensors), "
            "e.g. a Lens checkpoint's text_encoder/."
        )
    config = TextEncoderConfig.from_json(config_path)
    reader = open_checkpoint(folder)
    params = convert_text_encoder_weights(reader, config, dtype, keep_mxfp4, num_layers, progress, lm_head)
    return config, params


def resolve_folder(path: str | os.PathLike) -> Path:
    """An HF GPT-OSS folder, or a Lens checkpoint root holding `text_encoder/`."""
    p = Path(path)
    if p.is_dir() and not (p / "config.json").exists() and (p / "text_encoder" / "config.json").exists():
        return p / "text_encoder"
    return p


def _is_dtype_like(x) -> bool:
    if isinstance(x, (str, np.dtype, type)):
        return True
    return hasattr(x, "dtype") and not hasattr(x, "__len__")


def default_selected_layers(folder: Path, config: TextEncoderConfig) -> tuple[int, ...]:
    """The layers Lens reads: the DiT's `selected_layer_index` of a sibling transformer/config.json,
    else (5, 11, 17, 23) when the model is that deep, else its last layer."""
    dit_config = folder.parent / "transformer" / "config.json"
    if dit_config.is_file():
        sel = json.loads(dit_config.read_text()).get("selected_layer_index")
        if sel:
            return tuple(int(i) for i in sel)
    if max(DEFAULT_SELECTED_LAYERS) < config.num_hidden_layers:
        return DEFAULT_SELECTED_LAYERS
    return (config.num_hidden_layers - 1,)


def load(path: str | os.PathLike, selected_layers: Sequence[int] | None = None, dtype: DTypeLike = jnp.float32,
         keep_mxfp4: bool | None = None, moe_impl: str = "auto", moe_chunk: int | None = None,
         place: Callable[[dict], dict] | None = None, causal_lm: bool = False) -> CausalLM:
    """Load an HF-format GPT-OSS folder (config.json + safetensors; float or MXFP4 experts).

    `selected_layers`: the feature layers (None: `default_selected_layers`; a dtype given in this
    place, as in `load(path, jnp.bfloat16)`, is taken as `dtype`). Only decoder layers
    0..max(selected_layers) are read. `keep_mxfp4`: None keeps MXFP4 experts packed (uint8 on
    the device, dequantised in the forward) when the checkpoint has them; False dequantises them
    at load time to `dtype`; True requires an MXFP4 checkpoint. `place(host_tree) -> tree` puts the
    host (numpy) parameters where they belong (default: the default device).

    `causal_lm=True` reads every decoder layer plus the final norm and the untied `lm_head`
    (needed by `.generate`). Otherwise they are skipped and read on the first `.generate` call.
    """
    if selected_layers is not None and _is_dtype_like(selected_layers):
        selected_layers, dtype = None, selected_layers
    folder = resolve_folder(path)
    if not (folder / "config.json").exists():
        raise CheckpointNotFoundError(
            f"no config.json in {folder}: pass an HF GPT-OSS folder (config.json + model*.safetensors), "
            "e.g. a Lens checkpoint's text_encoder/."
        )
    config = TextEncoderConfig.from_json(folder / "config.json")
    if selected_layers is None:
        selected_layers = default_selected_layers(folder, config)
    sel = check_selected_layers(selected_layers, config.num_hidden_layers)
    dtype = resolve_dtype(dtype)

    def lm_loader():
        _, full = convert_text_encoder(folder, dtype, keep_mxfp4=keep_mxfp4, lm_head=True)
        return jax.tree.map(jnp.asarray, full) if place is None else place(full)

    if causal_lm:
        params = lm_loader()
    else:
        _, flat = convert_text_encoder(folder, dtype, keep_mxfp4=keep_mxfp4, num_layers=max(sel) + 1)
        params = jax.tree.map(jnp.asarray, flat) if place is None else place(flat)
    return CausalLM(config, params, sel, moe_impl, moe_chunk, lm_loader=lm_loader)

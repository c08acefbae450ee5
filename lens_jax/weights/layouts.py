"""Which published layout a checkpoint is in, decided from its tensor names alone.

Each component has one detector; the key names it looks for are data (`DIT_MARKERS`,
`TEXT_ENCODER_MARKERS`, the VAE's `Layout.marker` in `convert/vae.py`), and the mapping tables
themselves stay in the component modules (`convert/transformer.py`, `convert/text_encoder.py`,
`convert/vae.py`). When nothing matches, the error names what was expected, a sample of the
keys that were seen and, when the keys look like another component, which one.

Layouts:
  * DiT: diffusers names (`transformer_blocks.N.attn.img_qkv.weight` ...), in a diffusers
    `transformer/` folder (sharded or not) or a single file, optionally behind a prefix such as
    `model.diffusion_model.` (ComfyUI `lens_bf16.safetensors`), `diffusion_model.`,
    `transformer.`, `model.`, `module.` or `net.`.
  * VAE: diffusers names (`vae/`, ComfyUI `flux2-vae.safetensors`) or the original FLUX.2
    `ae.safetensors` (BFL) names.
  * Text encoder: HF GPT-OSS with float experts or MXFP4 (`*_blocks`/`*_scales`) experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from ..errors import CheckpointError
from .safetensors_io import SafetensorsReader

__all__ = [
    "DIT_MARKERS",
    "KNOWN_DIT_PREFIXES",
    "TEXT_ENCODER_MARKERS",
    "Detected",
    "detect_dit",
    "detect_vae",
    "detect_text_encoder",
    "guess_component",
]

# Both must be present, behind the same prefix.
DIT_MARKERS = ("transformer_blocks.0.attn.img_qkv.weight", "transformer_blocks.0.img_mlp.w1.weight")
# Prefixes seen in the wild (any prefix in front of both markers is accepted; these are documentation).
KNOWN_DIT_PREFIXES = ("", "model.diffusion_model.", "diffusion_model.", "transformer.", "model.", "module.", "net.")

TEXT_ENCODER_MARKERS = {
    "common": "model.layers.0.self_attn.q_proj.weight",
    "float": "model.layers.0.mlp.experts.gate_up_proj",
    "mxfp4": "model.layers.0.mlp.experts.gate_up_proj_blocks",
}

_SAMPLE = 10


@dataclass(frozen=True)
class Detected:
    """A detected layout: `name` for the manifest, `prefix` in front of the mapping's source keys."""

    component: str
    name: str
    prefix: str = ""

    def describe(self) -> str:
        return self.name + (f" (keys behind prefix {self.prefix!r})" if self.prefix else "")

    def to_json(self) -> dict:
        return {"name": self.name, "prefix": self.prefix}


def _sample(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_SAMPLE])
    more = f", ... ({len(keys)} keys in all)" if len(keys) > _SAMPLE else f" ({len(keys)} keys)"
    return f"[{shown}{more}]"


def _files(reader: SafetensorsReader) -> str:
    names = [str(f) for f in reader.files]
    return names[0] if len(names) == 1 else f"{names[0]} (+{len(names) - 1} more shards)"


def guess_component(keys: Iterable[str]) -> str | None:
    """'transformer', 'vae' or 'text_encoder' when the keys look like that component, else None."""
    from .vae import LAYOUTS as VAE_LAYOUTS

    keys = list(keys)
    if any(k.endswith(DIT_MARKERS[0]) for k in keys):
        return "transformer"
    if any(k.endswith(TEXT_ENCODER_MARKERS["common"]) for k in keys):
        return "text_encoder"
    if any(k.endswith(lay.marker) for lay in VAE_LAYOUTS.values() for k in keys):
        return "vae"
    return None


def _unknown(component: str, expected: str, reader: SafetensorsReader) -> CheckpointError:
    keys = reader.keys()
    hint = ""
    other = guess_component(keys)
    if other is not None and other != component:
        hint = f" These keys look like a {other.replace('_', ' ')} checkpoint: was the file passed for the wrong component?"
    return CheckpointError(
        f"unknown {component.replace('_', ' ')} layout in {_files(reader)}: expected {expected}; "
        f"saw {_sample(keys)}.{hint}"
    )


def detect_dit(reader: SafetensorsReader) -> Detected:
    """The DiT layout: diffusers names, possibly behind one prefix (found from the marker keys)."""
    first, second = DIT_MARKERS
    prefixes = sorted(k[: -len(first)] for k in reader.keys() if k.endswith(first))
    prefixes = [p for p in prefixes if p + second in reader]
    if not prefixes:
        raise _unknown(
            "transformer",
            f"diffusers DiT keys {first!r} and {second!r}, optionally behind a prefix such as "
            + ", ".join(repr(p) for p in KNOWN_DIT_PREFIXES if p),
            reader,
        )
    if len(prefixes) > 1:
        raise CheckpointError(
            f"{_files(reader)} holds several Lens DiTs (key prefixes {prefixes}); convert one file holding one model."
        )
    prefix = prefixes[0]
    return Detected("transformer", "diffusers" if not prefix else "single-file", prefix)


def detect_vae(reader: SafetensorsReader) -> Detected:
    """The VAE layout ('diffusers' or 'bfl'), by `convert/vae.py`'s marker keys."""
    from .vae import LAYOUTS, detect_layout

    try:
        layout = detect_layout(reader.keys())
    except CheckpointError:
        raise _unknown(
            "vae", "a FLUX.2 VAE key like " + " or ".join(repr(lay.marker) for lay in LAYOUTS.values()), reader
        ) from None
    return Detected("vae", layout.name)


def detect_text_encoder(reader: SafetensorsReader) -> Detected:
    """'gpt-oss-mxfp4' or 'gpt-oss-float' (HF GptOssForCausalLM names)."""
    m = TEXT_ENCODER_MARKERS
    if m["common"] in reader:
        if m["mxfp4"] in reader:
            return Detected("text_encoder", "gpt-oss-mxfp4")
        if m["float"] in reader:
            return Detected("text_encoder", "gpt-oss-float")
    raise _unknown(
        "text_encoder",
        f"HF GPT-OSS keys {m['common']!r} with {m['mxfp4']!r} (MXFP4 experts) or {m['float']!r} (float experts)",
        reader,
    )

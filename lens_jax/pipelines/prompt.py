"""Lens' prompt handling: chat template, tokenisation, prefix offset and masks.

Lens wraps every prompt in a fixed three-turn chat (system instruction, the user prompt, an
assistant turn whose thinking is fixed and whose content is empty), renders it with the
tokenizer's own chat template, cuts the text at "<|return|>", tokenises with right padding
(at most 512 tokens) and hands the DiT the encoder features from `txt_offset` on (97 for the
real o200k_harmony tokenizer: the template prefix up to the user prompt), with the matching
tokenizer mask.

The real GPT-OSS template writes today's date (`strftime_now("%Y-%m-%d")`) into the system
turn, which would make features depend on the day; the date is frozen here (default
2026-05-23, the date the 97-token prefix assumes) by shadowing `strftime_now` in the template.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "SYSTEM_PROMPT",
    "THINKING",
    "DEFAULT_DATE",
    "REAL_TXT_OFFSET",
    "MAX_SEQUENCE_LENGTH",
    "RETURN_TOKEN",
    "lens_messages",
    "load_tokenizer",
    "render_prompt",
    "tokenize_prompts",
    "TokenizedPrompts",
    "read_txt_offset",
    "slice_features",
    "encode_prompts",
    "PromptFeatures",
]

SYSTEM_PROMPT = (
    "Describe the image by detailing the color, shape, size, texture, quantity, text, spatial relationships of "
    "the objects and background."
)
THINKING = "Need to generate one image according to the description."
DEFAULT_DATE = "2026-05-23"
REAL_TXT_OFFSET = 97
MAX_SEQUENCE_LENGTH = 512
RETURN_TOKEN = "<|return|>"

# strftime directives that a date-only clock can answer (time of day = midnight).
_STRFTIME_DIRECTIVES = "aAbBdHIjmMpSyYwWUeGuVFDT"


def lens_messages(prompt: str) -> list[dict[str, str]]:
    """The fixed chat Lens renders for one prompt."""
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": prompt},
        {"role": "assistant", "thinking": THINKING, "content": ""},
    ]


def load_tokenizer(path: str | os.PathLike):
    """`transformers.AutoTokenizer` from a tokenizer folder (or a Lens root holding `tokenizer/`).

    Right padding; the pad token falls back to the eos token when the tokenizer has none.
    """
    # Only the tokenizer is used: transformers' "PyTorch was not found" banner is noise here
    # (a user's own TRANSFORMERS_NO_ADVISORY_WARNINGS wins).
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers import AutoTokenizer

    p = Path(path)
    if p.is_dir() and (p / "tokenizer").is_dir() and not (p / "tokenizer_config.json").exists():
        p = p / "tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(str(p))
    _ensure_pad(tokenizer)
    tokenizer.padding_side = "right"
    return tokenizer


def _ensure_pad(tokenizer) -> None:
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad token nor an eos token to pad with.")
        tokenizer.pad_token = tokenizer.eos_token


def _as_date(date: str | _dt.date | _dt.datetime) -> _dt.datetime:
    if isinstance(date, _dt.datetime):
        return date
    if isinstance(date, _dt.date):
        return _dt.datetime(date.year, date.month, date.day)
    try:
        return _dt.datetime.strptime(str(date), "%Y-%m-%d")
    except ValueError:
        raise ValueError(f"date must be YYYY-MM-DD (or a datetime.date), got {date!r}.") from None


def _jinja_str(s: str) -> str:
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def freeze_clock(template: str, date: str | _dt.date = DEFAULT_DATE) -> str:
    """`template` with `strftime_now(fmt)` answering for `date` (midnight) instead of today.

    A template-level macro of the same name shadows transformers' global; the macro emits nothing
    where it is defined, so the rendered text is otherwise unchanged.
    """
    if "strftime_now" not in template:
        return template
    when = _as_date(date)
    chain = "fmt | replace('%%', '\\x00')"
    for d in _STRFTIME_DIRECTIVES:
        chain += f" | replace('%{d}', {_jinja_str(when.strftime('%' + d))})"
    chain += " | replace('\\x00', '%')"
    return "{% macro strftime_now(fmt) %}{{ " + chain + " }}{% endmacro %}" + template


def render_prompt(tokenizer, prompt: str, date: str | _dt.date = DEFAULT_DATE) -> str:
    """The chat-template text for one prompt, date frozen, cut at "<|return|>"."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: use the default one
        template = template.get("default")
    if not template:
        raise ValueError(
            "the tokenizer has no chat template; Lens needs the GPT-OSS (harmony) chat template "
            "(tokenizer_config.json 'chat_template' or chat_template.jinja in the tokenizer folder)."
        )
    text = tokenizer.apply_chat_template(
        lens_messages(prompt), chat_template=freeze_clock(template, date), tokenize=False,
        add_generation_prompt=False,
    )
    return text.split(RETURN_TOKEN, 1)[0]


@dataclass
class TokenizedPrompts:
    """Right-padded token ids and tokenizer mask ([B, L] int64) and the rendered texts."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    texts: list[str]


def tokenize_prompts(tokenizer, prompts: str | Sequence[str], max_sequence_length: int = MAX_SEQUENCE_LENGTH,
                     date: str | _dt.date = DEFAULT_DATE) -> TokenizedPrompts:
    """Render and tokenise prompts (padding to the longest, right side; truncation with a warning)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("no prompts to tokenise.")
    _ensure_pad(tokenizer)
    texts = [render_prompt(tokenizer, p, date) for p in prompts]
    lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    too_long = [(i, n) for i, n in enumerate(lengths) if n > max_sequence_length]
    if too_long:
        warnings.warn(
            f"{len(too_long)} prompt(s) exceed max_sequence_length={max_sequence_length} tokens after the chat "
            f"template and were cut (prompt index: tokens {dict(too_long)}).",
            UserWarning,
            stacklevel=2,
        )
    enc = tokenizer(texts, padding="longest", truncation=True, max_length=max_sequence_length,
                    padding_side="right", return_tensors="np")
    return TokenizedPrompts(np.asarray(enc["input_ids"], np.int64), np.asarray(enc["attention_mask"], np.int64), texts)


def read_txt_offset(checkpoint: str | os.PathLike | None, default: int = REAL_TXT_OFFSET) -> int:
    """`txt_offset` from a Lens checkpoint's model_index.json (upstream hard-codes 97)."""
    if checkpoint is None:
        return default
    p = Path(checkpoint)
    index = p if p.name == "model_index.json" else p / "model_index.json"
    if not index.exists():
        return default
    return int(json.loads(index.read_text()).get("txt_offset", default))


def slice_features(hidden: Sequence[jax.Array], attention_mask, txt_offset: int) -> tuple[list[jax.Array], jax.Array]:
    """features = hidden[:, txt_offset:] for each layer, mask = attention_mask[:, txt_offset:] (bool)."""
    if txt_offset < 0:
        raise ValueError(f"txt_offset must be >= 0, got {txt_offset}.")
    mask = jnp.asarray(attention_mask)[:, txt_offset:].astype(bool)
    return [h[:, txt_offset:] for h in hidden], mask


@dataclass
class PromptFeatures:
    """Text conditioning for the DiT plus the tokenisation it came from."""

    features: list[jax.Array]  # one [B, L - txt_offset, hidden] per selected layer
    mask: jax.Array  # [B, L - txt_offset] bool
    tokens: TokenizedPrompts


def encode_prompts(text_encoder: Any, tokenizer, prompts: str | Sequence[str], txt_offset: int = REAL_TXT_OFFSET,
                   max_sequence_length: int = MAX_SEQUENCE_LENGTH,
                   date: str | _dt.date = DEFAULT_DATE, bucket: int = 1) -> PromptFeatures:
    """prompt(s) -> sliced multi-layer features and mask. `text_encoder(ids, mask)` -> list of [B, L, hidden].

    `bucket` > 1 right-pads the token ids to a multiple of it (pad token, mask 0) so the encoder
    compiles once per bucket; the encoder being causal, the padding changes no valid feature.
    """
    tokens = tokenize_prompts(tokenizer, prompts, max_sequence_length, date)
    extra = -tokens.input_ids.shape[1] % bucket
    if extra:
        tokens = TokenizedPrompts(
            np.pad(tokens.input_ids, ((0, 0), (0, extra)), constant_values=tokenizer.pad_token_id),
            np.pad(tokens.attention_mask, ((0, 0), (0, extra))),
            tokens.texts,
        )
    if tokens.input_ids.shape[1] <= txt_offset:
        warnings.warn(
            f"the tokenised prompts ({tokens.input_ids.shape[1]} tokens) do not reach txt_offset={txt_offset}; "
            "the features are empty. Is txt_offset right for this tokenizer and template?",
            UserWarning,
            stacklevel=2,
        )
    hidden = text_encoder(tokens.input_ids, tokens.attention_mask)
    features, mask = slice_features(hidden, tokens.attention_mask, txt_offset)
    return PromptFeatures(features, mask, tokens)

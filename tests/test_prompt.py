"""Lens prompt template, frozen date, tokenisation, offset slicing and masks."""

from __future__ import annotations

import datetime
import json

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from lens_jax.pipelines import prompt as P

from .conftest import FIXTURES

TINY = FIXTURES / "tiny_lens"
PROMPTS = ["A red cube on a wooden table next to a small green plant.", "A cat."]

# Shaped like the real GPT-OSS template: the date is read inside a macro via strftime_now.
DATED_TEMPLATE = (
    '{%- macro system_message() -%}Knowledge cutoff: 2024-06\nCurrent date: {{ strftime_now("%Y-%m-%d") }}'
    "{%- endmacro -%}"
    "{%- for m in messages -%}{%- if m['role'] == 'system' -%}<|start|>system<|message|>{{ system_message() }}"
    "\n{{ m['content'] }}<|end|>{%- elif m['role'] == 'user' -%}<|start|>user<|message|>{{ m['content'] }}<|end|>"
    "{%- else -%}<|start|>assistant<|channel|>final<|message|>{{ m['content'] }}<|return|>{%- endif -%}"
    "{%- endfor -%}"
)


@pytest.fixture()
def tokenizer():
    return P.load_tokenizer(TINY / "tokenizer")


@pytest.fixture(scope="module")
def golden():
    with safe_open(FIXTURES / "io_text_encoder.safetensors", "np") as f:
        meta = json.loads(f.metadata()["lens_golden"])
    return meta, load_file(FIXTURES / "io_text_encoder.safetensors")


def test_messages():
    m = P.lens_messages("a dog")
    assert [x["role"] for x in m] == ["system", "user", "assistant"]
    assert m[0]["content"] == P.SYSTEM_PROMPT and m[1]["content"] == "a dog"
    assert m[2] == {"role": "assistant", "thinking": P.THINKING, "content": ""}


def test_rendered_text_matches_golden(tokenizer, golden):
    meta, _ = golden
    texts = [P.render_prompt(tokenizer, p) for p in PROMPTS]
    assert texts == meta["rendered_texts"]
    assert not any(P.RETURN_TOKEN in t for t in texts)


def test_tokenisation_matches_golden(tokenizer, golden):
    _, g = golden
    tok = P.tokenize_prompts(tokenizer, PROMPTS)
    np.testing.assert_array_equal(tok.input_ids, g["input_ids"])
    np.testing.assert_array_equal(tok.attention_mask, g["attention_mask"])
    # right padding with the pad token
    assert tok.attention_mask[1, -1] == 0 and tok.input_ids[1, -1] == tokenizer.pad_token_id


def test_txt_offset_is_the_template_prefix(tokenizer):
    """54 tiny tokens = everything before the user prompt; the real checkpoint's 97 is the default."""
    assert P.read_txt_offset(TINY) == 54
    assert P.read_txt_offset(None) == P.REAL_TXT_OFFSET == 97
    tok = P.tokenize_prompts(tokenizer, PROMPTS[0])
    prefix = "<|start|>system<|message|>" + P.SYSTEM_PROMPT + "<|end|><|start|>user<|message|>"
    assert len(tokenizer(prefix)["input_ids"]) == 54
    assert tokenizer.decode(tok.input_ids[0, 54:]).startswith(PROMPTS[0])


def test_date_is_frozen_and_configurable(tokenizer):
    tokenizer.chat_template = DATED_TEMPLATE
    default = P.render_prompt(tokenizer, "x")
    assert "Current date: 2026-05-23\n" in default
    assert P.render_prompt(tokenizer, "x", date="2025-01-31").replace("2025-01-31", "2026-05-23") == default
    assert "Current date: 2024-02-29\n" in P.render_prompt(tokenizer, "x", date=datetime.date(2024, 2, 29))
    # everything else is what transformers renders (with today's date)
    today = tokenizer.apply_chat_template(P.lens_messages("x"), tokenize=False)
    assert default == today.replace(datetime.date.today().isoformat(), "2026-05-23").split(P.RETURN_TOKEN)[0]
    with pytest.raises(ValueError, match="YYYY-MM-DD"):
        P.render_prompt(tokenizer, "x", date="23/05/2026")


def test_freeze_clock_formats():
    t = P.freeze_clock('{{ strftime_now("%d %B %Y, %A %%Y") }}', "2026-05-23")
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    assert ImmutableSandboxedEnvironment().from_string(t).render() == "23 May 2026, Saturday %Y"
    assert P.freeze_clock("no clock here") == "no clock here"


def test_no_chat_template(tokenizer):
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        P.tokenize_prompts(tokenizer, "a cat")


def test_truncation_warns(tokenizer):
    with pytest.warns(UserWarning, match="exceed max_sequence_length=60"):
        tok = P.tokenize_prompts(tokenizer, PROMPTS, max_sequence_length=60)
    assert tok.input_ids.shape == (2, 60)


def test_pad_falls_back_to_eos(tokenizer):
    tokenizer.pad_token = None
    tok = P.tokenize_prompts(tokenizer, PROMPTS)
    assert tokenizer.pad_token == tokenizer.eos_token == "<|return|>"
    assert tok.input_ids[1, -1] == tokenizer.eos_token_id


def test_slice_features_and_encode():
    calls = []

    def fake_encoder(ids, mask):
        calls.append((ids, mask))
        base = jnp.arange(ids.shape[1], dtype=jnp.float32)[None, :, None] * jnp.ones((ids.shape[0], 1, 3))
        return [base, base + 100]

    tokenizer = P.load_tokenizer(TINY)
    res = P.encode_prompts(fake_encoder, tokenizer, PROMPTS, txt_offset=54)
    ids, mask = calls[0]
    assert res.mask.dtype == jnp.bool_ and res.mask.shape == (2, ids.shape[1] - 54)
    np.testing.assert_array_equal(np.asarray(res.mask), mask[:, 54:].astype(bool))
    assert [f.shape for f in res.features] == [(2, ids.shape[1] - 54, 3)] * 2
    assert float(res.features[0][0, 0, 0]) == 54 and float(res.features[1][0, 0, 0]) == 154
    with pytest.raises(ValueError, match="txt_offset"):
        P.slice_features([jnp.zeros((1, 4, 2))], np.ones((1, 4)), -1)

"""The prompt reasoner: rewrite a user's request into one concrete image prompt before encoding.

Two routes, the same contract (`reasoner(prompts) -> rewritten prompts`, one per prompt):

* `LocalReasoner`: the pipeline's own GPT-OSS text encoder decodes as a causal LM (its final
  norm and untied `lm_head`; `TextEncoder.generate`). The chat is [system: the rules, user: the
  prompt] rendered by the tokenizer's chat template with `reasoning_effort="low"` and the
  generation prompt; up to 4096 new tokens, temperature 0.7 (0 = greedy), all prompts as one
  left-padded batch. Decoding stops at `<|return|>` / `<|call|>` (the end of the assistant's
  turn); `<|end|>` only closes a message (the analysis channel ends with it before the final
  one), so it is not a stop token.
* `HttpReasoner`: an OpenAI-compatible `/chat/completions` endpoint (`api_url`, `api_key` or the
  `LENS_REASONER_API_KEY` / `OPENAI_API_KEY` environment variables, `api_model`), with a
  timeout; any failure is one `ReasonerError` naming the endpoint and the cause.

The answer is the LAST Harmony `final` channel of the output (a plain reply without channels is
taken whole on the HTTP route), cleaned of control tokens, code fences, surrounding quotes and
extra whitespace. An empty answer falls back to the user's prompt. Negative prompts never pass
through here.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import InputError, ReasonerError

__all__ = [
    "SYSTEM_PROMPT",
    "REASONING_EFFORT",
    "MAX_NEW_TOKENS",
    "TEMPERATURE",
    "API_KEY_ENV",
    "load_system_prompt",
    "parse_final",
    "clean_answer",
    "LocalReasoner",
    "HttpReasoner",
    "make_reasoner",
]

SYSTEM_PROMPT = """You turn a user's request into a prompt for a text-to-image model.

Rules:
- Write exactly one prompt that depicts what the user asked for, concretely and faithfully. Do not add \
subjects, styles or details that change what was asked.
- Output only the prompt: no commentary, no alternatives, no questions, no hedging, no lists, no Markdown, \
no quotes around it.
- When the request has several similar subjects (people, animals, objects), describe each one separately \
so that they stay distinct.
- Cover the whole scene: subjects, their appearance and placement, the setting, lighting and overall style. \
If the request is already a detailed prompt, keep it essentially as it is.
- Work out simple inferences the picture needs: for example, "2+2 written on a blackboard" becomes a \
blackboard that reads "2+2=4".
- Answer in the language the user wrote in.
- Think privately; the final answer contains nothing but the prompt."""

REASONING_EFFORT = "low"
MAX_NEW_TOKENS = 4096
TEMPERATURE = 0.7
API_KEY_ENV = ("LENS_REASONER_API_KEY", "OPENAI_API_KEY")
DEFAULT_TIMEOUT = 120.0

_FINAL = re.compile(
    r"<\|channel\|>\s*final\b[^<]*(?:<\|constrain\|>[^<]*)?<\|message\|>(.*?)(?=<\|(?:end|return|call|start)\|>|\Z)",
    re.DOTALL,
)
_CHANNEL = re.compile(r"<\|channel\|>")
_CONTROL = re.compile(r"<\|[A-Za-z0-9_]+\|>")
_FENCE = re.compile(r"^\s*```[^\n`]*\n?(.*?)\n?```\s*$", re.DOTALL)
_QUOTES = [('"', '"'), ("'", "'"), ("\u201c", "\u201d"), ("\u2018", "\u2019"), ("\u00ab", "\u00bb"), ("`", "`")]


def load_system_prompt(path: str | os.PathLike | None) -> str:
    """The reasoner's system prompt: the built-in rules, or the text of `path` (UTF-8, non-empty)."""
    if path is None:
        return SYSTEM_PROMPT
    p = Path(path)
    if not p.is_file():
        raise InputError(f"reasoner system prompt file {p} does not exist; pass a UTF-8 text file.")
    text = p.read_text(encoding="utf-8").strip()
    if not text:
        raise InputError(f"reasoner system prompt file {p} is empty; write the rules into it.")
    return text


def clean_answer(text: str) -> str:
    """Drop control tokens, a wrapping code fence, wrapping quotes and extra whitespace."""
    text = _CONTROL.sub(" ", text).strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1).strip()
    text = text.replace("```", " ").strip()
    changed = True
    while changed and len(text) >= 2:
        changed = False
        for left, right in _QUOTES:
            if text.startswith(left) and text.endswith(right) and len(text) >= len(left) + len(right):
                text = text[len(left): len(text) - len(right)].strip()
                changed = True
    return " ".join(text.split())


def parse_final(text: str, plain_fallback: bool = False) -> str:
    """The cleaned content of the last Harmony `final` channel of `text` ("" when there is none).

    `plain_fallback`: a reply with no channel markup at all is taken whole (chat APIs return the
    final answer as plain text).
    """
    finals = _FINAL.findall(text)
    if finals:
        return clean_answer(finals[-1])
    if plain_fallback and not _CHANNEL.search(text):
        return clean_answer(text)
    return ""


def _or_prompt(answer: str, prompt: str) -> str:
    return answer if answer else prompt


# ----------------------------------------------------------------------------- local route


@dataclass
class LocalReasoner:
    """Rewrite prompts with the pipeline's GPT-OSS weights (`text_encoder.generate`)."""

    text_encoder: Any
    tokenizer: Any
    system_prompt: str = SYSTEM_PROMPT
    max_new_tokens: int = MAX_NEW_TOKENS
    temperature: float = TEMPERATURE
    top_p: float = 1.0
    seed: int = 0

    def messages(self, prompt: str) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": prompt}]

    def render(self, prompt: str) -> str:
        return self.tokenizer.apply_chat_template(self.messages(prompt), tokenize=False, add_generation_prompt=True,
                                                  reasoning_effort=REASONING_EFFORT)

    def stop_tokens(self) -> tuple[int, ...]:
        ids = []
        for tok in ("<|return|>", "<|call|>"):
            i = self.tokenizer.convert_tokens_to_ids(tok)
            if isinstance(i, int) and i != self.tokenizer.unk_token_id and i >= 0:
                ids.append(i)
        if not ids:
            raise InputError("the tokenizer has no <|return|> token; the reasoner needs GPT-OSS's harmony tokenizer.")
        return tuple(ids)

    def generate_raw(self, prompts: Sequence[str]) -> list[str]:
        """The decoded outputs (special tokens kept) for each prompt."""
        texts = [self.render(p) for p in prompts]
        enc = self.tokenizer(texts, padding="longest", padding_side="left", return_tensors="np")
        tokens = self.text_encoder.generate(
            np.asarray(enc["input_ids"]), np.asarray(enc["attention_mask"]), max_new_tokens=self.max_new_tokens,
            temperature=self.temperature, top_p=self.top_p, seed=self.seed, stop_tokens=self.stop_tokens(),
        )
        return self.tokenizer.batch_decode(tokens.tolist(), skip_special_tokens=False)

    def __call__(self, prompts: Sequence[str]) -> list[str]:
        return [_or_prompt(parse_final(out), p) for p, out in zip(prompts, self.generate_raw(prompts))]


# ----------------------------------------------------------------------------- HTTP route


def _endpoint(api_url: str) -> str:
    url = api_url.rstrip("/")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


@dataclass
class HttpReasoner:
    """Rewrite prompts with an OpenAI-compatible chat endpoint (one request per prompt)."""

    api_url: str
    api_model: str
    api_key: str | None = None
    system_prompt: str = SYSTEM_PROMPT
    temperature: float = TEMPERATURE
    max_new_tokens: int = MAX_NEW_TOKENS
    timeout: float = DEFAULT_TIMEOUT

    def __post_init__(self):
        if not self.api_url or not re.match(r"^https?://", self.api_url):
            raise InputError(f"--api-url must be an http(s) URL, got {self.api_url!r}.")
        if not self.api_model:
            raise InputError("the HTTP reasoner needs --api-model (the model name the endpoint serves).")
        if self.api_key is None:
            self.api_key = next((os.environ[k] for k in API_KEY_ENV if os.environ.get(k)), None)
        if not self.api_key:
            raise InputError(f"the HTTP reasoner needs --api-key or one of the environment variables {API_KEY_ENV}.")
        if not self.timeout > 0:
            raise InputError(f"the reasoner timeout must be > 0 seconds, got {self.timeout}.")

    def request(self, prompt: str) -> str:
        import httpx

        url = _endpoint(self.api_url)
        body = {
            "model": self.api_model,
            "messages": [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": prompt}],
            "temperature": self.temperature,
            "max_tokens": self.max_new_tokens,
        }
        headers = {"Authorization": f"Bearer {self.api_key}"}
        try:
            reply = httpx.post(url, json=body, headers=headers, timeout=self.timeout)
        except httpx.TimeoutException:
            raise ReasonerError(f"the reasoner endpoint {url} did not answer within {self.timeout:g} s; raise the "
                                "timeout (--api-timeout) or check the server.") from None
        except httpx.HTTPError as e:
            raise ReasonerError(f"could not reach the reasoner endpoint {url} ({type(e).__name__}: {e}); check "
                                "--api-url.") from None
        if reply.status_code != 200:
            hint = " check --api-key (or $LENS_REASONER_API_KEY)." if reply.status_code in (401, 403) else ""
            raise ReasonerError(f"the reasoner endpoint {url} answered HTTP {reply.status_code}: "
                                f"{reply.text[:200].strip()!r};{hint}")
        try:
            content = reply.json()["choices"][0]["message"]["content"]
            if not isinstance(content, str):
                raise TypeError("content is not a string")
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise ReasonerError(f"the reasoner endpoint {url} sent a malformed reply (expected OpenAI chat "
                                f"completions JSON with choices[0].message.content; {type(e).__name__}: {e}).") from None
        return content

    def __call__(self, prompts: Sequence[str]) -> list[str]:
        return [_or_prompt(parse_final(self.request(p), plain_fallback=True), p) for p in prompts]


def make_reasoner(text_encoder_getter, tokenizer, *, system_prompt: str | None = None, api_url: str | None = None,
                  api_key: str | None = None, api_model: str | None = None, api_timeout: float = DEFAULT_TIMEOUT,
                  max_new_tokens: int = MAX_NEW_TOKENS, temperature: float = TEMPERATURE, seed: int = 0):
    """The HTTP reasoner when `api_url` or `api_model` is given, else the local one.

    `text_encoder_getter()` returns the text encoder (called only for the local route).
    """
    system_prompt = system_prompt or SYSTEM_PROMPT
    if api_url or api_model:
        if not (api_url and api_model):
            raise InputError("the HTTP reasoner needs both --api-url and --api-model.")
        return HttpReasoner(api_url, api_model, api_key, system_prompt, temperature, max_new_tokens, api_timeout)
    return LocalReasoner(text_encoder_getter(), tokenizer, system_prompt, max_new_tokens, temperature, seed=seed)

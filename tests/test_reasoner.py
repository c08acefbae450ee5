"""The prompt reasoner: Harmony parsing, the local route's wiring, the HTTP route against a local server."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from lens_jax.errors import InputError, ReasonerError
from lens_jax.pipelines import reasoner as rs
from lens_jax.pipelines.prompt import load_tokenizer

from .conftest import FIXTURES

# ----------------------------------------------------------------------------- parsing

ANALYSIS = "<|channel|>analysis<|message|>The user wants a cat. Let me think.<|end|>"


@pytest.mark.parametrize("text, expected", [
    (ANALYSIS, ""),  # analysis only: nothing to use
    (ANALYSIS + "<|start|>assistant<|channel|>final<|message|>A grey cat on a red sofa.<|return|>",
     "A grey cat on a red sofa."),
    (ANALYSIS + "<|start|>assistant<|channel|>final<|message|>first try<|end|>"
     "<|start|>assistant<|channel|>final<|message|>the second, better one<|return|>", "the second, better one"),
    ("<|channel|>final<|message|>  a   dog\n\n running <|call|><|start|>", "a dog running"),  # whitespace, control
    ("<|channel|>final<|message|>```text\nA blackboard that reads \"2+2=4\".\n```<|return|>",
     'A blackboard that reads "2+2=4".'),  # code fence
    ("<|channel|>final<|message|>\u201cUn chat gris sur un canap\u00e9 rouge.\u201d<|return|>",
     "Un chat gris sur un canap\u00e9 rouge."),  # typographic quotes
    ("<|channel|>final <|constrain|>text<|message|>'quoted' <|reserved_200013|>answer", "'quoted' answer"),
    ("<|channel|>final<|message|>cut off by the token cap", "cut off by the token cap"),
])
def test_parse_final(text, expected):
    assert rs.parse_final(text) == expected


def test_plain_reply_is_taken_whole_only_on_request():
    assert rs.parse_final("  \"A red cube.\"  ", plain_fallback=True) == "A red cube."
    assert rs.parse_final("A red cube.") == ""
    assert rs.parse_final(ANALYSIS, plain_fallback=True) == ""  # channel markup but no final


def test_system_prompt_file(tmp_path):
    assert "one prompt" in rs.load_system_prompt(None)
    f = tmp_path / "rules.txt"
    f.write_text("Only rewrite.\n", encoding="utf-8")
    assert rs.load_system_prompt(f) == "Only rewrite."
    with pytest.raises(InputError, match="does not exist"):
        rs.load_system_prompt(tmp_path / "missing.txt")
    f.write_text("  \n")
    with pytest.raises(InputError, match="empty"):
        rs.load_system_prompt(f)


# ----------------------------------------------------------------------------- local route (wiring)


class _ScriptedLM:
    """Stands in for TextEncoder.generate: returns the token ids of scripted outputs and records the call."""

    def __init__(self, tokenizer, outputs):
        self.tokenizer, self.outputs, self.calls = tokenizer, outputs, []

    def generate(self, input_ids, attention_mask=None, **kw):
        self.calls.append((np.asarray(input_ids), np.asarray(attention_mask), kw))
        rows = [self.tokenizer(o, add_special_tokens=False)["input_ids"] for o in self.outputs]
        n = max(map(len, rows))
        return np.asarray([r + [self.tokenizer.pad_token_id] * (n - len(r)) for r in rows])


def test_local_reasoner_renders_left_pads_and_falls_back():
    tok = load_tokenizer(FIXTURES / "tiny_lens" / "tokenizer")
    outputs = [ANALYSIS + "<|start|>assistant<|channel|>final<|message|>a cat<|return|>", ANALYSIS]
    lm = _ScriptedLM(tok, outputs)
    got = rs.LocalReasoner(lm, tok, temperature=0.0, max_new_tokens=7)(["cat", "a much longer second prompt"])
    assert got == ["a cat", "a much longer second prompt"]  # no final channel -> the user's prompt
    ids, mask, kw = lm.calls[0]
    assert mask[0, 0] == 0 and mask[:, -1].all()  # left padding
    text = tok.decode(ids[1])
    assert text.startswith("<|start|>system<|message|>" + rs.SYSTEM_PROMPT[:20]) and text.endswith("<|start|>assistant")
    assert kw["max_new_tokens"] == 7 and kw["temperature"] == 0.0
    assert kw["stop_tokens"] == (tok.convert_tokens_to_ids("<|return|>"), tok.convert_tokens_to_ids("<|call|>"))


# ----------------------------------------------------------------------------- HTTP route


class _Handler(BaseHTTPRequestHandler):
    release = threading.Event()

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.headers.get("Authorization") != "Bearer good-key":
            return self._send(401, b'{"error": "invalid api key"}')
        if self.path.startswith("/slow"):
            self.release.wait(5)  # held until the test has seen its timeout
            return self._send(200, b"{}")
        if self.path.startswith("/bad"):
            return self._send(200, b'{"choices": []}')
        assert body["messages"][0]["role"] == "system" and body["model"] == "m"
        content = "<|channel|>final<|message|>REWRITTEN " + body["messages"][1]["content"] + "<|return|>"
        if body["messages"][1]["content"] == "plain":
            content = "  'A plain answer.'  "
        if body["messages"][1]["content"] == "empty":
            content = ""
        return self._send(200, json.dumps({"choices": [{"message": {"content": content}}]}).encode())

    def _send(self, status, payload):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture(scope="module")
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    _Handler.release.set()
    srv.shutdown()
    srv.server_close()


def test_http_success(server):
    r = rs.HttpReasoner(server + "/ok/v1", "m", "good-key", timeout=5)
    assert r(["a cat", "plain", "empty"]) == ["REWRITTEN a cat", "A plain answer.", "empty"]


def test_http_key_from_environment(server, monkeypatch):
    monkeypatch.setenv("LENS_REASONER_API_KEY", "good-key")
    assert rs.HttpReasoner(server + "/ok/v1/chat/completions", "m", timeout=5)(["x"]) == ["REWRITTEN x"]
    monkeypatch.delenv("LENS_REASONER_API_KEY")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(InputError, match="--api-key"):
        rs.HttpReasoner(server + "/ok/v1", "m")


def test_http_401(server):
    with pytest.raises(ReasonerError, match="HTTP 401.*--api-key"):
        rs.HttpReasoner(server + "/ok/v1", "m", "wrong", timeout=5)(["x"])


def test_http_timeout(server):
    with pytest.raises(ReasonerError, match="did not answer within 0.3 s"):
        rs.HttpReasoner(server + "/slow/v1", "m", "good-key", timeout=0.3)(["x"])


def test_http_malformed_reply(server):
    with pytest.raises(ReasonerError, match="malformed reply"):
        rs.HttpReasoner(server + "/bad/v1", "m", "good-key", timeout=5)(["x"])


def test_http_unreachable_and_bad_settings():
    with pytest.raises(ReasonerError, match="could not reach"):
        rs.HttpReasoner("http://127.0.0.1:9/v1", "m", "k", timeout=2)(["x"])
    with pytest.raises(InputError, match="http"):
        rs.HttpReasoner("ftp://x", "m", "k")
    with pytest.raises(InputError, match="both --api-url and --api-model"):
        rs.make_reasoner(lambda: None, None, api_url="http://127.0.0.1:9")

"""The optional judge: JSON parsing, and an OpenAI-compatible endpoint served on loopback."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from sieve.evals.judge import OpenAIJudge, make_judge, parse_verdict


class _Fake(BaseHTTPRequestHandler):
    seen: list[dict] = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Fake.seen.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        answer = '{"follows_prompt": true, "sensible": true, "explanation": "checks a property"}'
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):  # quiet
        pass


@pytest.fixture()
def endpoint():
    server = HTTPServer(("127.0.0.1", 0), _Fake)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_openai_compatible_judge(endpoint, monkeypatch):
    monkeypatch.setenv("SIEVE_JUDGE_BASE_URL", endpoint)
    monkeypatch.setenv("SIEVE_JUDGE_API_KEY", "k")
    monkeypatch.setenv("SIEVE_JUDGE_MODEL", "judge-1")
    v = make_judge("openai")("def f(x):\n    return x\n", "def test_fuzz():\n    assert f(1) == 1\n")
    assert v.follows_prompt is True and v.sensible is True
    req = _Fake.seen[-1]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer k" and req["body"]["model"] == "judge-1"
    assert "def test_fuzz" in req["body"]["messages"][0]["content"]


def test_unreachable_judge_gives_no_verdict_not_an_error():
    v = OpenAIJudge(base_url="http://127.0.0.1:9/v1", timeout_s=2)("def f(): pass", "def test(): pass")
    assert v.follows_prompt is None and "unavailable" in v.explanation


def test_parse_verdict_variants():
    assert parse_verdict('```json\n{"follows_prompt": false, "sensible": true}\n```').follows_prompt is False
    assert parse_verdict('{"follows_prompt": "yes"}').follows_prompt is None
    assert parse_verdict("{not json}").sensible is None
    with pytest.raises(ValueError, match="judge_model"):
        make_judge("hf")
    assert make_judge("off") is None

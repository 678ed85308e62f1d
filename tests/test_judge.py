"""The optional judge: JSON parsing; an OpenAI-compatible endpoint on loopback that rate-limits (429),
fails, and counts requests in flight; resume retries failed judgements; the local judge batches."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from sieve.errors import SieveError
from sieve.evals.judge import HFJudge, OpenAIJudge, judge_rows, make_judge, parse_verdict
from sieve.results import ResultStore

ANSWER = '{"follows_prompt": true, "sensible": false, "explanation": "no assertion"}'


class _Server:
    """A fake chat-completions server: the first ``rate_limited`` requests get 429 (Retry-After 10 ms),
    requests whose test contains ``BROKEN`` get 500 every time; all others answer ``ANSWER``."""

    def __init__(self, rate_limited: int = 0, barrier: int = 0) -> None:
        self.lock = threading.Lock()
        self.seen: list[dict] = []
        self.rate_limited = rate_limited
        self.statuses: list[int] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.barrier = threading.Barrier(barrier, timeout=20) if barrier else None
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    server.seen.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                    limited = server.rate_limited > 0
                    server.rate_limited -= limited
                try:
                    if server.barrier is not None and not limited:
                        server.barrier.wait()  # released only when `barrier` requests are in flight at once
                    prompt = body["messages"][0]["content"]
                    if limited:
                        self._send(429, {"error": {"message": "slow down", "type": "rate_limit"}},
                                   {"retry-after-ms": "10"})
                    elif "BROKEN" in prompt:
                        self._send(500, {"error": {"message": "boom", "type": "server_error"}},
                                   {"retry-after-ms": "1"})
                    else:
                        self._send(200, {"id": "c", "object": "chat.completion", "created": 0, "model": body["model"],
                                         "choices": [{"index": 0, "finish_reason": "stop",
                                                      "message": {"role": "assistant", "content": ANSWER}}]})
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def _send(self, status, obj, headers=None):
                payload = json.dumps(obj).encode()
                with server.lock:
                    server.statuses.append(status)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):  # quiet
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


@pytest.fixture()
def server():
    made: list[_Server] = []

    def make(**kw) -> _Server:
        made.append(_Server(**kw))
        return made[-1]

    yield make
    for s in made:
        s.close()


def test_openai_compatible_judge_from_the_environment(server, monkeypatch):
    srv = server()
    monkeypatch.setenv("SIEVE_JUDGE_BASE_URL", srv.url)
    monkeypatch.setenv("SIEVE_JUDGE_API_KEY", "k")
    monkeypatch.setenv("SIEVE_JUDGE_MODEL", "judge-1")
    v = make_judge("openai")("def f(x):\n    return x\n", "def test_fuzz():\n    assert f(1) == 1\n")
    assert (v.follows_prompt, v.sensible, v.failed) == (True, False, False)
    req = srv.seen[-1]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer k" and req["body"]["model"] == "judge-1"
    assert "def test_fuzz" in req["body"]["messages"][0]["content"]


def test_rate_limits_are_retried_until_answered(server):
    srv = server(rate_limited=3)
    judge = OpenAIJudge(base_url=srv.url, api_key="k", model="m", max_retries=4, concurrency=1)
    v = judge("def f(): pass", "def test(): pass")
    assert v.follows_prompt is True and not v.failed
    assert srv.statuses == [429, 429, 429, 200]  # the client retried the same request three times


def test_concurrency_is_bounded_and_used(server):
    srv = server(barrier=3)  # a request is answered only once 3 are in flight together
    judge = OpenAIJudge(base_url=srv.url, api_key="k", model="m", max_retries=0, concurrency=3)
    verdicts = judge.judge_many([("def f(): pass", f"def test_{i}(): pass") for i in range(9)])
    assert [v.follows_prompt for v in verdicts] == [True] * 9
    assert srv.max_in_flight == 3


def test_failed_judgements_are_not_stored_and_retried_on_resume(server, tmp_path):
    srv = server()
    judge = OpenAIJudge(base_url=srv.url, api_key="k", model="m", max_retries=1, concurrency=2)
    rows = [{"key": f"r{i}", "function": "def f(): pass", "code": f"def test_{i}(): pass  # {tag}"}
            for i, tag in enumerate(["ok", "BROKEN", "ok", "BROKEN", "ok"])]
    store = ResultStore(tmp_path / "judge")
    assert judge_rows(judge, rows, store) == (3, 2)
    assert sorted(store.done_keys()) == ["r0", "r2", "r4"]
    assert srv.statuses.count(500) == 4  # each broken row: the request and one retry
    # The endpoint recovers; the next run asks only about the two that failed.
    fixed = [{**r, "code": r["code"].replace("BROKEN", "fine")} for r in rows]
    n_before = len(srv.seen)
    assert judge_rows(judge, fixed, store) == (2, 0)
    assert len(srv.seen) - n_before == 2
    table = store.table()
    assert table.height == 5 and table["judge_follows"].to_list() == [True] * 5


def test_unreachable_judge_gives_a_failed_verdict_not_an_error():
    v = OpenAIJudge(base_url="http://127.0.0.1:9/v1", api_key="k", timeout_s=2, max_retries=0)("def f(): pass",
                                                                                               "def test(): pass")
    assert v.failed and v.follows_prompt is None and "unavailable" in v.explanation


def test_configuration_errors_before_any_work(monkeypatch):
    monkeypatch.delenv("SIEVE_JUDGE_BASE_URL", raising=False)
    monkeypatch.delenv("SIEVE_JUDGE_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(SieveError, match="needs an API key: set SIEVE_JUDGE_API_KEY"):
        make_judge("openai")
    monkeypatch.setenv("SIEVE_JUDGE_API_KEY", "k")
    monkeypatch.setenv("SIEVE_JUDGE_CONCURRENCY", "many")
    with pytest.raises(SieveError, match="SIEVE_JUDGE_CONCURRENCY='many' must be a whole number"):
        make_judge("openai")
    with pytest.raises(SieveError, match="judge_model"):
        make_judge("hf")
    with pytest.raises(SieveError, match="allowed: off, openai, hf"):
        make_judge("gpt")
    assert make_judge("off") is None


def test_parse_verdict_variants():
    assert parse_verdict('```json\n{"follows_prompt": false, "sensible": true}\n```').follows_prompt is False
    assert parse_verdict('{"follows_prompt": "yes"}').follows_prompt is None
    assert parse_verdict("{not json}").sensible is None


def test_local_judge_runs_one_batched_generation(tiny_models, monkeypatch):
    import sieve.generation as generation

    calls: list[int] = []
    real = generation.generate

    def spy(model, prompts, *a, **kw):
        calls.append(len(prompts))
        return real(model, prompts, *a, **kw)

    monkeypatch.setattr(generation, "generate", spy)
    judge = HFJudge(tiny_models["llama"], max_new_tokens=6, batch_size=8)
    items = [("def f(x):\n    return x", f"def test_{i}():\n    assert f({i}) == {i}") for i in range(5)]
    verdicts = judge.judge_many(items)
    assert calls == [5]  # one batched call, not one per test
    assert len(verdicts) == 5 and not any(v.failed for v in verdicts)
    # a random tiny model writes no JSON: every verdict is "no answer", none is invented
    assert all(v.follows_prompt is None and v.sensible is None for v in verdicts)
    one = judge(*items[2])
    assert one.explanation == verdicts[2].explanation  # greedy: the same text alone as in the batch

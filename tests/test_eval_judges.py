"""Judges of open-ended answers: the reply parser on many replies, and the HTTP judge
against a real loopback server (success, rate limit, server errors, a malformed body,
a timeout) and through ``vstream eval``."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from tiny_models import tiny_llama

from vstream import synth
from vstream.cli import main
from vstream.errors import ConfigError
from vstream.evaluate import HTTPJudge, JudgeError, JudgeScore, parse_judge_reply
from vstream.evaluate.judges import JUDGE_SYSTEM


@pytest.mark.parametrize(("reply", "correct", "score"), [
    ("{'pred': 'yes', 'score': 4}", True, 4.0),
    ('{"pred": "no", "score": 1}', False, 1.0),
    ("Sure! {'pred': 'Yes', 'score': 5} is my evaluation.", True, 5.0),
    ('```json\n{"pred": "no", "score": 0}\n```', False, 0.0),
    ("{'pred': 'yes', 'score': '3'}", True, 3.0),
    ("{'Pred': 'YES', 'Score': 4.5}", True, 4.5),
    ('{"correct": true, "score": 5}', True, 5.0),
    ("yes, 4", True, 4.0),
    ("Yes. Score: 3", True, 3.0),
    ("pred: no\nscore: 2", False, 2.0),
    ("No, the prediction is wrong (1/5).", False, 1.0),
    ("Correct. 5", True, 5.0),
    ("incorrect", False, None),
    ("yes", True, None),
    ("score: 4", None, 4.0),
    ("{'pred': 'yes', 'score': 9}", True, None),  # out of 0-5: no score
])
def test_parse_judge_reply(reply, correct, score):
    verdict = parse_judge_reply(reply)
    assert (verdict.correct, verdict.score) == (correct, score)


@pytest.mark.parametrize("reply", ["", "I cannot evaluate this.", "{'pred': 'maybe'}", "{not a dict", "🙂"])
def test_unreadable_replies_are_recorded_not_raised(reply):
    verdict = parse_judge_reply(reply)
    assert (verdict.correct, verdict.score) == (None, None) and verdict.reason.startswith("unparsed reply")


class _Server:
    """A loopback chat-completions server answering from a script: one entry per
    request, each ``(status, body)`` or ``("sleep", seconds)``; the last repeats."""

    def __init__(self, script):
        self.script, self.requests = list(script), []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers["Content-Length"])
                outer.requests.append((self.path, dict(self.headers), json.loads(self.rfile.read(length))))
                step = outer.script.pop(0) if len(outer.script) > 1 else outer.script[0]
                if step[0] == "sleep":
                    time.sleep(step[1])
                    step = (200, _completion("{'pred': 'yes', 'score': 5}"))
                status, body = step
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                if status == 429:
                    self.send_header("Retry-After", "0")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _completion(content: str) -> dict:
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}


def test_http_judge_posts_a_chat_completion_and_reads_the_verdict():
    with _Server([(200, _completion("{'pred': 'yes', 'score': 4}"))]) as server:
        judge = HTTPJudge(server.url + "/v1", "judge-model", api_key="secret", timeout=5)
        verdict = judge.judge("What colour?", "red", "It is red.")
    assert verdict == JudgeScore(True, 4.0, "{'pred': 'yes', 'score': 4}")
    ((path, headers, body),) = server.requests
    assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer secret"
    assert body["model"] == "judge-model" and body["temperature"] == 0
    assert body["messages"][0] == {"role": "system", "content": JUDGE_SYSTEM}
    assert "Correct answer: red" in body["messages"][1]["content"]
    assert "Predicted answer: It is red." in body["messages"][1]["content"]


def test_http_judge_retries_a_rate_limit_then_succeeds():
    with _Server([(429, {"error": "slow down"}), (200, _completion("no, 1"))]) as server:
        verdict = HTTPJudge(server.url, "m", timeout=5, backoff=0.01).judge("Q?", "red", "blue")
    assert (verdict.correct, verdict.score) == (False, 1.0) and len(server.requests) == 2
    assert server.requests[0][0] == "/v1/chat/completions" and "Authorization" not in server.requests[0][1]


def test_http_judge_gives_up_after_its_retries_on_server_errors():
    with _Server([(500, {"error": "boom"})]) as server:
        judge = HTTPJudge(server.url, "m", timeout=5, retries=2, backoff=0.01)
        with pytest.raises(JudgeError, match=r"judge http://127\.0\.0\.1:\d+/v1/chat/completions: HTTP 500 .*boom"
                                             r".*after 3 tries"):
            judge.judge("Q?", "red", "blue")
    assert len(server.requests) == 3


def test_http_judge_does_not_retry_a_client_error():
    with _Server([(401, {"error": "bad key"})]) as server, pytest.raises(JudgeError, match="HTTP 401.*bad key"):
        HTTPJudge(server.url, "m", timeout=5, backoff=0.01).judge("Q?", "red", "blue")
    assert len(server.requests) == 1


@pytest.mark.parametrize("body", [b"<html>oops</html>", b'{"choices": []}', b'{"result": "yes"}'])
def test_http_judge_names_a_body_that_is_not_a_chat_completion(body):
    expected = r"/v1/chat/completions: the reply is not a chat completion"
    with _Server([(200, body)]) as server, pytest.raises(JudgeError, match=expected):
        HTTPJudge(server.url + "/v1/chat/completions", "m", timeout=5).judge("Q?", "red", "blue")


def test_http_judge_times_out_retries_and_gives_up():
    with _Server([("sleep", 1.0)]) as server:
        judge = HTTPJudge(server.url, "m", timeout=0.2, retries=1, backoff=0.01)
        started = time.monotonic()
        with pytest.raises(JudgeError, match=r"timed out \(after 2 tries, 0.2 s each\)"):
            judge.judge("Q?", "red", "blue")
    assert time.monotonic() - started < 3 and len(server.requests) == 2


def test_http_judge_names_an_unreachable_endpoint():
    with _Server([(200, _completion("yes"))]) as server:
        url = server.url  # closed below: nothing listens there any more
    with pytest.raises(JudgeError, match=f"judge {url}/v1/chat/completions: .*after 1 tries"):
        HTTPJudge(url, "m", timeout=2, retries=0).judge("Q?", "red", "blue")


@pytest.mark.parametrize(("args", "message"), [
    (("ftp://host", "m"), "http:// or https://"),
    (("localhost:8000", "m"), "http:// or https://"),
    (("http://host", ""), "model name"),
    (("http://host", "m", None, 0), "timeout"),
    (("http://host", "m", None, 5, -1), "retries"),
])
def test_http_judge_refuses_bad_settings(args, message):
    with pytest.raises(ConfigError, match=message):
        HTTPJudge(*args)


def test_cli_judge_flags_are_checked(tmp_path, capsys):
    base = ["eval", str(Path(__file__).parent / "data" / "eval" / "vstreamqa.json"), str(tmp_path), "--format", "vstreamqa", "--out",
            str(tmp_path / "r.jsonl")]
    for extra, message in [(["--judge", "model", "--judge-endpoint", "http://h"], "not both"),
                           (["--judge-model", "m"], "--judge-endpoint server"),
                           (["--judge", "gpt"], "model or model:HUB_ID_OR_FOLDER"),
                           (["--judge-endpoint", "http://h"], "needs --judge-model"),
                           (["--answers", "a.json"], "egoschema questions only"),
                           (["--benchmark", "nope"], "no published figures; known: videomme"),
                           (["--judge-endpoint", "http://h", "--judge-model", "m", "--judge-key-env",
                             "VSTREAM_TEST_NO_SUCH_VAR"], "no such environment variable")]:
        assert main(base + extra) == 1
        assert message in capsys.readouterr().err, extra


def test_cli_eval_with_an_http_judge_and_a_model_judge(tmp_path, capsys):
    synth.write_clip(tmp_path / "clip_a.mp4", duration=3.0, fps=10.0, size=(64, 48), audio=False)
    annotations = tmp_path / "qa.json"
    annotations.write_text(json.dumps([{"id": "q1", "video_id": "clip_a", "question": "What is shown?",
                                        "answer": "a test pattern", "end_time": 1.0},
                                       {"id": "q2", "video_id": "clip_a", "question": "And at the end?",
                                        "answer": "the same pattern"}]))
    model = str(tiny_llama(tmp_path / "llama"))
    base = ["eval", str(annotations), str(tmp_path), "--format", "vstreamqa", "--model", model, "--no-asr",
            "--max-new-tokens", "4", "--quiet"]
    with _Server([(200, _completion("{'pred': 'yes', 'score': 4}"))]) as server:
        out = tmp_path / "http.jsonl"
        assert main(base + ["--out", str(out), "--judge-endpoint", server.url, "--judge-model", "m"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(server.requests) == 2 and all(r["judge_correct"] is True and r["judge_score"] == 4.0 for r in rows)
    table = capsys.readouterr().out.splitlines()
    assert "judge acc" in table[0] and table[-2].split()[-3:] == ["2", "100.0%", "4.00"]

    out = tmp_path / "model.jsonl"
    assert main(base + ["--out", str(out), "--judge", "model"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(r["judge"] == f"model:{model}" and "judge_reason" in r for r in rows)

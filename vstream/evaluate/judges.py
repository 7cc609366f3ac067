"""Judges of open-ended answers: a language model reads the question, the reference and
the prediction and says whether they match (yes/no) with a score from 0 to 5, as in
the Video-ChatGPT protocol that VStream-QA uses.

- ``ModelJudge(chat_model)``: a local vstream ``ChatModel``, text only.
- ``HTTPJudge(endpoint, model)``: an OpenAI-compatible ``/v1/chat/completions`` server,
  called with the standard library; nothing is sent anywhere unless one is built.

Both go through ``Judge.judge``, which builds the prompt and reads the reply with
``parse_judge_reply``: a reply it cannot read gives ``JudgeScore(None, None, reason)``,
recorded as unparsed, never an exception. The deterministic scorer
(``scoring.score_open``) runs whether or not a judge does.
"""

from __future__ import annotations

import ast
import json
import re
import time
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from dataclasses import dataclass

from vstream.config import check_int, check_number
from vstream.errors import ConfigError, JudgeError

JUDGE_SYSTEM = (
    "You evaluate answers to questions about videos. Compare the predicted answer with the correct answer and "
    "decide whether they mean the same thing. Paraphrases and synonyms count as a match; a wrong or missing fact "
    "does not."
)
JUDGE_PROMPT = (
    "Question: {question}\nCorrect answer: {reference}\nPredicted answer: {prediction}\n"
    "Reply with a Python dictionary only, with two keys: 'pred', the string 'yes' when the predicted answer "
    "matches the correct answer and 'no' otherwise, and 'score', an integer from 0 to 5 (5: a perfect match). "
    "For example: {{'pred': 'yes', 'score': 4}}"
)
MAX_SCORE = 5.0



@dataclass
class JudgeScore:
    """A judge's verdict on one answer.

    Attributes:
        correct: whether the prediction matches the reference; None when the reply
            gave no verdict.
        score: 0 (no match) to 5 (perfect match); None when the reply gave none.
        reason: the judge's reply, or why it could not be read.
    """

    correct: bool | None
    score: float | None
    reason: str


class Judge(ABC):
    """Scores a prediction against a reference with a language model's help."""

    name = "judge"

    def judge(self, question: str, reference: str, prediction: str) -> JudgeScore:
        prompt = JUDGE_PROMPT.format(question=question, reference=reference, prediction=prediction or "(none)")
        return parse_judge_reply(self.complete(prompt))

    @abstractmethod
    def complete(self, prompt: str) -> str:
        """The model's reply to ``prompt`` (with ``JUDGE_SYSTEM`` as its instructions)."""


_VERDICT_KEYS = ("pred", "prediction", "correct", "match", "verdict", "answer")


def parse_judge_reply(text: str) -> JudgeScore:
    """The verdict and score of a judge's reply: a dict (``{'pred': 'yes', 'score': 4}``,
    JSON or Python, inside other text or a code fence), or ``yes``/``no`` and
    ``score: N`` / ``N/5`` / a lone number in prose."""
    reply = text.strip()
    verdict = score = None
    for found in re.findall(r"\{[^{}]*\}", reply):
        data = _literal(found)
        if isinstance(data, dict):
            lowered = {str(k).lower(): v for k, v in data.items()}
            verdict = next((_verdict(str(lowered[k])) for k in _VERDICT_KEYS if k in lowered), None)
            score = _score(str(lowered.get("score", "")))
            break
    if verdict is None:
        match = re.search(r"\b(yes|no|correct|incorrect)\b", reply, re.IGNORECASE)
        verdict = _verdict(match.group(1)) if match else None
    if score is None:
        match = (re.search(r"score\W{0,3}(\d+(?:\.\d+)?)", reply, re.IGNORECASE)
                 or re.search(r"\b(\d(?:\.\d+)?)\s*/\s*5\b", reply)
                 or re.search(r"(?<![\w.])(\d(?:\.\d+)?)(?![\w.]|\s*/)", reply))
        score = _score(match.group(1)) if match else None
    if verdict is None and score is None:
        return JudgeScore(None, None, f"unparsed reply: {reply[:200]!r}")
    return JudgeScore(verdict, score, reply[:500])


def _literal(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None


def _verdict(word: str) -> bool | None:
    word = word.strip().strip("'\".").lower()
    return {"yes": True, "true": True, "correct": True, "no": False, "false": False, "incorrect": False}.get(word)


def _score(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if 0.0 <= value <= MAX_SCORE else None


class ModelJudge(Judge):
    """A local ``ChatModel`` as the judge (greedy, text only: no video context).

    Args:
        model: a loaded ``ChatModel`` (it may be the one being evaluated).
        max_new_tokens: longest reply (default 48: the dict and a little more).
    """

    def __init__(self, model, max_new_tokens: int = 48):
        from vstream.models import GenerationConfig

        self.model = model
        self.name = f"model:{model.name}"
        self.generation = GenerationConfig(max_new_tokens=max_new_tokens, attribute=False)

    def complete(self, prompt: str) -> str:
        from vstream.models import AnswerStream
        from vstream.models.prompt import Piece

        return AnswerStream(self.model, [Piece(text=prompt)], self.generation, system=JUDGE_SYSTEM).result().text


class HTTPJudge(Judge):
    """An OpenAI-compatible chat-completions server as the judge.

    Args:
        endpoint: the server's base URL (``http://host:8000``, ``.../v1``) or the full
            ``.../v1/chat/completions`` URL; http or https.
        model: the model name the server knows.
        api_key: sent as ``Authorization: Bearer``; None sends no key (a local server).
        timeout: seconds to wait for one reply (default 60).
        retries: further tries after a 429, a 5xx, a timeout or a refused connection
            (default 3), waiting ``backoff`` seconds, doubled each time (or the server's
            ``Retry-After``, at most 60 s).
        backoff: the first wait, seconds (default 1.0).
    """

    def __init__(self, endpoint: str, model: str, api_key: str | None = None, timeout: float = 60.0,
                 retries: int = 3, backoff: float = 1.0):
        if not (isinstance(endpoint, str) and re.match(r"https?://[^/\s]+", endpoint)):
            raise ConfigError(f"judge endpoint must be an http:// or https:// URL, got {endpoint!r}")
        if not (isinstance(model, str) and model.strip()):
            raise ConfigError(f"an HTTP judge needs the server's model name, got {model!r}")
        check_number("HTTPJudge", "timeout", timeout, 0.0)
        check_int("HTTPJudge", "retries", retries, 0)
        check_number("HTTPJudge", "backoff", backoff, 0.0, include_low=True)
        url = endpoint.rstrip("/")
        if not url.endswith("/chat/completions"):
            url += "/chat/completions" if url.endswith("/v1") else "/v1/chat/completions"
        self.url, self.model, self.api_key = url, model, api_key
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.name = f"http:{model}@{url}"

    def complete(self, prompt: str) -> str:
        body = json.dumps({"model": self.model, "temperature": 0, "max_tokens": 64,
                           "messages": [{"role": "system", "content": JUDGE_SYSTEM},
                                        {"role": "user", "content": prompt}]}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        wait, attempt = self.backoff, 0
        while True:
            last = attempt == self.retries
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return self._content(response.read())
            except urllib.error.HTTPError as e:
                detail = e.read(300).decode("utf-8", "replace").strip()
                if last or (e.code != 429 and e.code < 500):
                    raise JudgeError(f"judge {self.url}: HTTP {e.code} {e.reason}"
                                     + (f": {detail}" if detail else "")
                                     + (f" (after {attempt + 1} tries)" if attempt else "")) from None
                pause = _retry_after(e.headers.get("Retry-After"), wait)
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                reason = getattr(e, "reason", e)
                if last:
                    raise JudgeError(f"judge {self.url}: {'timed out' if _timed_out(reason) else reason} "
                                     f"(after {attempt + 1} tries, {self.timeout:g} s each)") from None
                pause = wait
            time.sleep(pause)
            wait, attempt = wait * 2, attempt + 1

    def _content(self, raw: bytes) -> str:
        try:
            return json.loads(raw)["choices"][0]["message"]["content"] or ""
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, IndexError, TypeError):
            raise JudgeError(f"judge {self.url}: the reply is not a chat completion "
                             f"(choices[0].message.content): {raw[:200]!r}") from None


def _retry_after(header: str | None, default: float) -> float:
    try:
        return min(max(float(header), 0.0), 60.0)
    except (TypeError, ValueError):
        return default


def _timed_out(reason) -> bool:
    return isinstance(reason, TimeoutError) or "timed out" in str(reason)

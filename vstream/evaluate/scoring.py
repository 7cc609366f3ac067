"""Prompts and deterministic scoring: multiple-choice letters, open-ended answers, and
OVO-Bench's yes/no and count probes (``score_answer`` picks by the question's kind)."""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

from vstream.evaluate.records import LETTERS, Question

MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
_STOPWORD_TEXT = """a an the is are was were be been being of in on at to for from by with and or but
it its this that these those there here what which who whom whose when where why how do does did done
he she they them his her their we you i me my our your as into than then so very can could would should
will shall may might must has have had not no yes"""
_STOPWORDS = frozenset(_STOPWORD_TEXT.split())


def mc_prompt(question: Question) -> str:
    """The question, its lettered options (one a line) and the letter instruction; the
    bare question when it is open-ended."""
    if not question.options:
        return question.question
    lines = [question.question] + [f"{LETTERS[i]}. {text}" for i, text in enumerate(question.options)]
    return "\n".join(lines + [MC_INSTRUCTION])


def parse_choice(text: str, options: list[str]) -> str | None:
    """The option letter an answer gives, or None when it gives none.

    Accepted: a lone letter (any case, in parentheses or with ``.``/``)``/``:``),
    ``Answer: B`` / ``the answer is (b)``, a leading ``C.`` / ``(C)`` / ``C)``, ``(C)``
    anywhere, a lone capital letter word; then, as a fallback, the text of exactly one
    option. Letters beyond the number of options do not count.
    """
    valid = LETTERS[: len(options)]
    s = text.strip()
    i = re.IGNORECASE
    patterns = [
        (r"^\(?([A-Z])\)?[.):]?$", i),  # "A", "(a)", "B.", "c)"
        (r"\banswer(?:\s+is)?\s*[:\-]?\s*\(?([A-Z])\b(?![-'])", i),  # "Answer: A", "the answer is (b)"
        (r"\b(?:option|choice)\s*\(?([A-Z])\b(?![-'])", i),  # "option C"
        (r"^\(?([A-Z])[.):]\s", i),  # "C. text", "(c) text", "C) text"
        (r"\(([A-Z])\)", 0),  # "... (D) ..."
        (r"^([A-Z])\b(?![-'])(?!\s+[a-z])", 0),  # "D, because" (not the article in "A man walks")
    ]
    for pattern, flags in patterns:
        match = re.search(pattern, s, flags)
        if match and match.group(1).upper() in valid:
            return match.group(1).upper()
    said = f" {normalize(s)} "
    hits = [i for i, option in enumerate(options) if normalize(option) and f" {normalize(option)} " in said]
    if len(hits) > 1:  # keep the longest when one option's text holds another's
        longest = max(hits, key=lambda i: len(normalize(options[i])))
        hits = [i for i in hits if i == longest or normalize(options[i]) not in normalize(options[longest])]
    return LETTERS[hits[0]] if len(hits) == 1 else None


_NUMBER_WORDS = {word: n for n, word in enumerate(
    ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"])}


def parse_yes_no(text: str) -> str | None:
    """``"Yes"`` / ``"No"`` from an answer (``yes``, ``No.``, ``Y``, ``N``, or exactly one
    of the words anywhere), or None."""
    words = normalize(text).split()
    if words and words[0] in ("yes", "y", "no", "n"):
        return "Yes" if words[0] in ("yes", "y") else "No"
    said = {w for w in words if w in ("yes", "no")}
    return said.pop().capitalize() if len(said) == 1 else None


def parse_count(text: str) -> str | None:
    """The first whole number an answer gives (digits, or a number word up to twelve), or None."""
    for word in normalize(text).split():
        if word.isdigit():
            return str(int(word))
        if word in _NUMBER_WORDS:
            return str(_NUMBER_WORDS[word])
    return None


def normalize(text: str) -> str:
    """Lower case, punctuation dropped, articles dropped, whitespace collapsed."""
    text = text.lower().translate(str.maketrans(string.punctuation, " " * len(string.punctuation)))
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def keywords(text: str) -> set[str]:
    """The content words of ``text`` (normalised, stop words dropped)."""
    return {w for w in normalize(text).split() if w not in _STOPWORDS}


@dataclass
class OpenScore:
    """Attributes: score: 1.0 for a (normalised) exact or contained match, else the
    share of the reference's keywords the answer holds; correct: ``score >= threshold``."""

    score: float
    correct: bool


def score_open(prediction: str, reference: str, threshold: float = 0.5) -> OpenScore:
    """Deterministic open-ended score of ``prediction`` against ``reference``."""
    said, ref = normalize(prediction), normalize(reference)
    if not ref:
        return OpenScore(0.0, False)
    if said == ref or f" {ref} " in f" {said} ":
        return OpenScore(1.0, True)
    wanted = keywords(reference) or set(ref.split())
    score = len(wanted & set(said.split())) / len(wanted)
    return OpenScore(score, score >= threshold)


@dataclass
class Scored:
    """Attributes: choice: what was read from the answer (a letter, ``"Yes"``/``"No"``, a
    number) or None when nothing could be read (scored wrong); always None for
    open-ended answers; correct; score (0..1)."""

    choice: str | None
    correct: bool
    score: float


def score_answer(question: Question, text: str) -> Scored:
    """The deterministic score of the answer ``text`` to ``question``, by its kind."""
    if question.kind == "open":
        scored = score_open(text, question.answer)
        return Scored(None, scored.correct, scored.score)
    parse = {"choice": lambda t: parse_choice(t, question.options), "yesno": parse_yes_no,
             "count": parse_count}[question.kind]
    choice = parse(text)
    return Scored(choice, choice == question.answer, float(choice == question.answer))

"""The evaluation harness behind ``vstream eval``: benchmark annotation loaders
(``records``), prompts and deterministic scoring (``scoring``), and the streaming
runner (``runner``)."""

from vstream.evaluate.records import Question, list_formats, load_questions
from vstream.evaluate.runner import evaluate, format_summary, summarize
from vstream.evaluate.scoring import mc_prompt, parse_choice, score_open

__all__ = ["Question", "evaluate", "format_summary", "list_formats", "load_questions", "mc_prompt",
           "parse_choice", "score_open", "summarize"]

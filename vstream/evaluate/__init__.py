"""The evaluation harness behind ``vstream eval``: benchmark annotation loaders
(``records``), prompts and deterministic scoring (``scoring``), model and HTTP judges of
open-ended answers (``judges``), and the streaming runner (``runner``), which prints the
published figures of ``published.json`` beside its summary."""

from vstream.evaluate.judges import HTTPJudge, Judge, JudgeError, JudgeScore, ModelJudge, parse_judge_reply
from vstream.evaluate.records import Question, list_formats, load_questions
from vstream.evaluate.runner import evaluate, format_summary, published_figures, summarize
from vstream.evaluate.scoring import mc_prompt, parse_choice, score_answer, score_open

__all__ = ["HTTPJudge", "Judge", "JudgeError", "JudgeScore", "ModelJudge", "Question", "evaluate", "format_summary",
           "list_formats", "load_questions", "mc_prompt", "parse_choice", "parse_judge_reply", "published_figures",
           "score_answer", "score_open", "summarize"]

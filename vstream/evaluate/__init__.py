"""The evaluation harness behind ``vstream eval``: benchmark annotation loaders
(``records``), prompts and deterministic scoring (``scoring``), model and HTTP judges of
open-ended answers (``judges``), the streaming runner (``runner``), which prints the
published figures of ``published.json`` beside its summary, and the multi-image MMIU
evaluator (``mmiu``)."""

from vstream.evaluate.judges import HTTPJudge, Judge, JudgeError, JudgeScore, ModelJudge, parse_judge_reply
from vstream.evaluate.mmiu import (
    MMIUQuestion,
    evaluate_mmiu,
    format_mmiu_summary,
    load_mmiu,
    make_mmiu_set,
    summarize_mmiu,
)
from vstream.evaluate.records import Question, list_formats, load_questions
from vstream.evaluate.runner import evaluate, format_summary, published_figures, summarize
from vstream.evaluate.scoring import mc_prompt, parse_choice, score_answer, score_open

__all__ = ["HTTPJudge", "Judge", "JudgeError", "JudgeScore", "MMIUQuestion", "ModelJudge", "Question", "evaluate",
           "evaluate_mmiu", "format_mmiu_summary", "format_summary", "list_formats", "load_mmiu", "load_questions",
           "make_mmiu_set", "mc_prompt", "parse_choice", "parse_judge_reply", "published_figures", "score_answer",
           "score_open", "summarize", "summarize_mmiu"]

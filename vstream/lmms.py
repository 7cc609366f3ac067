"""vstream as a model of lmms-eval (``lmms-eval --model vstream``), the harness video LLMs
are compared with (OVO-Bench, Video-MME, MVBench, ...). Install with ``pip install
"vstream[lmms]"`` and ``pip install --no-deps lmms-eval`` (0.7.3; its metadata pins av<16,
see pyproject.toml); lmms-eval finds the model through the ``lmms_eval.models`` entry point
(``manifest``), so no lmms-eval file is changed. This is the only module that imports
lmms-eval.

Each video a task gives is fed as a stream, at ``fps`` frames a second, into a vstream
``Session`` with the chosen model and that model's memory policy, and the question is
asked of the session once the clip is in its memories: the model answers from its bounded
memory, as it would live, not from frames sampled over the whole file. Requests about the
same clip (Video-MME's three questions a video) share one session, fed once.

Questions asked at their time: lmms-eval's OVO-Bench gives each question the clip cut at
its time (backward and realtime), and each round of a forward question
(``generate_until_multi_round``) the clip from the start up to that round's time. The
rounds of one question share one session: a round pushes only the frames and audio its
clip holds beyond what earlier rounds pushed, so the memory grows as the stream plays and
every round is answered from what was seen up to its time.

Multiple choice: tasks that put the options in the prompt (Video-MME, MVBench, OVO-Bench)
are answered by ``generate_until`` and parsed by the task; tasks of lmms-eval's
``multiple_choice`` type score each option by ``loglikelihood``: how likely the option is
as the start of the model's answer (``ChatModel.answer_logprobs``).
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from PIL import Image
from tqdm import tqdm

from vstream.errors import ConfigError
from vstream.ingest import open_source, probe
from vstream.models import GenerationConfig
from vstream.session import Session, SessionConfig, model_and_encoder, shared_screen_reader
from vstream.types import Frame

logger = logging.getLogger(__name__)

MODEL_NAME = "vstream"
"""The name lmms-eval knows this model by (``--model vstream``)."""


def manifest() -> ModelManifest:
    """What lmms-eval's model registry reads from the ``lmms_eval.models`` entry point."""
    return ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.VStreamLMM")


class VStreamLMM(lmms):
    """``--model vstream``: lmms-eval's requests answered by vstream sessions (see the
    module docstring).

    ``--model_args`` (all optional):
        pretrained: the model, a hub id or folder (default: vstream's embedded model).
        config: a ``SessionConfig`` as a JSON file, for settings not named here (heads,
            scene lines, ...); the arguments below override it.
        fps: frames sampled per second of video (default: the config's, 1.0).
        asr: transcribe the clip's audio into the transcript memory (default False, or
            the config's: the frames only, as the published figures of video LLMs are
            taken; True is closer to a benchmark's "with subtitles" setting).
        ocr: read the text on screen (default False, or the config's).
        encoder: the frame encoder when the model brings no vision tower (default: the
            config's, ``"auto"``).
        device, dtype: where the model, encoder and memory run, and the model's precision
            (default ``"auto"``; lmms-eval's ``--device`` sets ``device``).

    ``batch_size`` must be 1: a session answers one question at a time.
    """

    is_simple = True

    def __init__(self, pretrained: str | None = None, config: str | None = None, fps: float | None = None,
                 asr: bool | None = None, ocr: bool | None = None, encoder: str | None = None,
                 device: str | None = None, dtype: str | None = None, batch_size: int | str = 1) -> None:
        super().__init__()
        if str(batch_size) != "1":
            raise ConfigError(f"--model vstream answers one question at a time per session; "
                              f"batch_size must be 1, got {batch_size!r}")
        if config:
            settings = SessionConfig.from_json(Path(config).read_text(encoding="utf-8"))
        else:  # the frames only, unless asked (the class docstring)
            settings = SessionConfig(asr=False, ocr=False)
        overrides = {"fps": fps, "asr": asr, "ocr": ocr, "encoder": encoder, "device": device, "dtype": dtype}
        self.config = replace(settings, **{k: v for k, v in overrides.items() if v is not None})
        self.model, self.encoder = model_and_encoder(pretrained, self.config)
        self.screen_reader = shared_screen_reader(self.config)

    # -- lmms-eval's request types ---------------------------------------------------------

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Each request's answer: ``args`` = (question, generation kwargs, doc_to_visual,
        doc_id, task, split)."""
        return self._answer_by_clip(requests, "generate_until", lambda session, request: _generated(
            session.ask(request.args[0]).text, request.args[1]))

    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """Each request's (loss, is greedy): ``args`` = (question, option or doc_to_target,
        doc_to_visual, doc_id, task, split). The option is scored as the start of the
        answer, its leading delimiter (lmms-eval's ``target_delimiter``) dropped.

        The loss is the mean negative log-probability of the option's tokens, lower for a
        likelier option: lmms-eval's multiple-choice scoring takes the option with the
        lowest value (its ``argmin``), as its own models return this loss. The pair travels
        as a ``GenerationResult``'s text: lmms-eval 0.7.1 to 0.7.3 turn any other result
        that is not text into its ``str`` (``unwrap_generation_output``), which their
        multiple-choice scoring cannot unpack; a ``GenerationResult``'s text is passed on
        as it is."""

        def score(session: Session, request: Instance) -> GenerationResult:
            question, option = request.args[0].strip(), request.args[1]
            if callable(option):  # a loglikelihood task scores its doc's target
                option = option(self._doc(request))
            pieces = self.model.question_pieces(session.context(question), question)
            logprobs, greedy = self.model.answer_logprobs(pieces, str(option).lstrip())
            return GenerationResult(text=(-float(logprobs.mean()), greedy))

        return self._answer_by_clip(requests, "loglikelihood", score)

    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        """Each request's answers, one a round: ``args`` = (first question, generation
        kwargs, doc_to_visual, doc_to_text, doc_id, task, split); ``doc_to_text(doc,
        previous_output, round_idx, previous_round_info)`` gives each later round's
        (visuals, question, done, answers so far, round info). One session a request;
        each round's clip adds to the stream (module docstring)."""
        answers = []
        for request in tqdm(requests, desc="vstream: multi-round questions", unit="q"):
            question, generation, doc_to_visual, doc_to_text = request.args[:4]
            doc = self._doc(request)
            rounds: list[str] = []
            with self._session(generation) as session:
                stream = ClipStream(session, self.config)
                media, info = doc_to_visual(doc), None
                while True:
                    stream.feed(media, replay=bool(rounds))
                    rounds.append(_generated(session.ask(question).text, generation))
                    logger.info("%s doc %s: round %d asked after %.1f s of the stream (%d frames in memory)",
                                request.task_name, request.doc_id, len(rounds), stream.last_t,
                                session.stats.frames_processed)
                    media, question, done, previous, info = doc_to_text(
                        doc, previous_output=rounds, round_idx=len(rounds), previous_round_info=info)
                    rounds = list(previous)
                    if done:
                        break
            answers.append(rounds)
        return answers

    # -- sessions --------------------------------------------------------------------------

    def _answer_by_clip(self, requests: list[Instance], kind: str, answer) -> list:
        """``answer(session, request)`` for every request, in the requests' order, with one
        session per distinct (visual input, generation kwargs), fed once."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        media: dict[tuple, list] = {}
        for i, request in enumerate(requests):
            visuals = request.args[2](self._doc(request)) or []
            key = (_media_key(visuals, i), json.dumps(request.args[1], sort_keys=True, default=str)
                   if kind == "generate_until" else "")
            groups[key].append(i)
            media[key] = visuals
        results: list = [None] * len(requests)
        with tqdm(total=len(requests), desc=f"vstream: {kind}", unit="q") as bar:
            for key, indexes in groups.items():
                generation = requests[indexes[0]].args[1] if kind == "generate_until" else {}
                with self._session(generation) as session:
                    ClipStream(session, self.config).feed(media[key])
                    for i in indexes:
                        results[i] = answer(session, requests[i])
                        bar.update(1)
        return results

    def _session(self, generation: dict) -> Session:
        config = replace(self.config, generation=generation_config(generation, self.config.generation))
        return Session(self.model, config, self.encoder, self.screen_reader)

    def _doc(self, request: Instance) -> dict:
        doc_id, task, split = request.args[-3:]
        return self.task_dict[task][split][doc_id]


class ClipStream:
    """A session fed from a task's visual inputs (video paths, or images as frames
    ``1 / fps`` seconds apart), keeping stream time across feeds.

    Args:
        session: the session fed.
        config: its settings (``fps``, ``asr``).
    """

    def __init__(self, session: Session, config: SessionConfig):
        self.session, self.fps, self.asr = session, config.fps, config.asr
        self.last_t = -math.inf  # the newest frame pushed, stream seconds
        self.audio_end = 0.0  # the end of the newest audio pushed, stream seconds
        self.images = 0  # images pushed as frames: their index

    def feed(self, media: list, replay: bool = False) -> None:
        """Push ``media`` and wait until it is in the memories. Without ``replay`` its items
        follow each other, after what was fed before; with ``replay`` they are the stream
        again from its start (a later round's clip, or its images ``1 / fps`` apart): only
        what lies beyond what was already pushed is pushed."""
        for position, item in enumerate(media):
            shift = 0.0 if replay or self.last_t == -math.inf else self.last_t + 1.0 / self.fps
            if isinstance(item, str):
                self._clip(item, shift)
            elif isinstance(item, Image.Image):
                self._frame(np.asarray(item.convert("RGB")), position / self.fps if replay else shift, self.images)
                self.images += 1
            else:
                raise ConfigError(f"--model vstream reads video paths and PIL images; the task gave a "
                                  f"{type(item).__name__}")
        self.session.wait()

    def _clip(self, path: str, shift: float) -> None:
        info = probe(path)
        with open_source(path, fps=self.fps, video=info.video is not None,
                         audio=self.asr and info.audio is not None) as source:
            for item in source:
                if isinstance(item, Frame):
                    self._frame(item.image, shift + item.t, item.index)
                elif shift + item.end > self.audio_end:
                    self.session.push_audio(replace(item, start=shift + item.start, end=shift + item.end),
                                            wait=True)
                    self.audio_end = shift + item.end

    def _frame(self, image: np.ndarray, t: float, index: int) -> None:
        if t > self.last_t:
            self.session.push_frame(Frame(image, t, index), wait=True)
            self.last_t = t


def generation_config(kwargs: dict, default: GenerationConfig) -> GenerationConfig:
    """A task's generation kwargs as a ``GenerationConfig`` (what is not given: ``default``'s).
    ``do_sample`` false (or temperature 0) is greedy decoding; ``until`` is applied to the
    answer (``_generated``); beam search is refused, vstream has none."""
    if int(kwargs.get("num_beams", 1)) > 1:
        raise ConfigError(f"generation kwargs ask for num_beams={kwargs['num_beams']}; vstream decodes greedily "
                          "or samples (do_sample, temperature, top_p), without beam search")
    sampled = kwargs.get("do_sample", True) and float(kwargs.get("temperature", default.temperature) or 0) > 0
    return replace(default, max_new_tokens=int(kwargs.get("max_new_tokens", default.max_new_tokens)),
                   temperature=float(kwargs.get("temperature", default.temperature)) if sampled else 0.0,
                   top_p=float(kwargs.get("top_p", default.top_p) or 1.0))


def _generated(text: str, kwargs: dict) -> str:
    """``text`` cut at the first of the task's ``until`` strings."""
    until = kwargs.get("until") or []
    for stop in [until] if isinstance(until, str) else until:
        if stop:
            text = text.split(stop)[0]
    return text.strip()


def _media_key(visuals: list, i: int) -> tuple:
    """What requests about the same clip share: the paths; images are never shared."""
    if all(isinstance(v, str) for v in visuals):
        return tuple(visuals)
    return ("request", i)

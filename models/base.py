"""Models that answer from a stream's memory: the ``VideoLM`` interface, ``ChatModel``
(everything a Hugging Face causal LM with a chat template needs), the ``Answer``, and
the registry that picks an adapter for a model.

An adapter for a new VLM family is one file: subclass ``ChatModel``, say how to load
it (``from_pretrained``), which vision tower feeds the memory (``frame_encoder``) and
how memory tokens become LLM embeddings (``project``), and register it under the
transformers ``model_type`` it handles.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from vstream.errors import ConfigError, ModelLoadError

from .generation import GenerationConfig, attention_shares, generate_tokens, position_kwargs, stop_ids
from .prompt import (
    MEDIA_SYSTEM_PROMPT,
    SYSTEM_PROMPT,
    Context,
    Evidence,
    Medium,
    Piece,
    media_pieces,
    rank_evidence,
    user_pieces,
)

_ADAPTERS: dict[str, type] = {}
_PLACEHOLDER = "\x00vstream-user-turn\x00"
Turns = Sequence[tuple[str, str]]  # earlier (question, answer) turns of a chat, oldest first


def register_model(*model_types: str):
    """Class decorator: use this adapter for checkpoints of these transformers model types."""

    def register(cls):
        for model_type in model_types:
            _ADAPTERS[model_type] = cls
        return cls

    return register


def list_models() -> list[str]:
    """Model types with an adapter (any other causal LM reads through the text-only path)."""
    return sorted(_ADAPTERS)


def adapter_for(model_type: str):
    return _ADAPTERS.get(model_type)


@dataclass
class Answer:
    """An answer with its evidence.

    Attributes:
        text: the answer.
        evidence: the parts of the stream placed in the prompt, best first.
        timings: seconds: ``prompt`` (building the prompt), ``first_token`` (from the
            call to the first answer token), ``answer`` (the whole generation),
            ``attribution`` (ranking the evidence).
    """

    text: str
    evidence: list[Evidence] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """``{"answer", "evidence": [{start, end, kind, score}] best first, "timings"}``:
        what ``vstream ask --json`` prints and the server's answer reply carries. Evidence
        of one of several media also has its ``source``."""
        evidence = []
        for e in self.evidence:
            item = {"start": e.start, "end": e.end, "kind": e.kind, "score": e.score}
            evidence.append(item if e.source is None else {**item, "source": e.source})
        return {"answer": self.text, "evidence": evidence, "timings": dict(self.timings)}


class Embedded(NamedTuple):
    """A chat as the LLM reads it.

    Attributes:
        embeds: input embeddings ``[1, L, H]``.
        ranges: the token range ``(start, end)`` of each piece that carries evidence,
            then of the last piece (the question).
        visual: ``[1, L]`` bool, True at memory tokens: what a head that routes by
            modality (visual experts) needs.
        positions: position ids ``[3, 1, L]`` for a model with multimodal rotary
            positions (Qwen2-VL's M-RoPE), None for the usual 0..L-1.
    """

    embeds: torch.Tensor
    ranges: list[tuple[int, int]]
    visual: torch.Tensor
    positions: torch.Tensor | None = None


class AnswerStream:
    """The answer as it is generated: iterate for text pieces; ``result()`` finishes
    the generation if needed and returns the ``Answer``. ``timings`` (seconds) may be
    added to before the generation starts; they end up in ``Answer.timings``.
    ``on_answer`` callbacks are called with the ``Answer`` once it is complete (a
    dialogue records its turn so)."""

    def __init__(self, model: ChatModel, pieces: list[Piece], generation: GenerationConfig,
                 system: str = SYSTEM_PROMPT, history: Turns = ()):
        self._model, self._pieces, self._generation = model, pieces, generation
        self._system, self._history = system, history
        self._answer: Answer | None = None
        self.timings: dict[str, float] = {}
        self.on_answer: list[Callable[[Answer], None]] = []
        self._iterator = self._run()

    def __iter__(self) -> Iterator[str]:
        return self._iterator

    def result(self) -> Answer:
        for _ in self._iterator:
            pass
        return self._answer

    def _run(self) -> Iterator[str]:
        with self._model.lock:  # one generation at a time on a model shared by sessions
            yield from self._generate()
        for callback in self.on_answer:
            callback(self._answer)

    def _generate(self) -> Iterator[str]:
        model, started = self._model, time.perf_counter()
        with torch.inference_mode():
            embeds, ranges, visual, positions = model.embed(self._pieces, self._system, self._history)
        *evidence, question = ranges
        timings = self.timings
        timings["prompt"] = time.perf_counter() - started
        tokens: list[int] = []
        text = ""
        # Decode a short window, not the whole answer, per token: the text of
        # tokens[prefix:] beyond that of tokens[prefix:read] is new. The window keeps
        # one piece of context before the new tokens, so a tokenizer that spells a
        # leading space from its neighbour decodes them as it would in the whole answer.
        prefix = read = 0
        with model.routing(visual):
            for token in generate_tokens(model.lm, embeds, model.stop, self._generation, positions):
                if not tokens:
                    timings["first_token"] = time.perf_counter() - started
                tokens.append(token)
                before = model.tokenizer.decode(tokens[prefix:read], skip_special_tokens=True)
                after = model.tokenizer.decode(tokens[prefix:], skip_special_tokens=True)
                if len(after) > len(before) and not after.endswith("\ufffd"):  # whole characters only
                    yield after[len(before):]
                    text += after[len(before):]
                    prefix, read = read, len(tokens)
            timings["answer"] = time.perf_counter() - started
            timings.setdefault("first_token", timings["answer"])
            shares = None
            if self._generation.attribute:
                mark = time.perf_counter()
                shares = attention_shares(model.lm, embeds, tokens, evidence, question, positions=positions)
                timings["attribution"] = time.perf_counter() - mark
        self._answer = Answer(text.strip(), rank_evidence(self._pieces, shares), timings)


class ChatModel:
    """A causal LM with a tokenizer and a chat template, answering from a ``Context``.

    Args:
        lm: the transformers model (``forward`` takes ``inputs_embeds``).
        tokenizer: its tokenizer.
        name: what it was loaded from, for messages.
    """

    frame_encoder = None  # the vision tower whose features the memory must hold; None: any
    reads_memory_tokens = False
    timed_memory = True  # memory tokens after time markers (``vstream.models.prompt.memory_pieces``)
    # what ``vstream models`` says of the adapter: its frame encoder and its prompt's layout
    vision_tower_text = "the session's frame encoder (any); the model reads words"
    memory_text = "any policy (STAR by default, StarConfig's defaults)"
    prompt_text = "the visual memory as scene notes in words, transcript and screen text"

    def __init__(self, lm, tokenizer, name: str = ""):
        self.lm, self.tokenizer, self.name = lm.eval(), tokenizer, name
        self.stop = stop_ids(lm, tokenizer)
        self.lock = threading.Lock()  # held while an answer is generated
        self.heads: list = []  # attached model heads (add_head)

    @property
    def device(self) -> torch.device:
        return self.lm.get_input_embeddings().weight.device

    def memory_config(self):
        """The ``StarConfig`` the checkpoint was trained with, or None for the default."""

    def memory_attention(self):
        """The abstract memory's trained ``SemanticAttention``, or None for the default."""

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Memory tokens ``[n, D]`` -> LLM input embeddings ``[n, H]`` (with autograd as the
        caller has it: training runs it with gradients, answering in inference mode)."""
        raise ModelLoadError(f"{self.name}: this model reads text only, not memory tokens")

    def memory_projector(self) -> torch.nn.Module | None:
        """The module ``project`` runs (what ``vstream train`` can train as
        ``projector``), or None when memory tokens need none."""
        return None

    def render(self, system: str, history: Turns = ()) -> str:
        """The chat up to the assistant's turn: ``system``, the earlier turns of
        ``history``, and a placeholder for the user turn."""
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(chat_messages(system, history), tokenize=False,
                                                      add_generation_prompt=True)
        earlier = "".join(f"User: {question}\nAssistant: {answer}\n" for question, answer in history)
        return f"{system}\n\n{earlier}User: {_PLACEHOLDER}\nAssistant:"

    def embed(self, pieces: list[Piece], system: str = SYSTEM_PROMPT, history: Turns = ()) -> Embedded:
        """The whole chat as input embeddings (see ``Embedded``): ``system``, the turns of
        ``history``, and ``pieces`` as the user turn."""
        before, after = self.render(system, history).split(_PLACEHOLDER)
        table = self.lm.get_input_embeddings()
        parts, ranges, visual, length = [], [], [], 0
        chat = [Piece(text=before), *pieces, Piece(text=after)]
        for piece in chat:
            if piece.features is not None:
                part = self.project(piece.features.to(self.device)).to(table.weight.dtype)
            else:
                ids = self.tokenizer(piece.text, add_special_tokens=False, return_tensors="pt").input_ids
                part = table(ids[0].to(self.device))
            if piece.evidence is not None or piece is pieces[-1]:
                ranges.append((length, length + part.shape[0]))
            parts.append(part)
            visual.append(torch.full((part.shape[0],), piece.features is not None, dtype=torch.bool))
            length += part.shape[0]
        positions = self.positions([(len(flags), piece) for flags, piece in zip(visual, chat)])
        return Embedded(torch.cat(parts).unsqueeze(0), ranges, torch.cat(visual).unsqueeze(0), positions)

    def positions(self, parts: list[tuple[int, Piece]]) -> torch.Tensor | None:
        """Position ids of a prompt made of ``parts`` (each its token count and its piece),
        for a model that places memory tokens itself; None (the default): 0..L-1."""
        return None

    def answer_loss(self, pieces: list[Piece], target: str, routing: Callable | None = None,
                    history: Turns = ()) -> torch.Tensor:
        """Mean cross-entropy of ``target`` (then end of text) as the answer to the user turn
        ``pieces`` after the earlier turns of ``history``, by teacher forcing, with autograd
        as the caller has it (the prompt's projection too: what training a projector
        needs). ``routing(visual)`` wraps the forward, ``visual`` the ``[1, L]`` mask of
        memory tokens (default: the attached heads' ``routing``)."""
        stop = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        ids = self.tokenizer(target, add_special_tokens=False).input_ids + stop
        logits = self._answer_logits(pieces, ids, routing, history)
        return torch.nn.functional.cross_entropy(logits.float(), torch.tensor(ids, device=logits.device))

    def answer_logprobs(self, pieces: list[Piece], target: str, history: Turns = ()) -> tuple[torch.Tensor, bool]:
        """``[T]``: the log-probability of each of ``target``'s tokens (no end of text) as the
        start of the answer to the user turn ``pieces`` after ``history``; and whether greedy
        decoding would produce them all. How a harness scores a multiple-choice option."""
        ids = self.tokenizer(target, add_special_tokens=False).input_ids
        if not ids:
            raise ConfigError(f"answer_logprobs: {target!r} has no tokens to score")
        with torch.inference_mode():
            logits = self._answer_logits(pieces, ids, None, history).float()
        chosen = torch.tensor(ids, device=logits.device)
        logprobs = torch.log_softmax(logits, dim=-1).gather(1, chosen[:, None])[:, 0]
        return logprobs.cpu(), bool((logits.argmax(dim=-1) == chosen).all())

    def _answer_logits(self, pieces: list[Piece], ids: list[int], routing: Callable | None,
                       history: Turns) -> torch.Tensor:
        """``[len(ids), vocab]``: the logits that predict each of ``ids`` as the answer."""
        ids = torch.tensor([ids], device=self.device)
        embedded = self.embed(pieces, SYSTEM_PROMPT, history)
        with torch.no_grad():  # the answer's tokens are data
            answer = self.lm.get_input_embeddings()(ids)
        embeds = torch.cat([embedded.embeds, answer.to(embedded.embeds.dtype)], dim=1)
        visual = torch.cat([embedded.visual, torch.zeros(ids.shape, dtype=torch.bool)], dim=1)
        with (routing or self.routing)(visual):
            logits = self.lm(inputs_embeds=embeds, **position_kwargs(embedded.positions, ids.shape[1])).logits
        return logits[0, -ids.shape[1] - 1:-1]

    def add_head(self, head) -> None:
        """Attach a model head (``vstream.models.heads``): it sees every generation
        through ``head.routing(visual)``."""
        self.heads.append(head)

    @contextlib.contextmanager
    def routing(self, visual: torch.Tensor):
        """Context for forwards of ``lm`` over a sequence whose memory tokens ``visual``
        (``[1, L]`` bool) marks: every attached head's ``routing``."""
        with contextlib.ExitStack() as stack:
            for head in self.heads:
                stack.enter_context(head.routing(visual))
            yield

    def question_pieces(self, context: Context, question: str) -> list[Piece]:
        """The user turn this model reads for ``question`` about ``context`` (its memory
        tokens or notes, with or without time markers): what an answer, a training loss
        and a head all prompt with."""
        return user_pieces(context, question, visual=self.reads_memory_tokens, timed=self.timed_memory)

    def stream(self, context: Context, question: str, generation: GenerationConfig | None = None,
               history: Turns = ()) -> AnswerStream:
        """Answer ``question`` from ``context``, token by token, after the earlier turns
        of ``history``."""
        return AnswerStream(self, self.question_pieces(context, question), generation or GenerationConfig(),
                            SYSTEM_PROMPT, history)

    def stream_media(self, media: list[Medium], question: str, generation: GenerationConfig | None = None,
                     history: Turns = ()) -> AnswerStream:
        """Answer ``question`` about several images and videos, token by token (layout
        and placeholders: ``vstream.models.prompt``)."""
        pieces = media_pieces(media, question, visual=self.reads_memory_tokens)
        return AnswerStream(self, pieces, generation or GenerationConfig(), MEDIA_SYSTEM_PROMPT, history)

    def answer(self, context: Context, question: str, generation: GenerationConfig | None = None) -> Answer:
        return self.stream(context, question, generation).result()


def chat_messages(system: str, history: Turns = (), wrap: Callable[[str], object] = str) -> list[dict]:
    """Chat-template messages: ``system``, each earlier turn of ``history`` as a user and
    an assistant message, then the user turn's placeholder; ``wrap`` shapes a message's
    content (a processor template wants typed parts)."""
    messages = [{"role": "system", "content": wrap(system)}]
    for question, answer in history:
        messages += [{"role": "user", "content": wrap(question)}, {"role": "assistant", "content": wrap(answer)}]
    return [*messages, {"role": "user", "content": wrap(_PLACEHOLDER)}]

"""``vstream train``: fine-tune the parts vstream plugs into a model on conversation data,
from features extracted once (``vstream extract``), the rest of the model frozen.

One JSON config (``TrainConfig``) names the model, the data and its features, the parts
to train and the schedule. Each question and answer of a video record makes a sample:
the record's stored memory tokens in the question's turn, the earlier questions and
answers as the dialogue's history (the layout a follow-up question gets), the answer's
tokens by teacher forcing. A fixed share of the records (chosen by
a digest of their id, so the split never moves) is held out and scored before and
after training: by the same loss, and by ``vstream eval``'s open-answer score of the
answers the model gives (greedy, from the stored memory) against the records' answers.

Parts: ``projector`` (the model's memory projector, ``ChatModel.memory_projector()``),
written as ``projector.safetensors`` in the output folder, which ``--head
projector:weights=OUT`` puts in place at load; ``visual_experts`` (Mono-InternVL's
visual FFN experts, added to the LLM as copies of its text FFNs and trained on the
memory tokens' positions), written as ``visual_experts.safetensors`` and its JSON, which
``--head visual_experts:weights=OUT`` loads; ``lora`` (low-rank adapters on the LLM's
projections, through peft), written as ``lora.safetensors`` and ``lora.json``, which
``--head lora:weights=OUT`` loads; ``memory_attention`` (the q/k of the abstract
memory's semantic attention, the checkpoint's own: Flash-VStream's ``attention_model``),
trained through the abstract memory rebuilt from each record's stored frames
(``vstream.memory.replay_abstract``: the stored abstract tokens replaced by the rebuilt
ones, so the loss reaches q and k), written as ``memory_attention.safetensors``, which
``--head memory_attention:weights=OUT`` loads (every session on the model then builds
its abstract memory with it).

``multigranular`` (PUMA's multi-granular head) trains on interleaved image-text
documents instead (OmniCorpus; ``data`` is such a file, ``features`` what ``vstream
extract`` stored of its images), in a run of its own: each image next to a paragraph is
a sample, the head asked with the paragraph to generate the image's features at every
granularity its stored grid gives (the head's loss, cosine and squared error, against
the image pooled to each level). The paragraph is the whole prompt (nothing seen
before), cut to its last ``document_text_chars`` characters. Written as
``multigranular.safetensors`` and its JSON, which ``vstream ask --show DIR
--generation-head OUT`` draws with. The held-out documents' loss is scored; there is no
answer to score.

Checkpoints (``checkpoint.pt`` in the output folder: the trained tensors, the
optimizer's state, where the run is in its epochs, the sampler's seed) are written
every ``checkpoint_every`` optimizer steps and at the end; a run started again with the
same config resumes from it and ends as an uninterrupted run would, bit for bit, on one
thread (the order of each epoch comes from the seed and the epoch, not from a global
random state).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import torch
from tqdm import tqdm

from vstream.config import JsonConfig, check_choice, check_int, check_number
from vstream.data import (
    RecordFeatures,
    extracted,
    read_conversations,
    read_document_features,
    read_features,
    read_interleaved,
)
from vstream.errors import ConfigError, DataError
from vstream.evaluate.scoring import score_open
from vstream.memory import MemoryTokens, SemanticAttention, replay_abstract
from vstream.models import GenerationConfig, load_model
from vstream.models.heads import attach_head
from vstream.models.heads.lora import add_lora, save_lora
from vstream.models.heads.memory_attention import MemoryAttentionWeights
from vstream.models.heads.multigranular import LEVELS, MultigranularHead, hidden_size_of
from vstream.models.heads.projector import ProjectorWeights
from vstream.models.prompt import Context

log = logging.getLogger(__name__)
PARTS = ("projector", "visual_experts", "lora", "memory_attention", "multigranular")
HEAD_SPECS = {"projector": "--head projector:weights={}", "visual_experts": "--head visual_experts:weights={}",
              "lora": "--head lora:weights={}", "memory_attention": "--head memory_attention:weights={}",
              "multigranular": "--generation-head {}"}
"""How a user loads what each part wrote into the output folder ``{}``."""
CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainConfig(JsonConfig):
    """A training run.

    Attributes:
        model: the model to fine-tune (hub id or folder).
        data: its conversation file (LLaVA-style JSON or JSON Lines); for
            ``multigranular``, interleaved image-text documents (OmniCorpus Parquet or
            JSON Lines).
        features: the folder ``vstream extract`` wrote for that file and model.
        out: where checkpoints and the trained weights go.
        train: the parts that learn (``projector``, ``visual_experts``, ``lora``,
            ``memory_attention``; or ``multigranular`` alone).
        held_out: share of the records held out for scoring (default 0.1).
        epochs: passes over the training records (default 1).
        learning_rate: AdamW's (default 1e-3).
        accumulate: samples per optimizer step (default 1).
        checkpoint_every: optimizer steps between checkpoints (default 50).
        seed: the order of each epoch (default 0).
        device: ``auto``, ``cpu`` or ``cuda[:N]`` (default auto).
        lora_rank, lora_alpha, lora_targets: the LoRA adapters' rank, scale and the LLM
            modules they adapt (default 8, 16, the attention's ``q_proj`` and ``v_proj``).
        precision: ``auto`` (bfloat16 autocast on CUDA, float32 on the CPU), ``bfloat16``
            (autocast wherever it runs) or ``float32``; the trained weights and the
            optimizer stay in float32.
        media_root: the folder the records' paths are relative to (their ids are what
            matter here; default: the data file's).
        heads: heads attached to the model as it loads, frozen (``"projector:weights=run1/"``:
            an earlier run's output, so one part trains on top of another; default none).
        document_text_chars: characters of a document's paragraph (its end) that prompt
            the multi-granular head for the image next to it (default 1000).
    """

    model: str = ""
    data: str = ""
    features: str = ""
    out: str = ""
    train: list[str] = field(default_factory=lambda: ["projector"])
    held_out: float = 0.1
    epochs: int = 1
    learning_rate: float = 1e-3
    accumulate: int = 1
    checkpoint_every: int = 50
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    media_root: str | None = None
    heads: list[str] = field(default_factory=list)
    document_text_chars: int = 1000

    def __post_init__(self) -> None:
        for name in ("model", "data", "features", "out"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ConfigError(f"TrainConfig.{name} must be given (a path or name)")
        if not (isinstance(self.train, list) and self.train and set(self.train) <= set(PARTS)):
            raise ConfigError(f"TrainConfig.train must list parts among {', '.join(PARTS)}; got {self.train!r}")
        if "multigranular" in self.train and len(self.train) > 1:
            raise ConfigError(f"TrainConfig.train: multigranular trains on interleaved documents, the other parts on "
                              f"conversations: train it in a run of its own, not with {self.train!r}")
        check_number("TrainConfig", "held_out", self.held_out, 0.0, 0.9, include_low=True)
        check_number("TrainConfig", "learning_rate", self.learning_rate, 0.0)
        for name in ("epochs", "accumulate", "checkpoint_every", "document_text_chars"):
            check_int("TrainConfig", name, getattr(self, name), 1)
        check_int("TrainConfig", "seed", self.seed, 0)
        check_choice("TrainConfig", "precision", self.precision, ("auto", "bfloat16", "float32"))
        if not (isinstance(self.heads, list) and all(isinstance(h, str) and h for h in self.heads)):
            raise ConfigError(f"TrainConfig.heads must be a list of head specs; got {self.heads!r}")
        check_int("TrainConfig", "lora_rank", self.lora_rank, 1)
        check_number("TrainConfig", "lora_alpha", self.lora_alpha, 0.0)
        if not (isinstance(self.lora_targets, list) and self.lora_targets
                and all(isinstance(t, str) and t for t in self.lora_targets)):
            raise ConfigError(f"TrainConfig.lora_targets must be a non-empty list of module names; got {self.lora_targets!r}")


@dataclass
class TrainReport:
    """What a run did: optimizer ``steps`` in all, the mean training loss of the last
    epoch, the held-out loss ``before`` and ``after`` and the held-out answers' mean
    open-answer score (``vstream eval``'s ``score_open``) after (None with no held-out
    samples, for a run stopped early, or for ``multigranular``, which gives no answers),
    the samples (question-answer pairs, or images and their paragraphs) on each side,
    and the trained weights' folder."""

    steps: int
    train_loss: float
    held_out_before: float | None
    held_out_after: float | None
    train_samples: int
    held_out_samples: int
    out: str
    held_out_score: float | None = None


@dataclass(frozen=True)
class Sample:
    """One question and answer of record ``id``, after the earlier turns of ``history``
    (``(question, answer)`` pairs, oldest first)."""

    id: str
    question: str
    answer: str
    history: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class ImageSample:
    """Image number ``image`` of document ``id`` and the ``text`` next to it."""

    id: str
    image: int
    text: str


def samples(config: TrainConfig) -> tuple[list, list]:
    """``(train, held_out)``: the samples of the video records with features (or, for
    ``multigranular``, of the documents' images next to a paragraph), split by a digest
    of each record's id (a record, all its turns, stays on its side whatever else the
    file holds)."""
    train, held = [], []
    documents = "multigranular" in config.train
    for record in (read_interleaved(config.data) if documents else read_conversations(config.data, config.media_root)):
        if documents:
            found = [ImageSample(record.id, image, text[-config.document_text_chars:])
                     for image, text in record.image_texts()]
        elif record.media == "video":
            found = _turns(config, record)
        else:
            continue
        if found and not extracted(config.features, record.id):
            raise DataError(f"{config.features}: no features for record {record.id!r} of {config.data} "
                            "(run vstream extract first)")
        digest = int(hashlib.sha1(record.id.encode("utf-8")).hexdigest()[:8], 16) / 0xFFFFFFFF
        (held if digest < config.held_out else train).extend(found)
    if not train:
        what = "images next to a paragraph" if documents else "video records"
        raise DataError(f"{config.data}: no {what} to train on (held out: {len(held)})")
    return train, held


def _turns(config: TrainConfig, record) -> list[Sample]:
    """A video record's questions and answers, each after the ones before."""
    pairs: list[tuple[str, str]] = []
    turns = [t for t in record.turns if t.role != "system"]
    for asked, answered in pairwise(turns):
        if asked.role == "user" and answered.role == "assistant":
            pairs.append((asked.text.replace("<video>", "").strip(), answered.text.strip()))
    if not pairs:
        raise DataError(f"{config.data}: record {record.id!r} has no question and answer to train on")
    return [Sample(record.id, question, answer, tuple(pairs[:k])) for k, (question, answer) in enumerate(pairs)]


def rebuilt_memory(features: RecordFeatures, attention: SemanticAttention) -> MemoryTokens:
    """``features``' memory with its abstract tokens rebuilt by ``attention`` from the
    stored frames (``replay_abstract``), with autograd as the caller has it: what the
    memory would hold had the stream been read with that attention."""
    memory, inputs = features.memory, features.abstract
    if inputs is None:
        raise DataError(f"record {features.id!r}: its features hold no abstract-memory inputs (extracted before "
                        "vstream kept them); extract it again into a new folder to train memory_attention")
    slots = replay_abstract(attention, inputs.frames, inputs.length, inputs.chunk, inputs.alpha)
    rows = torch.tensor([i for i, kind in enumerate(memory.kinds) if kind == "abstract"], dtype=torch.long)
    if len(rows) != slots.shape[0] * slots.shape[1]:
        raise DataError(f"record {features.id!r}: {len(rows)} abstract tokens stored, {slots.shape[0] * slots.shape[1]}"
                        " rebuilt from its frames: the features do not fit together")
    tokens = memory.tokens.to(slots.device).index_put((rows.to(slots.device),), slots.reshape(-1, slots.shape[2]))
    return MemoryTokens(tokens, memory.kinds, memory.spans)


def stored_context(features: RecordFeatures, attention: SemanticAttention | None = None) -> Context:
    """What an answer reads of a record's stored ``features``: its memory (the abstract
    tokens rebuilt by ``attention`` when given), the stream's duration its latest token's end."""
    memory = features.memory if attention is None else rebuilt_memory(features, attention)
    return Context(memory=memory, duration=max((end for _, end in features.memory.spans), default=0.0))


def sample_loss(model, sample: Sample, features: RecordFeatures,
                attention: SemanticAttention | None = None) -> torch.Tensor:
    """The loss of ``sample``'s answer given its record's ``features``, prompted as an
    answer is (the abstract memory rebuilt by ``attention`` when given)."""
    pieces = model.question_pieces(stored_context(features, attention), sample.question)
    return model.answer_loss(pieces, sample.answer, history=sample.history)


def held_out_score(model, held: list[Sample], features_of, attention: SemanticAttention | None = None) -> float | None:
    """Mean ``score_open`` of the model's greedy answers to the held-out questions (from
    their stored memory) against the records' answers."""
    if not held:
        return None
    scores = []
    for sample in held:
        generation = GenerationConfig(max_new_tokens=len(model.tokenizer(sample.answer).input_ids) + 8, attribute=False)
        with torch.no_grad():
            context = stored_context(features_of(sample), attention)
        answer = model.stream(context, sample.question, generation, sample.history).result()
        scores.append(score_open(answer.text, sample.answer).score)
    return sum(scores) / len(scores)


def held_out_loss(loss_of: Callable, held: list) -> float | None:
    if not held:
        return None
    with torch.no_grad():
        return sum(float(loss_of(sample)) for sample in held) / len(held)


def train(config: TrainConfig, progress: bool = True, stop_after: int | None = None,
          features_of: Callable | None = None) -> TrainReport:
    """Run ``config`` (resuming from its checkpoint when the output folder holds one).
    ``stop_after``: stop once this many optimizer steps are done in all, after a
    checkpoint (a run cut short; the next call resumes). ``features_of(sample)``: where a
    sample's features come from (default: read from ``config.features``; the training
    benchmark passes one that decodes the video again)."""
    documents = "multigranular" in config.train
    read = read_document_features if documents else read_features
    features_of = features_of or (lambda sample: read(config.features, sample.id))
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(config.model, dtype=torch.float32, device=config.device, heads=config.heads)
    for parameter in model.lm.parameters():
        parameter.requires_grad_(False)
    train_set, held = samples(config)
    trained, experts, attention, head = [], None, None, None
    if "projector" in config.train:
        trained += list(ProjectorWeights.module_of(model).parameters())
    if "visual_experts" in config.train:  # new experts: copies of the text FFNs, routed by the memory tokens
        experts = attach_head(model, "visual_experts")
        trained += experts.trainable_parameters()
    if "lora" in config.train:
        trained += add_lora(model.lm, config.lora_rank, config.lora_alpha, config.lora_targets)
    if "memory_attention" in config.train:
        attention = MemoryAttentionWeights.module_of(model).to(model.device)
        trained += list(attention.parameters())
    if documents:  # the head's levels: those the stored images' grid gives
        images = features_of(train_set[0]).images
        head = MultigranularHead(hidden_size_of(model), feature_dim=images.shape[2], seed=config.seed,
                                 levels=[n for n in LEVELS if n <= images.shape[1]])
        head.net.to(model.device)
        trained += list(head.net.parameters())
    for parameter in trained:
        parameter.requires_grad_(True)

    def loss_of(sample) -> torch.Tensor:
        if head is not None:
            return head.pair_loss(model, None, sample.text, features_of(sample).images[sample.image])
        return sample_loss(model, sample, features_of(sample), attention)

    optimizer = torch.optim.AdamW(trained, lr=config.learning_rate)
    half = config.precision == "bfloat16" or (config.precision == "auto" and model.device.type == "cuda")
    autocast = torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=half)
    epoch, index, steps, before = (_resume(out / CHECKPOINT, config, trained, optimizer)
                                   or (0, 0, 0, held_out_loss(loss_of, held)))
    losses: list[float] = []  # the LM stays in eval mode: frozen, and no dropout draws to replay on a resume
    with tqdm(total=config.epochs * len(train_set), initial=epoch * len(train_set) + index, unit=" samples",
              desc="training", disable=not progress) as bar:
        while epoch < config.epochs:
            order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(config.seed * 1000 + epoch))
            while index < len(order):
                sample = train_set[int(order[index])]
                with autocast:
                    loss = loss_of(sample)
                (loss / config.accumulate).backward()
                losses.append(float(loss.detach()))
                index += 1
                bar.update(1)
                if index % config.accumulate == 0 or index == len(order):
                    optimizer.step()
                    optimizer.zero_grad()
                    steps += 1
                    if steps % config.checkpoint_every == 0 or stop_after == steps:
                        _checkpoint(out / CHECKPOINT, trained, optimizer, epoch, index, steps, before)
                    if stop_after == steps:
                        return TrainReport(steps, _mean(losses), before, None, len(train_set), len(held), str(out))
                bar.set_postfix_str(f"loss {_mean(losses[-20:]):.3f}")
            epoch, index = epoch + 1, 0
            losses = losses[-len(train_set):]
    _checkpoint(out / CHECKPOINT, trained, optimizer, epoch, index, steps, before)
    if "projector" in config.train:
        ProjectorWeights.save(model, out)
    if experts is not None:
        experts.save_experts(out)
    if "lora" in config.train:
        save_lora(model.lm, out, config.lora_rank, config.lora_alpha, config.lora_targets)
    if attention is not None:
        MemoryAttentionWeights.save(model, out)
    if head is not None:
        head.save(out)
    after = held_out_loss(loss_of, held)
    score = None if documents else held_out_score(model, held, features_of, attention)
    log.info("trained %d steps: held-out loss %s -> %s, answer score %s", steps, before, after, score)
    return TrainReport(steps, _mean(losses[-len(train_set):]), before, after, len(train_set), len(held), str(out),
                       score)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _checkpoint(path: Path, trained, optimizer, epoch: int, index: int, steps: int, before) -> None:
    state = {"trained": [p.detach().cpu().clone() for p in trained], "optimizer": optimizer.state_dict(),
             "epoch": epoch, "index": index, "steps": steps, "held_out_before": before}
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    os.replace(partial, path)


def _resume(path: Path, config: TrainConfig, trained, optimizer) -> tuple[int, int, int, float | None] | None:
    """``(epoch, index, steps, held-out loss before training)`` where the run stands, from
    its checkpoint (the trained tensors and the optimizer restored); None without one. The
    checkpoint is this run's own output (written by ``_checkpoint``), read with
    ``weights_only`` (tensors and plain values: nothing else is unpickled)."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        with torch.no_grad():
            for parameter, saved in zip(trained, state["trained"], strict=True):
                parameter.copy_(saved)
        optimizer.load_state_dict(state["optimizer"])
    except (OSError, RuntimeError, KeyError, ValueError) as exc:
        raise DataError(f"{path}: cannot resume from this checkpoint ({type(exc).__name__}: {exc}); "
                        "remove it to start over") from None
    log.info("resuming %s at epoch %d, sample %d (%d steps)", config.out, state["epoch"], state["index"], state["steps"])
    return state["epoch"], state["index"], state["steps"], state["held_out_before"]

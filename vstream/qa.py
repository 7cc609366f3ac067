"""The answer stage for recorded video: ``VideoQA`` ingests a file once, then answers
any number of questions with the times of the evidence.

Path of a file: ``open_source`` samples frames (``fps``) and 16 kHz audio; frames go
in batches through the frame encoder (the model's own vision tower for a VLM, the
parameter-free pixel encoder otherwise) into the visual memory (``StarMemory``); audio
goes to the speech recogniser on its own thread, and its segments, embedded by the
text embedder, into the transcript memory. A question retrieves transcript lines by
embedding similarity and reads the visual memory (as tokens for a VLM, as scene notes
for a text-only model); the model answers and ranks the evidence.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from vstream.encoders import create_encoder
from vstream.errors import ConfigError, MemoryStateError
from vstream.ingest import open_source, probe
from vstream.memory import BankConfig, StarConfig, StarMemory
from vstream.memory.persist import read_json, write_json
from vstream.models import AnswerStream, ChatModel, Context, GenerationConfig, describe_scenes, load_model
from vstream.types import AudioChunk, Frame

logger = logging.getLogger(__name__)


@dataclass
class AskConfig:
    """Settings of ``VideoQA``.

    Attributes:
        fps: frames sampled per second of video (default 1.0).
        asr: transcribe the audio track (default True).
        encoder: frame encoder when the model brings no vision tower: ``"pixels"``
            (default) or a vision model's hub id or folder.
        transcript_lines: transcript lines retrieved per question (default 8).
        batch_frames: frames encoded per batch (default 16).
        generation: how answers are generated (``GenerationConfig``).
    """

    fps: float = 1.0
    asr: bool = True
    encoder: str = "pixels"
    transcript_lines: int = 8
    batch_frames: int = 16
    generation: GenerationConfig = field(default_factory=GenerationConfig)

    def __post_init__(self) -> None:
        if not (isinstance(self.fps, (int, float)) and self.fps > 0):
            raise ConfigError(f"AskConfig.fps must be a positive number, got {self.fps!r}")
        for name in ("transcript_lines", "batch_frames"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ConfigError(f"AskConfig.{name} must be an int >= 1, got {value!r}")


def star_config_for(grid: int) -> StarConfig:
    """The default STAR layout, with grids no finer than an encoder's ``grid``."""
    base = min(8, grid)
    return StarConfig(base_grid=base, spatial_grid=base, temporal_grid=min(4, base), retrieved_grid=base,
                      bank=BankConfig(grid=base))


class VideoQA:
    """Ask questions about one video.

    Args:
        model: a loaded ``ChatModel``, a hub id or folder, or None for the embedded
            default (SmolLM2-135M-Instruct, text only).
        config: ``AskConfig``.
    """

    def __init__(self, model: ChatModel | str | None = None, config: AskConfig | None = None):
        self.config = config or AskConfig()
        self.model = model if isinstance(model, ChatModel) else load_model(model)
        self.encoder = self.model.frame_encoder or create_encoder(self.config.encoder)
        memory_config = self.model.memory_config() or star_config_for(self.encoder.grid)
        self.memory = StarMemory(memory_config, attention=self.model.memory_attention())
        self.asr = self._make_asr() if self.config.asr else None
        self._text = None
        self.transcript = None
        self.duration = 0.0

    @staticmethod
    def _make_asr():
        from vstream.encoders.asr import WhisperASR

        return WhisperASR()

    @property
    def text(self):
        """The text embedder, loaded on first use."""
        if self._text is None:
            from vstream.encoders.text import TextEmbedder

            self._text = TextEmbedder()
        return self._text

    # -- ingest ---------------------------------------------------------------------------

    def ingest(self, path: str, progress: bool = True) -> dict:
        """Read the video at ``path`` into the memories; returns counts and timings."""
        info = probe(path)
        audio = self.asr is not None and info.audio is not None
        started = time.perf_counter()
        frames: list[Frame] = []
        counts = {"frames": 0, "audio_seconds": 0.0}
        bar = tqdm(total=round(info.duration or 0.0, 1) or None, unit="s", disable=not progress,
                   desc="ingesting", bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt} s {postfix}")
        worker = self._asr_worker() if audio else None
        try:
            with open_source(path, fps=self.config.fps, video=info.video is not None, audio=audio) as source:
                for item in source:
                    if isinstance(item, Frame):
                        frames.append(item)
                        counts["frames"] += 1
                        if len(frames) == self.config.batch_frames:
                            self._add_frames(frames)
                            frames = []
                        now = item.t
                    elif isinstance(item, AudioChunk):
                        worker.submit(item)
                        counts["audio_seconds"] += item.duration
                        now = item.end
                    self.duration = max(self.duration, now)
                    elapsed = time.perf_counter() - started
                    bar.update(max(0.0, round(self.duration, 1) - bar.n))
                    bar.set_postfix_str(f"{counts['frames']} frames, {counts['audio_seconds']:.0f} s audio, "
                                        f"{self.duration / max(elapsed, 1e-9):.1f}x real time", refresh=False)
            if frames:
                self._add_frames(frames)
            if worker is not None:
                worker.close()  # decodes what is still queued
                self.add_transcript(worker.segments())
        finally:
            bar.close()
            if worker is not None:
                worker.close(flush=False)
        counts["seconds"] = time.perf_counter() - started
        counts["transcript_segments"] = len(self.transcript) if self.transcript is not None else 0
        return counts

    def _asr_worker(self):
        from vstream.encoders.asr import ASRWorker

        return ASRWorker(self.asr, drop=False)  # a file waits for the recogniser: no words lost

    def _add_frames(self, frames: list[Frame]) -> None:
        features = self.encoder.encode([f.image for f in frames])
        self.memory.extend(features, [f.t for f in frames])

    def add_transcript(self, segments) -> None:
        """Add transcript segments (``TranscriptSegment``s, in time order) to the transcript memory."""
        segments = [s for s in segments if s.text]
        if not segments:
            return
        from vstream.memory.transcript import TranscriptMemory

        if self.transcript is None:
            self.transcript = TranscriptMemory(self.text.dim)
        self.transcript.extend(segments, self.text.encode([s.text for s in segments]))

    # -- ask ------------------------------------------------------------------------------

    def context(self, question: str) -> Context:
        """What the model reads for ``question``."""
        transcript = []
        if self.transcript is not None and len(self.transcript):
            query = self.text.encode([question])[0]
            hits = self.transcript.search(query, self.config.transcript_lines)
            transcript = [(hit.segment, hit.score) for hit in hits]
        if self.model.reads_memory_tokens:
            return Context(memory=self.memory.tokens(), transcript=transcript, duration=self.duration)
        scenes = describe_scenes(self.memory.clusters(), self.config.fps)
        return Context(scenes=scenes, transcript=transcript, duration=self.duration)

    def stream(self, question: str) -> AnswerStream:
        """Answer ``question`` token by token (iterate), then ``.result()``."""
        if not isinstance(question, str) or not question.strip():
            raise ConfigError(f"the question must be a non-empty string, got {question!r}")
        started = time.perf_counter()
        context = self.context(question.strip())
        stream = self.model.stream(context, question.strip(), self.config.generation)
        stream.retrieval_seconds = time.perf_counter() - started
        return stream

    def ask(self, question: str):
        """The ``Answer`` to ``question``."""
        stream = self.stream(question)
        answer = stream.result()
        answer.timings["retrieval"] = stream.retrieval_seconds
        return answer

    # -- save and load --------------------------------------------------------------------

    def save(self, folder) -> None:
        """Save both memories into ``folder`` (each atomically; ``qa.json`` last)."""
        folder = Path(folder)
        self.memory.save(folder / "visual")
        if self.transcript is not None:
            self.transcript.save(folder / "transcript")
        write_json(folder / "qa.json", {"duration": self.duration, "transcript": self.transcript is not None,
                                        "encoder_grid": self.encoder.grid, "encoder_dim": self.encoder.dim})

    def load(self, folder) -> None:
        """Replace the memories with those saved in ``folder`` by ``save``."""
        folder = Path(folder)
        meta = read_json(folder / "qa.json")
        if (meta.get("encoder_grid"), meta.get("encoder_dim")) != (self.encoder.grid, self.encoder.dim):
            raise MemoryStateError(f"{folder}: saved with a {meta.get('encoder_grid')}x{meta.get('encoder_grid')} x "
                                   f"{meta.get('encoder_dim')} frame encoder; this one gives {self.encoder.grid}x"
                                   f"{self.encoder.grid} x {self.encoder.dim}")
        memory = StarMemory.load(folder / "visual")
        self.memory.close()
        self.memory = memory
        if meta.get("transcript"):
            from vstream.memory.transcript import TranscriptMemory

            self.transcript = TranscriptMemory.load(folder / "transcript")
        self.duration = float(meta.get("duration", 0.0))

    def close(self) -> None:
        self.memory.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def answer_json(answer) -> str:
    """``{"answer", "evidence": [{start, end, kind, score}], "timings"}`` as one line."""
    evidence = [{"start": e.start, "end": e.end, "kind": e.kind, "score": e.score} for e in answer.evidence]
    return json.dumps({"answer": answer.text, "evidence": evidence, "timings": answer.timings})


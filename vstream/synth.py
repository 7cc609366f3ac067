"""Synthetic clips written with PyAV alone (no ffmpeg binary), for tests, benchmarks and demos.

Every frame carries its own index as a bar code across the top quarter, so a reader can
tell exactly which frame it got, even after the decoder resized it; a square moves across
the rest; the background colour can change at given times (scenes); the audio track is a
sine tone whose frequency changes at given times, with sentences spoken by espeak-ng
mixed in at given times if asked. ``write_clip`` returns a ``ClipInfo``
with the frame times and the tone schedule the clip was written with, so tests compare
what the ingest gives against what is known by construction.
"""

from __future__ import annotations

import heapq
import io
import logging
import math
import shutil
import subprocess
import wave
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from vstream.errors import ConfigError

log = logging.getLogger(__name__)

BARCODE_BITS = 20
"""Bits of the frame index drawn per frame: up to 2**20 frames (over 9 hours at 30 fps)."""

# Codecs per container extension: (video codec, audio codec, audio rate in Hz).
_CODECS = {
    ".mp4": ("libx264", "aac", 48_000),
    ".mov": ("libx264", "aac", 48_000),
    ".mkv": ("libx264", "aac", 48_000),
    ".ts": ("libx264", "aac", 48_000),
    ".webm": ("libvpx", "libopus", 48_000),
    ".avi": ("mjpeg", "pcm_s16le", 44_100),  # mp3 encoder delay shifts AVI video by a frame
}
_FORMATS = {".ts": "mpegts"}

_VFR_TIME_BASE = Fraction(1, 90_000)  # fine enough for exact variable-rate timestamps


@dataclass
class ClipInfo:
    """What a synthetic clip holds, known by construction.

    Attributes:
        path: where the clip was written.
        frame_times: ``[N]`` presentation time of each frame, seconds.
        tones: ``[(start_seconds, frequency_hz), ...]`` the tone schedule, or ``[]``
            without audio.
        duration: length of the clip, seconds.
        size: ``(width, height)`` in pixels.
    """

    path: Path
    frame_times: np.ndarray
    tones: list[tuple[float, float]]
    duration: float
    size: tuple[int, int]
    scenes: list[tuple[float, tuple[int, int, int] | np.ndarray]] = field(default_factory=list)
    speech: list[tuple[float, float, str]] = field(default_factory=list)
    """``[(start, end, text), ...]`` seconds, of each spoken sentence."""

    def tone_at(self, t: float) -> float:
        """Frequency in Hz of the tone playing at ``t`` seconds."""
        current = self.tones[0][1]
        for start, freq in self.tones:
            if start <= t:
                current = freq
        return current


def draw_frame(index: int, t: float, width: int, height: int, background: tuple[int, int, int]) -> np.ndarray:
    """One synthetic frame ``[height, width, 3]`` uint8: bar code of ``index`` on top,
    a white square at a position that moves with ``t`` below it."""
    image = np.empty((height, width, 3), np.uint8)
    image[:] = background
    band = max(height // 4, 4)
    edges = np.linspace(0, width, BARCODE_BITS + 1).round().astype(int)
    for bit in range(BARCODE_BITS):
        on = (index >> (BARCODE_BITS - 1 - bit)) & 1
        image[:band, edges[bit] : edges[bit + 1]] = 255 if on else 0
    side = max(min(width, height) // 6, 2)
    x = int((t * width / 4) % max(width - side, 1))
    y = band + (height - band - side) // 2
    image[y : y + side, x : x + side] = 255
    return image


_SLIDE_FONT = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")  # Debian's fonts-dejavu-core


def text_slide(lines: list[str], size: tuple[int, int] = (640, 360),
               background: tuple[int, int, int] = (250, 250, 245)) -> np.ndarray:
    """A slide ``[height, width, 3]`` uint8: ``lines`` of dark text 40 px high, one under
    the other (DejaVu Sans where installed, else PIL's built-in font); a scene for
    ``write_clip`` that OCR can read."""
    image = Image.new("RGB", size, background)
    font = ImageFont.truetype(str(_SLIDE_FONT), 40) if _SLIDE_FONT.is_file() else ImageFont.load_default(size=40)
    draw = ImageDraw.Draw(image)
    for i, line in enumerate(lines):
        draw.text((40, 80 + 70 * i), line, fill=(10, 10, 10), font=font)
    return np.asarray(image)


def read_index(image: np.ndarray) -> int:
    """The frame index a ``draw_frame`` image carries, read from its bar code.

    Works on resized and lossily compressed copies: each bit is read at the centre of
    its cell, in the middle row of the band.
    """
    height, width = image.shape[:2]
    row = image[max(height // 4, 4) // 2 if height >= 16 else 0]
    luma = row.astype(np.float32).mean(axis=1)
    centres = ((np.arange(BARCODE_BITS) + 0.5) * width / BARCODE_BITS).astype(int)
    bits = luma[centres] > 127
    return int(sum(int(b) << (BARCODE_BITS - 1 - i) for i, b in enumerate(bits)))


def vfr_times(duration: float, seed: int = 0) -> np.ndarray:
    """Variable-rate frame times over ``duration`` seconds: gaps drawn from 1/60 s to 1/4 s,
    with some longer holds, as a screen recording or a phone camera produces."""
    rng = np.random.default_rng(seed)
    gaps = rng.choice([1 / 60, 1 / 30, 1 / 30, 1 / 15, 1 / 10, 1 / 4, 0.7], size=int(duration * 60) + 1)
    times = np.concatenate([[0.0], np.cumsum(gaps)])
    return times[times < duration]


def write_clip(
    path: str | Path,
    duration: float = 10.0,
    fps: float = 30.0,
    size: tuple[int, int] = (160, 120),
    audio: bool = True,
    video: bool = True,
    tones: list[tuple[float, float]] | None = None,
    scenes: list[tuple[float, tuple[int, int, int] | np.ndarray]] | None = None,
    speech: list[tuple[float, str]] | None = None,
    noise: float = 0.0,
    frame_times: np.ndarray | None = None,
    keyframe_interval: float = 2.0,
    crf: int = 20,
    progress: bool = False,
) -> ClipInfo:
    """Write a synthetic clip; the container and codecs follow the file extension.

    Args:
        path: output file; one of .mp4 .mov .mkv .ts .webm .avi.
        duration: seconds.
        fps: frame rate for a constant-rate clip (ignored when ``frame_times`` is given).
        size: ``(width, height)``, even numbers.
        audio, video: which tracks to write (at least one).
        tones: ``[(start_seconds, frequency_hz), ...]``; default a new tone every 2 s;
            ``[]`` for silence.
        speech: ``[(start_seconds, text), ...]`` sentences spoken by espeak-ng over the
            tones (needs the espeak-ng program).
        scenes: ``[(start_seconds, (r, g, b) or picture), ...]``: from each start on, frames
            show that background colour (under the bar code and the moving square), or
            that picture (an ``[H, W, 3]`` uint8 array, resized to ``size``, shown as it
            is); default grey.
        noise: standard deviation of white noise added to the audio (default 0.0: none;
            seeded, so a clip is the same each time it is written).
        frame_times: ``[N]`` explicit presentation times in seconds (variable frame rate).
        keyframe_interval: seconds between key frames.
        crf: x264 quality (lower is better).
        progress: show a progress bar (for long clips).
    """
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in _CODECS:
        raise ConfigError(f"write_clip: unsupported extension {ext!r} for {path}; use one of {sorted(_CODECS)}")
    if not (audio or video):
        raise ConfigError("write_clip: asked for neither audio nor video")
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not 0.0 <= noise <= 1.0:
        raise ConfigError(f"write_clip: noise must be a number in [0, 1] (a standard deviation), got {noise!r}")
    width, height = size
    if width % 2 or height % 2 or width < 2 * BARCODE_BITS or height < 16:
        raise ConfigError(f"write_clip: size {size} must be even, at least {2 * BARCODE_BITS}x16")
    rate = Fraction(fps).limit_denominator(1001)
    # Constant-rate clips count in frames (AVI can express nothing else); variable-rate
    # ones in 1/90000 s.
    time_base = _VFR_TIME_BASE if frame_times is not None else 1 / rate
    if frame_times is None:
        frame_times = np.arange(int(round(duration * fps))) / fps
    frame_times = np.asarray(frame_times, dtype=np.float64)
    tones = tones if tones is not None else [(float(s), f) for s, f in zip(range(0, int(duration) + 2, 2), _tone_cycle())]
    video_codec, audio_codec, audio_rate = _CODECS[ext]
    spoken = [(start, speak(text, audio_rate), text) for start, text in speech or []]
    scenes = scenes or [(0.0, (96, 96, 96))]

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format=_FORMATS.get(ext)) as container:
        writers = []
        if video:
            writers.append(_video_packets(container, video_codec, frame_times, size, scenes, keyframe_interval, crf, rate, time_base))
        if audio:
            writers.append(_audio_packets(container, audio_codec, audio_rate, duration, tones, spoken, noise))
        # Interleave the tracks in time order, as a real recording is, so a reader that
        # demuxes both from one container never buffers a whole track.
        bar = tqdm(total=int(duration), desc=f"writing {path.name}", unit="s", disable=not progress)
        for t, packets in heapq.merge(*writers, key=lambda item: item[0]):
            container.mux(packets)
            if t < math.inf:
                bar.update(int(t) - bar.n)
        bar.close()
    log.info("wrote %s: %.1f s, %d frames, audio=%s", path, duration, len(frame_times), audio)
    return ClipInfo(
        path=path,
        frame_times=frame_times if video else np.zeros(0),
        tones=tones if audio else [],
        duration=duration,
        size=size,
        scenes=scenes,
        speech=[(start, start + len(samples) / audio_rate, text) for start, samples, text in spoken] if audio else [],
    )


def _tone_cycle():
    freqs = [440.0, 660.0, 880.0, 550.0, 330.0]
    i = 0
    while True:
        yield freqs[i % len(freqs)]
        i += 1


def _video_packets(container, codec, frame_times, size, scenes, keyframe_interval, crf, rate, time_base):
    """Add a video stream; yield ``(t, packets)`` per frame, then the flushed tail."""
    width, height = size
    stream = container.add_stream(codec, rate=rate)
    stream.width, stream.height = width, height
    stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
    stream.codec_context.time_base = time_base
    gop = max(int(round(keyframe_interval * rate)), 1)
    if codec == "libx264":
        stream.options = {"preset": "ultrafast", "crf": str(crf), "g": str(gop), "bf": "0"}
    elif codec == "libvpx":
        stream.options = {"deadline": "realtime", "cpu-used": "8", "b": "1M", "g": str(gop)}
    return _encode_video(stream, frame_times, size, scenes, time_base)


def _encode_video(stream, frame_times, size, scenes, time_base):
    width, height = size
    scene_starts = [s for s, _ in scenes]
    pictures = {i: np.asarray(Image.fromarray(np.asarray(look, np.uint8)).resize(size, Image.BILINEAR))
                for i, (_, look) in enumerate(scenes) if isinstance(look, np.ndarray)}
    for index, t in enumerate(frame_times):
        scene = max(np.searchsorted(scene_starts, t, side="right") - 1, 0)
        image = pictures[scene] if scene in pictures else draw_frame(index, t, width, height, scenes[scene][1])
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        frame.pts = int(round(t / time_base))
        frame.time_base = time_base
        yield t, stream.encode(frame)
    yield math.inf, stream.encode()


def speak(text: str, rate: int, voice: str = "en-us", words_per_minute: int = 150) -> np.ndarray:
    """``text`` spoken by espeak-ng: ``[n]`` float32 in [-1, 1] at ``rate`` Hz."""
    program = shutil.which("espeak-ng")
    if program is None:
        raise ConfigError("speech needs the espeak-ng program (Debian: apt-get install espeak-ng)")
    result = subprocess.run(
        [program, "-v", voice, "-s", str(words_per_minute), "--stdout", text], capture_output=True, timeout=60, check=True
    )
    with wave.open(io.BytesIO(result.stdout)) as wav:
        native_rate = wav.getframerate()
        # espeak-ng streams its WAV, so the header's frame count is a placeholder: read all.
        pcm = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2").astype(np.float32) / 32768.0
    times = np.arange(int(len(pcm) * rate / native_rate)) / rate
    return np.interp(times, np.arange(len(pcm)) / native_rate, pcm).astype(np.float32)


def _audio_packets(container, codec, rate, duration, tones, spoken, noise):
    """Add a mono audio stream; yield ``(t, packets)`` per encoder frame, then the tail."""
    stream = container.add_stream(codec, rate=rate)
    stream.layout = "mono"
    return _encode_audio(stream, rate, duration, tones, spoken, noise)


def _encode_audio(stream, rate, duration, tones, spoken, noise):
    frame_size = stream.codec_context.frame_size or 1024
    total = int(duration * rate)
    starts = np.array([s for s, _ in tones])
    freqs = np.array([f for _, f in tones])
    phase = 0.0
    rng = np.random.default_rng(0)
    for first in range(0, total, frame_size):
        n = min(frame_size, total - first)
        samples = np.zeros(n, np.float32)
        if tones:
            t = (first + np.arange(n)) / rate
            freq = freqs[np.clip(np.searchsorted(starts, t, side="right") - 1, 0, None)]
            # Integrate the frequency so the phase is continuous across tone changes.
            step = 2 * math.pi * freq / rate
            phases = phase + np.cumsum(step) - step
            phase = float(phases[-1] + step[-1]) % (2 * math.pi)
            # Quieter under speech, so the voice stays intelligible.
            samples += ((0.15 if spoken else 0.5) * np.sin(phases)).astype(np.float32)
        if noise:
            samples += rng.normal(0.0, noise, n).astype(np.float32)
        for start, voice, _ in spoken:
            offset = int(round(start * rate))
            lo, hi = max(first, offset), min(first + n, offset + len(voice))
            if lo < hi:
                samples[lo - first : hi - first] += voice[lo - offset : hi - offset]
        if n < frame_size:
            samples = np.pad(samples, (0, frame_size - n))
        frame = av.AudioFrame.from_ndarray(samples[None], format="fltp", layout="mono")
        frame.sample_rate = rate
        frame.pts = first
        yield first / rate, stream.encode(frame)
    yield math.inf, stream.encode()

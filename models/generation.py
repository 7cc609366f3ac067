"""Token-by-token generation from input embeddings, and attribution of an answer to
the parts of its prompt.

``generate_tokens`` runs the causal LM on ``inputs_embeds`` once, then one token at a
time on its KV cache, yielding each new token id as soon as it is chosen: greedy by
default, temperature / top-p sampling when asked. Working from embeddings is what lets
a prompt hold memory tokens that are not words.

``attention_shares`` scores prompt ranges by the attention the question and the answer
paid them: one extra forward pass over prompt + answer with eager attention, the
attention of every question and answer position averaged over layers and heads,
summed per range, and normalised. The question's own attention makes the ranking say
what the model found relevant to the question even when a small model's answer
wanders. A pass whose attention maps would not fit ``max_attention_bytes`` is skipped
(the caller then ranks by retrieval scores).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from vstream.config import JsonConfig
from vstream.errors import ConfigError


@dataclass
class GenerationConfig(JsonConfig):
    """How an answer is generated.

    Attributes:
        max_new_tokens: longest answer in tokens (default 160).
        temperature: 0 (default) is greedy decoding; above 0 samples at that temperature.
        top_p: nucleus sampling mass when sampling (default 1.0: the whole distribution).
        seed: seed of the sampler (default 0); the same seed gives the same answer.
        attribute: rank the evidence by the answer's attention (default True).
    """

    max_new_tokens: int = 160
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    attribute: bool = True

    def __post_init__(self) -> None:
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
            raise ConfigError(f"GenerationConfig.max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0):
            raise ConfigError(f"GenerationConfig.temperature must be >= 0, got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ConfigError(f"GenerationConfig.top_p must be in (0, 1], got {self.top_p!r}")


def stop_ids(model, tokenizer) -> set[int]:
    """Token ids that end an answer: the generation config's EOS id(s) and the tokenizer's."""
    ids: set[int] = set()
    for value in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value is not None:
            ids.update(value)
    return ids


def _choose(logits: torch.Tensor, config: GenerationConfig, generator: torch.Generator) -> int:
    if config.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / config.temperature, dim=-1)
    if config.top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < config.top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def following_positions(positions: torch.Tensor, count: int) -> torch.Tensor:
    """``[A, 1, count]`` position ids of ``count`` tokens after a prompt placed at
    ``positions`` ``[A, 1, L]`` (M-RoPE's ``A`` = 3 axes): one step past the prompt's
    largest position on every axis, as a text token continues a multimodal prompt."""
    start = int(positions.max()) + 1
    steps = torch.arange(start, start + count, device=positions.device)
    return steps.view(1, 1, -1).expand(positions.shape[0], 1, -1)


def position_kwargs(positions: torch.Tensor | None, extra: int = 0) -> dict:
    """The ``position_ids`` keyword of a forward over a prompt placed at ``positions`` and
    ``extra`` tokens after it; {} for a prompt without positions (0..L-1)."""
    if positions is None:
        return {}
    return {"position_ids": torch.cat([positions, following_positions(positions, extra)], dim=2) if extra
            else positions}


@torch.inference_mode()
def generate_tokens(model, inputs_embeds: torch.Tensor, stop: set[int], config: GenerationConfig,
                    positions: torch.Tensor | None = None) -> Iterator[int]:
    """Yield answer token ids one by one. ``inputs_embeds``: ``[1, L, H]`` prompt;
    ``positions``: its position ids (``[3, 1, L]`` for M-RoPE), or None for 0..L-1."""
    generator = torch.Generator().manual_seed(config.seed)
    out = model(inputs_embeds=inputs_embeds, use_cache=True, **position_kwargs(positions))
    # the answer's positions, one per token, read from the prompt's once (no host read per token)
    following = None if positions is None else following_positions(positions, config.max_new_tokens)
    for i in range(config.max_new_tokens):
        token = _choose(out.logits[0, -1], config, generator)
        if token in stop:
            return
        yield token
        step = torch.tensor([[token]], device=inputs_embeds.device)
        placed = {} if following is None else {"position_ids": following[..., i : i + 1]}
        if hasattr(out, "cache"):  # transformers 5 renamed past_key_values to cache
            out = model(input_ids=step, cache=out.cache, use_cache=True, **placed)
        else:
            out = model(input_ids=step, past_key_values=out.past_key_values, use_cache=True, **placed)


@torch.inference_mode()
def attention_shares(model, inputs_embeds: torch.Tensor, answer_ids: list[int], ranges: list[tuple[int, int]],
                     question: tuple[int, int], max_attention_bytes: int = 1 << 30,
                     positions: torch.Tensor | None = None) -> list[float] | None:
    """Share of the attention of the ``question`` token range and of the answer that
    fell on each ``(start, end)`` token range of the prompt (summing to 1 over the
    ranges), or None when it cannot be measured: no ranges, or attention maps larger
    than ``max_attention_bytes``. ``positions``: the prompt's position ids, as given
    to ``generate_tokens``."""
    if not ranges:
        return None
    config = model.config.get_text_config()
    length = inputs_embeds.shape[1] + len(answer_ids)
    if config.num_hidden_layers * config.num_attention_heads * length * length * 4 > max_attention_bytes:
        return None
    answer = torch.tensor([answer_ids], dtype=torch.long, device=inputs_embeds.device)
    embeds = torch.cat([inputs_embeds, model.get_input_embeddings()(answer)], dim=1)
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        attentions = model(inputs_embeds=embeds, output_attentions=True,
                           **position_kwargs(positions, len(answer_ids))).attentions
    finally:
        model.set_attn_implementation(previous)
    prompt_length = inputs_embeds.shape[1]
    # the question's positions, and those whose outputs chose the answer tokens
    rows = torch.cat([torch.arange(*question), torch.arange(prompt_length - 1, length - 1)]).unique()
    mass = torch.stack([layer[0, :, rows, :prompt_length].float().mean(dim=(0, 1)) for layer in attentions]).mean(0)
    shares = torch.stack([mass[start:end].sum() for start, end in ranges])
    total = float(shares.sum())
    return (shares / total).tolist() if total > 0 else None

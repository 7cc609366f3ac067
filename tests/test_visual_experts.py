"""Visual experts (Mono-InternVL) on tiny random LLaMA and Qwen2: text-only input gives
the base model's logits exactly, a mixed sequence routes token by token, one training
step changes only the experts, the experts save and load alone, cached generation
after a visual prefix matches a forward without cache."""

from __future__ import annotations

import pytest
import torch
from tiny_models import LLAMA, tiny_llama

from vstream.errors import ConfigError, ModelLoadError
from vstream.models.heads import create_head, list_heads
from vstream.models.heads.visual_experts import VisualExperts, VisualExpertsConfig

torch.set_num_threads(1)
VOCAB = 300


def tiny_qwen2(seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, **LLAMA)).eval()


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("llama"))


def load_llama(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(params=["llama", "qwen2"])
def pair(request, llama_folder):
    """(base, model with experts): two copies of the same weights."""
    make = (lambda: load_llama(llama_folder)) if request.param == "llama" else tiny_qwen2
    return make(), make()


def perturb(experts: VisualExperts, seed: int = 1) -> None:
    """Move the experts away from their text-FFN init, so routing shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in experts.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.2)


def ids(batch: int = 2, length: int = 10, seed: int = 0):
    return torch.randint(4, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_registered_and_config():
    assert "visual_experts" in list_heads()
    assert VisualExpertsConfig.from_json(VisualExpertsConfig(layers=[1, 0]).to_json()).layers == [0, 1]
    for bad in ([], [0, 0], [-1], "some", [True]):
        with pytest.raises(ConfigError):
            VisualExpertsConfig(layers=bad)


def test_text_only_equals_base(pair):
    base, model = pair
    experts = create_head("visual_experts", model)
    perturb(experts)
    tokens = ids()
    with torch.no_grad():
        want = base(tokens).logits
        assert torch.equal(model(tokens).logits, want)
        with experts.visual_mask(torch.zeros(tokens.shape, dtype=torch.bool)):
            assert torch.equal(model(tokens).logits, want)


def test_ffn_routes_per_token(pair):
    """At one layer: the output equals FFN_text or FFN_visual picked per token, exactly."""
    _, model = pair
    experts = VisualExperts(model, layers=[1])
    perturb(experts)
    ffn = model.model.layers[1].mlp
    hidden = torch.randn(2, 7, LLAMA["hidden_size"])
    mask = torch.rand(2, 7, generator=torch.Generator().manual_seed(3)) < 0.5
    experts._routing.active = mask
    with torch.no_grad():
        out = ffn(hidden)
        text, visual = ffn.text(hidden), ffn.visual(hidden)
    for b in range(2):
        for t in range(7):
            assert torch.equal(out[b, t], visual[b, t] if mask[b, t] else text[b, t])
    assert not torch.equal(text, visual)


def test_mixed_sequence_matches_reference(pair):
    """Whole model: a mixed sequence equals a reference whose FFNs run token by token."""
    base, model = pair
    experts = create_head("visual_experts", model)
    perturb(experts)
    tokens = ids(length=9)
    mask = torch.zeros(tokens.shape, dtype=torch.bool)
    mask[0, 1:5] = True
    mask[1, 3:8] = True
    for layer, expert in experts.experts().items():
        base.model.layers[layer].mlp = _TokenByToken(base.model.layers[layer].mlp, expert, mask)
    with torch.no_grad(), experts.visual_mask(mask):
        got = model(tokens).logits
    with torch.no_grad():
        want = base(tokens).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        text_only = model(tokens).logits
    assert not torch.allclose(got[0, 1:], text_only[0, 1:], atol=1e-3)


class _TokenByToken(torch.nn.Module):
    def __init__(self, text, visual, mask):
        super().__init__()
        self.text, self.visual, self.mask = text, visual, mask

    def forward(self, hidden):
        out = torch.empty_like(hidden)
        for b in range(hidden.shape[0]):
            for t in range(hidden.shape[1]):
                ffn = self.visual if self.mask[b, t] else self.text
                out[b, t] = ffn(hidden[b, t][None, None])[0, 0]
        return out


def test_one_step_trains_only_experts(pair):
    _, model = pair
    experts = VisualExperts(model)
    base_before = {k: v.clone() for k, v in model.state_dict().items() if ".mlp.visual." not in k}
    expert_before = [p.clone() for p in experts.trainable_parameters()]
    assert all(p.requires_grad for p in experts.trainable_parameters())
    trainable = {id(p) for p in experts.trainable_parameters()}
    assert all(not p.requires_grad for p in model.parameters() if id(p) not in trainable)
    optimizer = torch.optim.AdamW(experts.trainable_parameters(), lr=1e-2)
    tokens = ids()
    mask = torch.zeros(tokens.shape, dtype=torch.bool)
    mask[:, :6] = True
    with experts.visual_mask(mask):
        loss = model(tokens, labels=tokens).loss
    loss.backward()
    optimizer.step()
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base_before.items())
    assert all(not torch.equal(a, b) for a, b in zip(experts.trainable_parameters(), expert_before))


def test_save_load_round_trip(tmp_path, llama_folder):
    model = load_llama(llama_folder)
    experts = VisualExperts(model, layers=[0])
    perturb(experts)
    experts.save_experts(tmp_path / "experts")
    assert sorted(p.name for p in (tmp_path / "experts").iterdir()) == [
        "visual_experts.json", "visual_experts.safetensors"]
    tokens = ids()
    mask = torch.zeros(tokens.shape, dtype=torch.bool)
    mask[:, 2:7] = True
    with torch.no_grad(), experts.visual_mask(mask):
        want = model(tokens).logits

    fresh = load_llama(llama_folder)
    loaded = VisualExperts.from_folder(fresh, tmp_path / "experts")
    assert loaded.config.layers == [0]
    with torch.no_grad(), loaded.visual_mask(mask):
        assert torch.equal(fresh(tokens).logits, want)

    with pytest.raises(ConfigError):
        VisualExperts(load_llama(llama_folder), layers=[1]).load_experts(tmp_path / "experts")
    with pytest.raises(ModelLoadError, match="base"):
        VisualExperts(tiny_qwen2(), layers=[0]).load_experts(tmp_path / "experts")
    with pytest.raises(ModelLoadError):
        loaded.load_experts(tmp_path / "nothing")


def test_cached_generation_with_visual_prefix(pair):
    _, model = pair
    experts = VisualExperts(model)
    perturb(experts)
    tokens = ids(batch=1, length=8)
    mask = torch.zeros(tokens.shape, dtype=torch.bool)
    mask[:, :5] = True
    with torch.no_grad(), experts.visual_mask(mask):
        out = model.generate(tokens, max_new_tokens=4, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0)
        sequence = out.sequences
        full = torch.zeros(sequence.shape, dtype=torch.bool)
        full[:, :5] = True
        with experts.visual_mask(full):  # no cache: the new tokens are text
            reference = model(sequence, use_cache=False).logits
    assert sequence.shape == (1, 12)
    for step, logits in enumerate(out.logits):
        torch.testing.assert_close(logits[0], reference[0, 7 + step], rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        text_only = model(sequence[:, :8]).logits
    assert not torch.allclose(text_only[0, -1], reference[0, 7], atol=1e-3)


def test_remove_restores_base(llama_folder):
    base, model = load_llama(llama_folder), load_llama(llama_folder)
    experts = VisualExperts(model)
    perturb(experts)
    experts.remove()
    tokens = ids()
    with torch.no_grad(), experts.visual_mask(torch.ones(tokens.shape, dtype=torch.bool)):
        assert torch.equal(model(tokens).logits, base(tokens).logits)
    assert set(model.state_dict()) == set(base.state_dict())


def test_bad_inputs(llama_folder):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=64))
    with pytest.raises(ModelLoadError, match="GPT2LMHeadModel"):
        create_head("visual_experts", gpt2)
    model = load_llama(llama_folder)
    with pytest.raises(ConfigError, match="out of range"):
        VisualExperts(model, layers=[5])
    experts = VisualExperts(model)
    with pytest.raises(ConfigError), experts.visual_mask(torch.zeros(2, 3)):
        pass
    with pytest.raises(ConfigError, match="batch"), experts.visual_mask(torch.zeros(3, 10, dtype=torch.bool)):
        model(ids())

"""Model core: sizes, RoPE/GQA, image merge, generation, checkpoints, towers, tokenizer."""
from __future__ import annotations

import pytest
import torch

from model.checkpoint import (CheckpointError, build_config, checkpoint_name, load_model, read_checkpoint,
                              save_checkpoint)
from model.config import VLMConfig, minimind_intermediate_size
from model.generation import GenerationConfig, generate, stream_generate
from model.language_model import MiniMindLM, apply_rope, rope_tables
from model.tokenization import IGNORE_INDEX, ChatEncoder, image_token_id
from model.vision import VisionTowerNotFound, load_vision_tower
from model.vlm import merge_image_features
from tests.helpers import make_tiny_model, random_image


def lm_params(**kw) -> int:
    cfg = VLMConfig(vocab_size=6400, image_token_id=3, **kw)
    return sum(p.numel() for p in MiniMindLM(cfg).parameters())


def test_published_minimind2_sizes():
    assert minimind_intermediate_size(512) == 1408
    assert minimind_intermediate_size(768) == 2048
    small = lm_params(hidden_size=512, num_hidden_layers=8)
    large = lm_params(hidden_size=768, num_hidden_layers=16)
    assert 25.5e6 < small < 26.5e6, small
    assert 103.5e6 < large < 104.5e6, large
    assert VLMConfig().hidden_size == 768 and VLMConfig().num_hidden_layers == 16  # guide's default


def test_moe_adds_experts_and_aux_loss(tokenizer, tiny_tower):
    model = make_tiny_model(tokenizer, tiny_tower, use_moe=True).train()
    layer = model.llm.layers[0].mlp
    assert len(layer.experts) == 4 and len(layer.shared_experts) == 1 and layer.top_k == 2
    enc = ChatEncoder(tokenizer, 196).encode([{"role": "user", "content": "<image>\nWhat?"},
                                              {"role": "assistant", "content": "Liver"}])
    feats = tiny_tower(tiny_tower.preprocess([random_image(0)]))
    out = model(torch.tensor([enc.input_ids]), feats, torch.tensor([enc.labels]))
    loss, n, aux = out.loss_sum, out.n_targets, out.aux_loss
    assert n == len([t for t in enc.labels if t != IGNORE_INDEX])
    assert aux.item() > 0
    (loss + aux).backward()
    assert model.llm.layers[0].mlp.gate.weight.grad.abs().sum() > 0


def test_rope_preserves_norm_and_relative_positions():
    cos, sin = rope_tables(16, 64, 1e6)
    q = torch.randn(1, 1, 1, 16)
    k = torch.randn(1, 1, 1, 16)
    def rot(x, p):
        return apply_rope(x, cos[p].view(1, 1, 1, -1), sin[p].view(1, 1, 1, -1))
    assert torch.allclose(rot(q, 5).norm(), q.norm(), atol=1e-5)
    # q.k depends only on the distance between positions
    d1 = (rot(q, 7) * rot(k, 3)).sum()
    d2 = (rot(q, 20) * rot(k, 16)).sum()
    assert torch.allclose(d1, d2, atol=1e-4)


def test_gqa_shapes(tokenizer, tiny_tower):
    model = make_tiny_model(tokenizer, tiny_tower, num_attention_heads=4, num_key_value_heads=2)
    attn = model.llm.layers[0].self_attn
    assert attn.qkv_proj.parts == {"q_proj": 4 * 16, "k_proj": 2 * 16, "v_proj": 2 * 16}
    h = model.llm(torch.randn(2, 7, 64))
    assert h.shape == (2, 7, 64)


def test_merge_replaces_image_tokens_in_order():
    ids = torch.tensor([[5, 9, 9, 6, 9, 9], [9, 9, 7, 7, 7, 7]])
    embeds = torch.zeros(2, 6, 3)
    feats = torch.arange(3 * 2 * 3, dtype=torch.float).view(3, 2, 3)  # 3 images x 2 tokens
    out = merge_image_features(embeds, ids, feats, image_token_id=9)
    assert torch.equal(out[0, 1], feats[0, 0]) and torch.equal(out[0, 2], feats[0, 1])
    assert torch.equal(out[0, 4], feats[1, 0]) and torch.equal(out[1, 1], feats[2, 1])
    assert torch.equal(out[0, 0], torch.zeros(3)) and torch.equal(out[1, 5], torch.zeros(3))


def test_merge_count_mismatch_is_an_error():
    ids = torch.tensor([[9, 9, 9, 1]])
    with pytest.raises(ValueError, match="image token count mismatch: the text has 3"):
        merge_image_features(torch.zeros(1, 4, 2), ids, torch.zeros(1, 2, 2), image_token_id=9)
    with pytest.raises(ValueError, match="mismatch"):
        merge_image_features(torch.zeros(1, 4, 2), ids, None, image_token_id=9)


def test_multi_image_sample(tokenizer, tiny_tower):
    model = make_tiny_model(tokenizer, tiny_tower)
    enc = ChatEncoder(tokenizer, 196).encode([
        {"role": "user", "content": "<image>\n<image>\nWhich scan shows the liver?"},
        {"role": "assistant", "content": "The first"}])
    assert enc.n_images == 2
    assert enc.input_ids.count(image_token_id(tokenizer)) == 2 * 196
    feats = tiny_tower(tiny_tower.preprocess([random_image(1), random_image(2)]))
    out = model(torch.tensor([enc.input_ids]), feats, torch.tensor([enc.labels]))
    loss, n = out.loss_sum, out.n_targets
    assert torch.isfinite(loss) and n > 0
    with pytest.raises(ValueError, match="mismatch"):
        model(torch.tensor([enc.input_ids]), feats[:1], torch.tensor([enc.labels]))


def test_image_token_id_comes_from_tokenizer(tokenizer, tiny_tower):
    cfg = build_config(tokenizer, tiny_tower, hidden_size=64, num_hidden_layers=1)
    assert cfg.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert cfg.vocab_size == len(tokenizer) and cfg.vision_hidden_size == 64 and cfg.image_tokens == 196


def _prompts(tokenizer, questions):
    enc = ChatEncoder(tokenizer, 196)
    return [enc.encode([{"role": "user", "content": f"<image>\n{q}"}], add_generation_prompt=True).input_ids
            for q in questions]


def test_cached_equals_uncached_and_batched_equals_single(tokenizer, tiny_tower):
    model = make_tiny_model(tokenizer, tiny_tower, spread=0.3)
    questions = ["What modality is this?", "Where is the liver in this image please?", "Abnormal?"]
    prompts = _prompts(tokenizer, questions)
    feats = tiny_tower(tiny_tower.preprocess([random_image(i) for i in range(3)]))
    cfg = GenerationConfig(max_new_tokens=12)
    eos, pad = model.config.eos_token_id, model.config.pad_token_id
    cached = generate(model, prompts, feats, cfg, eos, pad)
    uncached = generate(model, prompts, feats, GenerationConfig(max_new_tokens=12, use_cache=False), eos, pad)
    single = [generate(model, [p], feats[i:i + 1], cfg, eos, pad)[0] for i, p in enumerate(prompts)]
    assert cached == uncached
    assert cached == single
    assert len({tuple(c) for c in cached}) > 1, "outputs should depend on the input"
    assert all(len(c) > 2 for c in cached)
    streamed = list(stream_generate(model, prompts[0], feats[:1], cfg, eos, pad))
    assert streamed == cached[0]


def test_sampling_is_seeded_and_top_p_small_is_greedy(tokenizer, tiny_tower):
    model = make_tiny_model(tokenizer, tiny_tower, spread=0.3)
    prompts = _prompts(tokenizer, ["What modality is this?"])
    feats = tiny_tower(tiny_tower.preprocess([random_image(0)]))
    eos, pad = model.config.eos_token_id, model.config.pad_token_id
    s1 = generate(model, prompts, feats, GenerationConfig(10, temperature=1.0, seed=3), eos, pad)
    s2 = generate(model, prompts, feats, GenerationConfig(10, temperature=1.0, seed=3), eos, pad)
    greedy = generate(model, prompts, feats, GenerationConfig(10), eos, pad)
    nucleus = generate(model, prompts, feats, GenerationConfig(10, temperature=1.0, top_p=1e-6, seed=1), eos, pad)
    assert s1 == s2
    assert nucleus == greedy


def test_checkpoint_roundtrip(tmp_path, tokenizer, tiny_tower):
    model = make_tiny_model(tokenizer, tiny_tower, spread=0.1)
    path = save_checkpoint(tmp_path / "m.pth", model, tokenizer, stage="sft", step=42)
    obj = read_checkpoint(path)
    assert not any(k.startswith("vision_tower.") for k in obj["model"])
    assert obj["config"]["hidden_size"] == 64 and obj["vision"]["id"] == "random-tiny"
    loaded = load_model(path)
    assert loaded.stage == "sft" and loaded.step == 42 and loaded.config == model.config
    assert len(loaded.tokenizer) == len(tokenizer)
    ids = torch.tensor([_prompts(tokenizer, ["Which organ?"])[0]])
    feats = tiny_tower(tiny_tower.preprocess([random_image(5)]))
    assert torch.equal(loaded.model(ids, feats), model(ids, feats))
    assert not list(tmp_path.glob("*.tmp"))


def test_checkpoint_names():
    assert checkpoint_name("sft", 768, False) == "medical_vlm_768.pth"
    assert checkpoint_name("pretrain", 512, True) == "medical_pretrain_vlm_512_moe.pth"


def test_bad_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="python train_sft_vlm.py"):
        load_model(tmp_path / "missing.pth", stage_hint="sft")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a readable PyTorch file"):
        load_model(junk)
    truncated = tmp_path / "trunc.pth"
    torch.save({"format": "medical-vlm", "model": {"w": torch.zeros(1000)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(CheckpointError):
        load_model(truncated)
    foreign = tmp_path / "llm_512.pth"
    torch.save({"tok_embeddings.weight": torch.zeros(4, 2)}, foreign)
    with pytest.raises(CheckpointError, match="--from_llm"):
        load_model(foreign)


def test_checkpoint_refuses_other_vision_weights(tmp_path, tokenizer, tiny_tower):
    model = make_tiny_model(tokenizer, tiny_tower)
    path = save_checkpoint(tmp_path / "m.pth", model, tokenizer, stage="sft", step=1)
    obj = torch.load(path, weights_only=True)
    obj["vision"]["fingerprint"] = "0000000000000000"
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match="would not match"):
        load_model(path)


def test_random_towers_are_reproducible(tiny_tower):
    again = load_vision_tower("random-tiny")
    x = tiny_tower.preprocess([random_image(3)])
    assert torch.equal(tiny_tower(x), again(x))
    assert tiny_tower.fingerprint() == again.fingerprint()
    assert tiny_tower(x).shape == (1, 196, 64)
    assert all(not p.requires_grad for p in tiny_tower.parameters())
    # fixed values: a change in the construction would silently change every feature
    w = tiny_tower.model.get_input_embeddings().weight
    assert w.shape == (64, 3, 16, 16)
    assert abs(float(w.double().sum()) - 7.786560179811659) < 1e-5
    torch.manual_seed(123)  # the global RNG must not matter
    assert torch.equal(load_vision_tower("random-tiny").model.get_input_embeddings().weight, w)


def test_random_full_size_tower_shape():
    tower = load_vision_tower("random")
    assert tower.hidden_size == 768 and tower.num_patches == 196 and tower.is_random


def test_missing_clip_gives_clone_command(tmp_path):
    with pytest.raises(VisionTowerNotFound, match="git clone https://huggingface.co/openai/clip-vit-base-patch16"):
        load_vision_tower("model/vision_model/clip-vit-base-patch16-absent")


def test_unreachable_hub_id_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(VisionTowerNotFound, match="--vision_model random"):
        load_vision_tower("openai/clip-vit-base-patch16")


def test_clip_directory_loads_like_hub_layout(tmp_path, tiny_tower):
    """A local folder in HF layout (what `git clone` of the hub repo gives) loads through
    the same from_pretrained path users run."""
    folder = tmp_path / "clip"
    tiny_tower.model.save_pretrained(folder)
    tiny_tower.processor.save_pretrained(folder)
    tower = load_vision_tower(str(folder))
    x = tiny_tower.preprocess([random_image(4)])
    assert not tower.is_random
    assert torch.allclose(tower(x), tiny_tower(x))
    assert tower.fingerprint() != tiny_tower.fingerprint() or tower.name != tiny_tower.name


def test_tokenizer_roundtrip_and_chat_template(tokenizer):
    text = "Which organ is abnormal? The Liver, left lung (3 lesions)."
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    msgs = [{"role": "user", "content": "<image>\nWhat is it?"}, {"role": "assistant", "content": "Liver"}]
    rendered = tokenizer.apply_chat_template(msgs, tokenize=False)
    assert rendered == "<|im_start|>user\n<image>\nWhat is it?<|im_end|>\n<|im_start|>assistant\nLiver<|im_end|>\n"
    enc = ChatEncoder(tokenizer, 4).encode(msgs)
    decoded = tokenizer.decode(enc.input_ids).replace("<|image_pad|>" * 4, "<image>")
    assert decoded + "\n" == rendered
    targets = [t for t in enc.labels if t != IGNORE_INDEX]
    assert tokenizer.decode(targets) == "Liver<|im_end|>"
    for name, idx in [("<|endoftext|>", 0), ("<|im_start|>", 1), ("<|im_end|>", 2), ("<|image_pad|>", 3)]:
        assert tokenizer.convert_tokens_to_ids(name) == idx


def test_foreign_tokenizer_gets_image_token(tmp_path, tokenizer):
    """A ChatML tokenizer without the image token (like MiniMind's) works via --tokenizer_path."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import PreTrainedTokenizerFast
    from model.tokenization import load_tokenizer
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(["hello world"] * 10, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=raw).save_pretrained(tmp_path)
    tok = load_tokenizer(str(tmp_path))
    assert image_token_id(tok) == len(tok) - 1
    assert tok.pad_token == "<|endoftext|>"
    with pytest.raises(FileNotFoundError, match="--tokenizer_path"):
        load_tokenizer(str(tmp_path / "nope"))

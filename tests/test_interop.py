"""MiniMind interop (issue #12): both tokenizer eras, both weight namings (MoE included),
checked against an independent, straightforward statement of MiniMind's math written here,
not against this project's own modules."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from dataset.demo import write_demo_release
from dataset.slake import convert, read_release
from model.checkpoint import build_config, from_pretrained, load_model
from model.minimind_weights import load_minimind_llm
from model.tokenization import ChatEncoder, chat_markers, load_tokenizer
from model.vlm import MedicalVLM
from trainer.cli import main as train_main

H, HEADS, KV, LAYERS, EXPERTS, SHARED, TOPK = 64, 4, 2, 2, 4, 1, 2
FFN = 64 * math.ceil(8 * H / 3 / 64)
THETA, EPS = 1e6, 1e-5

# The 2025-02 MiniMind tokenizer's chat format, as the issue states it:
# <s>system\n...</s>\n<s>user\n...</s>\n<s>assistant\n...</s>\n (written here, not copied)
GUIDE_TEMPLATE = (
    "{% for m in messages %}{{ '<s>' + m['role'] + '\\n' + m['content'] + '</s>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<s>assistant\\n' }}{% endif %}")


# ----------------------------------------------------------------------------- reference math

def rms(x, w):
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)).type_as(x)


def rope_interleaved(x, t):
    """MiniMind 2025-02: complex rotation of consecutive pairs (x0,x1), (x2,x3), ..."""
    d = x.shape[-1]
    freqs = 1.0 / THETA ** (torch.arange(0, d, 2).float() / d)
    cis = torch.polar(torch.ones(t, d // 2), torch.outer(torch.arange(t).float(), freqs))
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * cis[None, :, None, :]).flatten(3)


def rope_half(x, t):
    """MiniMind 2025-10: rotate_half on (first half, second half)."""
    d = x.shape[-1]
    freqs = 1.0 / THETA ** (torch.arange(0, d, 2).float() / d)
    ang = torch.outer(torch.arange(t).float(), freqs)
    cos, sin = torch.cat([ang, ang], -1).cos()[None, :, None], torch.cat([ang, ang], -1).sin()[None, :, None]
    rot = torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1)
    return x * cos + rot * sin


def ffn(x, w1, w2, w3):
    return F.silu(x @ w1.T) * (x @ w3.T) @ w2.T


def minimind_logits(sd: dict, ids: torch.Tensor, naming: str, moe: bool) -> torch.Tensor:
    old = naming == "old"
    g = (lambda k: sd[k])
    x = g("tok_embeddings.weight" if old else "model.embed_tokens.weight")[ids]
    b, t, _ = x.shape
    hd = H // HEADS
    for i in range(LAYERS):
        p = f"layers.{i}." if old else f"model.layers.{i}."
        att = p + ("attention." if old else "self_attn.")
        names = ("wq", "wk", "wv", "wo") if old else ("q_proj", "k_proj", "v_proj", "o_proj")
        h = rms(x, g(p + ("attention_norm.weight" if old else "input_layernorm.weight")))
        q = (h @ g(att + names[0] + ".weight").T).view(b, t, HEADS, hd)
        k = (h @ g(att + names[1] + ".weight").T).view(b, t, KV, hd)
        v = (h @ g(att + names[2] + ".weight").T).view(b, t, KV, hd)
        rope = rope_interleaved if old else rope_half
        q, k = rope(q, t), rope(k, t)
        rep = HEADS // KV
        k = k[:, :, :, None].expand(b, t, KV, rep, hd).reshape(b, t, HEADS, hd)
        v = v[:, :, :, None].expand(b, t, KV, rep, hd).reshape(b, t, HEADS, hd)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        scores = scores + torch.full((t, t), float("-inf")).triu(1)
        out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(b, t, H)
        x = x + out @ g(att + names[3] + ".weight").T
        h = rms(x, g(p + ("ffn_norm.weight" if old else "post_attention_layernorm.weight")))
        f = p + ("feed_forward." if old else "mlp.")
        w = ("w1", "w2", "w3") if old else ("gate_proj", "down_proj", "up_proj")
        if not moe:
            x = x + ffn(h, *(g(f + n + ".weight") for n in w))
            continue
        flat = h.reshape(-1, H)
        probs = (flat @ g(f + "gate.weight").T).softmax(-1)
        top_w, top_i = probs.topk(TOPK, -1)
        top_w = top_w / top_w.sum(-1, keepdim=True)
        y = torch.zeros_like(flat)
        for r in range(flat.shape[0]):
            for j in range(TOPK):
                e = int(top_i[r, j])
                y[r] += top_w[r, j] * ffn(flat[r:r + 1], *(g(f + f"experts.{e}." + n + ".weight") for n in w))[0]
        shared = f + ("shared_experts." if old else "shared_experts.0.")
        y = y + ffn(flat, *(g(shared + n + ".weight") for n in w))
        x = x + y.view(b, t, H)
    x = rms(x, g("norm.weight" if old else "model.norm.weight"))
    return x @ g("output.weight" if old else "lm_head.weight").T


def minimind_state_dict(vocab: int, naming: str, moe: bool, seed: int = 0) -> dict:
    """Random weights under MiniMind's own names and shapes (every key pattern)."""
    gen = torch.Generator().manual_seed(seed)
    r = (lambda *shape: torch.randn(*shape, generator=gen) * 0.08)  # noqa: E731
    old = naming == "old"
    sd = {("tok_embeddings.weight" if old else "model.embed_tokens.weight"): r(vocab, H)}
    hd = H // HEADS
    for i in range(LAYERS):
        p = f"layers.{i}." if old else f"model.layers.{i}."
        att = p + ("attention." if old else "self_attn.")
        for n, rows in zip(("wq", "wk", "wv") if old else ("q_proj", "k_proj", "v_proj"), (HEADS, KV, KV)):
            sd[att + n + ".weight"] = r(rows * hd, H)
        sd[att + ("wo" if old else "o_proj") + ".weight"] = r(H, H)
        sd[p + ("attention_norm" if old else "input_layernorm") + ".weight"] = 1 + r(H)
        sd[p + ("ffn_norm" if old else "post_attention_layernorm") + ".weight"] = 1 + r(H)
        f = p + ("feed_forward." if old else "mlp.")
        w = ("w1", "w2", "w3") if old else ("gate_proj", "down_proj", "up_proj")
        shapes = ((FFN, H), (H, FFN), (FFN, H))
        if not moe:
            for n, shp in zip(w, shapes):
                sd[f + n + ".weight"] = r(*shp)
            continue
        sd[f + "gate.weight"] = r(EXPERTS, H) * 10
        for e in range(EXPERTS):
            for n, shp in zip(w, shapes):
                sd[f + f"experts.{e}." + n + ".weight"] = r(*shp)
        shared = f + ("shared_experts." if old else "shared_experts.0.")  # 2025-02: one module, no index
        for n, shp in zip(w, shapes):
            sd[shared + n + ".weight"] = r(*shp)
    sd["norm.weight" if old else "model.norm.weight"] = 1 + r(H)
    sd["output.weight" if old else "lm_head.weight"] = sd["tok_embeddings.weight" if old else "model.embed_tokens.weight"]
    return sd


def _our_model(tok, tiny_tower, moe):
    cfg = build_config(tok, tiny_tower, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                       num_key_value_heads=KV, use_moe=moe, n_routed_experts=EXPERTS, n_shared_experts=SHARED,
                       num_experts_per_tok=TOPK)
    return MedicalVLM(cfg, tiny_tower).eval()


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("naming", ["old", "new"])
def test_minimind_weights_give_minimind_logits(naming, moe, tokenizer, tiny_tower, tmp_path):
    vocab = len(tokenizer) - 1  # MiniMind's vocabulary has no image token
    sd = minimind_state_dict(vocab, naming, moe)
    torch.save(sd, tmp_path / "llm.pth")
    model = _our_model(tokenizer, tiny_tower, moe)
    load_minimind_llm(model, str(tmp_path / "llm.pth"))
    ids = torch.randint(0, vocab, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model.llm.lm_head(model.llm(model.llm.embed_tokens(ids)))[..., :vocab]
        ref = minimind_logits(sd, ids, naming, moe)
    assert (ours - ref).abs().max() < 1e-4
    assert ref.std() > 0.1  # the logits are not trivially small


def test_moe_aux_loss_is_minimind_sequence_level(tokenizer, tiny_tower):
    model = _our_model(tokenizer, tiny_tower, True).train()
    layer = model.llm.layers[0].mlp
    x = torch.randn(3, 7, H)
    layer(x)
    probs = (x.reshape(-1, H) @ layer.gate.weight.T).softmax(-1).view(3, 7, -1)
    top_i = probs.topk(TOPK, -1).indices.view(3, -1)
    expected = 0.0
    for b in range(3):  # per sequence: sum_i (E * share_i) * mean prob_i, then the mean over sequences
        share = torch.bincount(top_i[b], minlength=EXPERTS).float() / (7 * TOPK)
        expected += (EXPERTS * share * probs[b].mean(0)).sum() / 3
    assert float(layer.aux_loss.detach()) == pytest.approx(float(expected.detach()) * layer.alpha, rel=1e-5)


# ----------------------------------------------------------------------------- guide-era tokenizer

def guide_era_tokenizer(folder: Path) -> Path:
    """A tokenizer laid out like MiniMind's 2025-02 one: <unk>, <s>, </s> at ids 0, 1, 2, no
    ChatML tokens, turns as <s>role\\n...</s>\\n."""
    corpus = ["What modality is used to take this image?", "Which organ is abnormal?", "Is this image normal?",
              "The liver, the lung, the brain and the kidney.", "CT MRI X-Ray yes no left right"] * 50
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<unk>", chat_template=GUIDE_TEMPLATE)
    fast.save_pretrained(folder)
    return folder


def test_guide_era_tokenizer_is_accepted_with_its_ids(tmp_path):
    path = guide_era_tokenizer(tmp_path / "minimind_tokenizer")
    raw = json.loads((path / "tokenizer.json").read_text())
    tok = load_tokenizer(str(path))
    assert [tok.convert_ids_to_tokens(i) for i in (0, 1, 2)] == ["<unk>", "<s>", "</s>"]
    markers = chat_markers(tok)
    assert (markers.start, markers.end) == ("<s>", "</s>")
    base = len(raw["model"]["vocab"])
    assert tok.convert_tokens_to_ids("<|image_pad|>") == base  # appended: every trained id unchanged
    enc = ChatEncoder(tok, 4)
    e = enc.encode([{"role": "user", "content": "<image>\nIs this image normal?"},
                    {"role": "assistant", "content": "Yes"}])
    text = tok.decode(e.input_ids)
    assert text == "<s>user\n<|image_pad|><|image_pad|><|image_pad|><|image_pad|>\nIs this image normal?</s>\n" \
                   "<s>assistant\nYes</s>"
    assert tok.decode([t for t in e.labels if t != -100]) == "Yes</s>"
    assert enc.end_id == 2
    prompt = enc.encode([{"role": "user", "content": "Hi"}], add_generation_prompt=True).input_ids
    assert tok.decode(prompt) == tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                                         add_generation_prompt=True)


def test_guide_era_tokenizer_with_original_moe_weights_trains(tmp_path, tiny_tower):
    """The guide's combination: 2025-02 tokenizer + original-naming MoE weights, one
    training step, then the checkpoint loads with the same tokenizer and markers."""
    tok_dir = guide_era_tokenizer(tmp_path / "tok")
    vocab = len(load_tokenizer(str(tok_dir))) - 1
    torch.save(minimind_state_dict(vocab, "old", True), tmp_path / "llm_64_moe.pth")
    write_demo_release(tmp_path / "raw", seed=1, n_train=6, n_val=2, n_test=2)
    convert(read_release(tmp_path / "raw"), tmp_path / "data")
    d = tmp_path / "data"
    args = ["--vision_model", "random-tiny", "--hidden_size", str(H), "--num_hidden_layers", str(LAYERS),
            "--num_attention_heads", str(HEADS), "--num_key_value_heads", str(KV), "--use_moe", "--device", "cpu",
            "--num_workers", "0", "--tokenizer_path", str(tok_dir), "--from_llm", str(tmp_path / "llm_64_moe.pth"),
            "--data_path", str(d / "medical_pretrain.jsonl"), "--images_path", str(d / "medical_images"),
            "--out_dir", str(tmp_path / "out"), "--cache_dir", "", "--epochs", "1", "--batch_size", "2",
            "--stop_at_step", "1"]
    assert train_main("pretrain", args) == 0
    ckpt = load_model(tmp_path / "out" / f"medical_pretrain_vlm_{H}_moe.pth", vision_model="random-tiny")
    assert chat_markers(ckpt.tokenizer).end == "</s>" and ckpt.config.eos_token_id == 2
    assert ckpt.config.vocab_size == vocab + 1


# ----------------------------------------------------------------------------- save / load / share

import eval_vlm  # noqa: E402
import web_demo_vlm  # noqa: E402
from model.checkpoint import save_checkpoint  # noqa: E402
from scripts import export_hf  # noqa: E402
from tests.helpers import converted_demo, make_tiny_model, random_image  # noqa: E402


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return converted_demo(tmp_path_factory.mktemp("interop"), 8, 8, 2, 4)


@pytest.fixture(scope="module")
def pth(tmp_path_factory, tokenizer, tiny_tower):
    out = tmp_path_factory.mktemp("pth")
    model = make_tiny_model(tokenizer, tiny_tower, spread=0.15)
    return save_checkpoint(out / "medical_vlm_64.pth", model, tokenizer, "sft", 7,
                           extra={"train_config": {"data_path": "dataset/medical_vqa_train.jsonl", "epochs": 4,
                                                   "batch_size": 16, "learning_rate": 1e-4, "from_llm": ""},
                                  "data_source": "hub:BoKelvin/SLAKE", "epoch": 4})


def test_save_pretrained_round_trip_is_exact(pth, tmp_path, monkeypatch):
    ckpt = load_model(pth, vision_model="random-tiny")
    folder = ckpt.model.save_pretrained(tmp_path / "hf", ckpt.tokenizer, ckpt.stage, ckpt.step, extra=ckpt.meta)
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= {p.name for p in folder.iterdir()}
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("a model folder must load without pickle"))
    again = from_pretrained(folder, vision_model="random-tiny")
    ids = torch.randint(10, 500, (2, 9), generator=torch.Generator().manual_seed(0))  # no image token
    feats = ckpt.model.vision_tower(ckpt.model.vision_tower.preprocess([random_image(1)]))
    with torch.no_grad():
        a = ckpt.model(ids, None)
        b = again(ids, None)
    assert torch.equal(a, b)
    assert again.llm.lm_head.weight.data_ptr() == again.llm.embed_tokens.weight.data_ptr()  # still tied
    assert again.tokenizer.get_vocab() == ckpt.tokenizer.get_vocab()
    assert feats.shape[0] == 1
    card = (folder / "README.md").read_text()
    assert "Research use only" in card and "CC-BY-4.0" in card and "ISBI" in card and "RANDOM vision tower" in card
    assert ckpt.vision["fingerprint"] in card and "64 wide × 2 layers" in card


def test_export_script_metrics_and_push_offline(pth, tmp_path, monkeypatch, capsys):
    eval_dir = pth.parent / "eval" / "medical_vlm_64"
    eval_dir.mkdir(parents=True, exist_ok=True)
    (eval_dir / "metrics.json").write_text(json.dumps({
        "closed_accuracy": 0.75, "open_accuracy": 0.5, "overall_accuracy": 0.6, "count": {"all": 10},
        "data": "dataset/medical_vqa_test.jsonl",
        "baselines": {"majority_per_question": {"closed_accuracy": 0.5, "open_accuracy": 0.2, "overall_accuracy": 0.3}}}))
    calls = []
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo, **kw: calls.append(("create", repo, kw)))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, **kw: calls.append(("upload", kw)) or "url")
    out = tmp_path / "export"
    assert export_hf.main([str(pth), str(out), "--push_to_hub", "me/medvqa", "--private"]) == 0
    card = (out / "README.md").read_text()
    assert "| model | 75.0% | 50.0% | 60.0% |" in card and "majority per question" in card
    assert calls[0] == ("create", "me/medvqa", {"private": True, "exist_ok": True})
    assert calls[1][1]["folder_path"] == str(out) and calls[1][1]["repo_id"] == "me/medvqa"
    saved = json.loads((out / "config.json").read_text())
    assert saved["vision"] == torch.load(pth, weights_only=True)["vision"]  # exported without loading the tower

    def offline(self, **kw):
        raise OSError("no network")
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", offline)
    capsys.readouterr()
    assert export_hf.main([str(pth), str(tmp_path / "e2"), "--push_to_hub", "me/medvqa"]) == 2
    err = capsys.readouterr().err
    assert "upload to me/medvqa failed" in err and (tmp_path / "e2" / "model.safetensors").is_file()


def test_every_reader_takes_a_folder_or_hub_id(pth, demo, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "models" / "medvqa"
    export_hf.main([str(pth), str(folder)])
    common = ["--data_path", str(demo / "medical_vqa_test.jsonl"), "--images_path", str(demo / "medical_images"),
              "--train_path", str(demo / "medical_vqa_train.jsonl"), "--cache_dir", "", "--vision_model",
              "random-tiny"]
    assert eval_vlm.main(["--model_path", str(pth), "--out_dir", str(tmp_path / "a")] + common) == 0
    assert eval_vlm.main(["--model_path", str(folder), "--out_dir", str(tmp_path / "b")] + common) == 0
    preds = [(tmp_path / d / "eval" / n / "predictions.jsonl").read_text()
             for d, n in (("a", "medical_vlm_64"), ("b", "medvqa"))]
    assert preds[0] == preds[1]
    # a hub id: downloaded by huggingface_hub (here: a stand-in returning the local folder)
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: str(folder))
    assert eval_vlm.main(["--model_path", "me/medvqa", "--out_dir", str(tmp_path / "c")] + common) == 0
    assert (tmp_path / "c" / "eval" / "medvqa" / "predictions.jsonl").read_text() == preds[0]

    def offline(repo_id, **kw):
        raise OSError("offline")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    capsys.readouterr()
    assert eval_vlm.main(["--model_path", "me/other", "--out_dir", str(tmp_path / "d")] + common) == 2
    assert "could not fetch the model 'me/other'" in capsys.readouterr().err
    # the web demo: a folder is one checkpoint; a folder of checkpoints lists .pth files and model folders
    from webdemo.app import Session, checkpoints_in
    import shutil
    shutil.copy(pth, tmp_path / "models" / "medical_vlm_64.pth")
    assert checkpoints_in(folder) == [folder]
    listed = checkpoints_in(tmp_path / "models")
    assert listed == [tmp_path / "models" / "medical_vlm_64.pth", folder]
    s = Session(listed, "cpu", vision_model="random-tiny")
    assert s.model(str(folder)).path == folder and s.model(str(listed[0])).stage == "sft"
    import gradio as gr
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: None)
    assert web_demo_vlm.main(["--model_path", str(folder), "--vision_model", "random-tiny", "--port", "7862"]) == 0
    # --from_weight takes a folder too
    args = ["--vision_model", "random-tiny", "--hidden_size", "64", "--num_hidden_layers", "2", "--num_attention_heads",
            "4", "--num_key_value_heads", "2", "--device", "cpu", "--num_workers", "0", "--cache_dir", "",
            "--data_path", str(demo / "medical_vqa_train.jsonl"), "--images_path", str(demo / "medical_images"),
            "--val_path", "", "--out_dir", str(tmp_path / "t"), "--epochs", "1", "--batch_size", "4",
            "--stop_at_step", "1", "--from_weight", str(folder)]
    assert train_main("sft", args) == 0
    assert "starting from" in capsys.readouterr().err


def test_python_api_matches_eval(pth, demo, tmp_path):
    from evaluation.api import MedicalVQA
    assert eval_vlm.main(["--model_path", str(pth), "--out_dir", str(tmp_path), "--data_path",
                          str(demo / "medical_vqa_test.jsonl"), "--images_path", str(demo / "medical_images"),
                          "--train_path", "", "--cache_dir", "", "--vision_model", "random-tiny"]) == 0
    preds = [json.loads(line) for line in (tmp_path / "eval" / "medical_vlm_64" / "predictions.jsonl").read_text().splitlines()]
    records = [json.loads(line) for line in (demo / "medical_vqa_test.jsonl").read_text().splitlines()]
    vqa = MedicalVQA.load(pth, device="cpu", vision_model="random-tiny")
    answers = vqa.answer_many([(demo / "medical_images" / r["image"], p["question"]) for r, p in zip(records, preds)],
                              batch_size=5)
    assert answers == [p["prediction"] for p in preds]
    assert len(set(answers)) > 1
    assert vqa.answer(demo / "medical_images" / records[0]["image"], preds[0]["question"]) == answers[0]
    from webdemo.app import EXAMPLES_DIR
    assert isinstance(vqa.answer(EXAMPLES_DIR / "ct_abdomen_lesion.dcm", "Is there a lesion?"), str)  # DICOM


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_fused_projections_equal_the_split_form_and_keep_split_names(moe, tokenizer, tiny_tower, tmp_path):
    """q/k/v and gate/up run as one matrix product each (model.language_model.FusedLinear), but
    every state dict, checkpoint and safetensors file holds MiniMind's split names; the fused
    layers give the split layers' outputs, and a model loaded from the split names gives
    identical logits."""
    import torch.nn.functional as F

    model = _our_model(tokenizer, tiny_tower, moe)
    sd = model.state_dict()
    assert not any("qkv_proj" in k or "gate_up_proj" in k for k in sd)
    for part in ("q_proj", "k_proj", "v_proj"):
        assert f"llm.layers.0.self_attn.{part}.weight" in sd
    mlp = "llm.layers.0.mlp." + ("experts.0." if moe else "")
    assert f"{mlp}gate_proj.weight" in sd and f"{mlp}up_proj.weight" in sd
    x = torch.randn(2, 5, H, generator=torch.Generator().manual_seed(3))
    attn = model.llm.layers[0].self_attn
    q, k, v = attn.qkv_proj(x).split(list(attn.qkv_proj.parts.values()), dim=-1)
    for got, part in ((q, "q_proj"), (k, "k_proj"), (v, "v_proj")):
        assert torch.allclose(got, F.linear(x, sd[f"llm.layers.0.self_attn.{part}.weight"]), atol=1e-6)
    ff = model.llm.layers[0].mlp.experts[0] if moe else model.llm.layers[0].mlp
    split = F.linear(F.silu(F.linear(x, sd[f"{mlp}gate_proj.weight"])) * F.linear(x, sd[f"{mlp}up_proj.weight"]),
                     sd[f"{mlp}down_proj.weight"])
    assert torch.allclose(ff(x), split, atol=1e-6)
    # a checkpoint with the split names (as every file before the fusion) loads into the fused model
    other = _our_model(tokenizer, tiny_tower, moe)
    other.load_state_dict(sd)
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(model.llm.lm_head(model.llm(model.llm.embed_tokens(ids))),
                           other.llm.lm_head(other.llm(other.llm.embed_tokens(ids))))
    # a part missing is reported under its split name by the strict loader
    from model.checkpoint import CheckpointError, load_weights
    broken = {k: v for k, v in model.trainable_state_dict().items() if not k.endswith("layers.1.self_attn.k_proj.weight")}
    with pytest.raises(CheckpointError, match=r"missing \(1\): llm.layers.1.self_attn.k_proj.weight"):
        load_weights(other, broken, "test")

"""Learning (issue #13): image-use metrics, the hard synthetic set, answer-constrained decoding."""
from __future__ import annotations

import json
from collections import Counter, defaultdict

import pytest
import torch

import convert_slake_dataset
import eval_vlm
from dataset.demo_hard import KINDS, write_hard_release
from evaluation.metrics import image_use, image_use_verdict
from model.checkpoint import save_checkpoint
from model.constrain import AnswerTrie, build_answer_trie
from model.generation import GenerationConfig, generate
from model.tokenization import ChatEncoder
from tests.helpers import make_tiny_model


def test_image_use_metrics_catch_a_prior_only_model():
    train = [dict(question="Is there a cyst?", answer=a, answer_type="CLOSED") for a in ("Yes", "Yes", "No")] + \
            [dict(question="How many cysts?", answer=a, answer_type="OPEN") for a in ("1", "2", "2")]
    test = [dict(question="Is there a cyst?", answer=a, answer_type="CLOSED") for a in ("Yes", "No", "No", "Yes")] + \
           [dict(question="How many cysts?", answer=a, answer_type="OPEN") for a in ("2", "1", "3")]
    blind = [dict(t, prediction={"Is there a cyst?": "Yes", "How many cysts?": "2"}[t["question"]]) for t in test]
    seeing = [dict(t, prediction=t["answer"]) for t in test]
    u = image_use(train, blind)
    assert u["closed"]["against_prior_count"] == 2 and u["closed"]["against_prior_accuracy"] == 0.0
    assert u["closed"]["varies_with_image"] == 0.0 and u["open"]["against_prior_count"] == 2
    assert "NOT USING THE IMAGE for closed and open" in image_use_verdict({"image_use": u})
    u = image_use(train, seeing)
    assert u["closed"]["against_prior_accuracy"] == 1.0 and u["open"]["varies_with_image"] == 1.0
    assert "the answers depend on the image" in image_use_verdict({"image_use": u})


def test_hard_set_makes_priors_useless(tmp_path):
    raw = write_hard_release(tmp_path / "raw", seed=0, n_train=200, n_val=10, n_test=60)
    params = json.loads((raw / "demo_params.json").read_text())
    train = json.loads((raw / "train.json").read_text())
    by_text = defaultdict(Counter)
    for r in train:
        if r["answer_type"] == "CLOSED":
            by_text[r["question"]][r["answer"]] += 1
    frequent = {q: c for q, c in by_text.items() if sum(c.values()) >= 20}
    assert len(frequent) >= 10  # compositional: many distinct closed question texts
    for q, c in frequent.items():  # each text answered yes and no about equally often
        assert 0.3 <= c["Yes"] / sum(c.values()) <= 0.7, (q, c)
    for r in train:  # every answer follows from the drawing parameters (re-derived here)
        p = params[r["img_name"]]
        f = p["findings"]
        q = r["question"]
        if q.startswith("Is there a "):
            kind, side = q.split()[3], q.split()[6]
            assert r["answer"] == ("Yes" if kind in f[side] else "No")
        elif q.startswith("How many findings are in the "):
            assert r["answer"] == str(len(f[q.split()[6]]))
        elif q.startswith("How many ") and q.endswith("s are in the image?"):
            kind = q.split()[2][:-1]
            assert kind in KINDS and r["answer"] == str(sum(x == kind for s in ("left", "right") for x in f[s]))
        elif q.startswith("What kind of finding"):
            assert r["answer"].lower() == f[q.split()[7]][0]
    out = tmp_path / "d"
    assert convert_slake_dataset.main(["--demo", "hard", "--out_dir", str(out), "--demo_images", "200", "10", "60"]) == 0
    base = json.loads((out / "manifest.json").read_text())["baselines_test"]["majority_per_question"]
    assert base["closed_accuracy"] < 0.62  # the per-question prior is close to a coin flip


def _trie_model(tokenizer, tiny_tower):
    return make_tiny_model(tokenizer, tiny_tower, spread=0.3)


def test_constrained_decoder_never_leaves_its_answer_set(tokenizer, tiny_tower):
    model = _trie_model(tokenizer, tiny_tower)
    closed = ["Yes", "No"]
    open_ = ["Left Lung", "Liver", "Brain Tissue", "2", "Transverse Plane", "Nodule"]
    answers = [(a, "CLOSED") for a in closed] + [(a, "OPEN") for a in open_]
    trie = build_answer_trie(tokenizer, answers, model.config.eos_token_id, "all")
    enc = ChatEncoder(tokenizer, model.config.image_tokens)
    feats = torch.randn(12, model.config.image_tokens, model.config.vision_hidden_size, generator=torch.Generator().manual_seed(0))
    prompts = [enc.encode([{"role": "user", "content": f"<image>\nquestion {i} " + "why " * i}],
                          add_generation_prompt=True).input_ids for i in range(12)]
    sets = ["CLOSED" if i % 2 else "OPEN" for i in range(12)]
    free = generate(model, prompts, feats, GenerationConfig(max_new_tokens=12), model.config.eos_token_id,
                    model.config.pad_token_id)
    assert sum(tokenizer.decode(f) not in closed + open_ for f in free) >= 6  # free decoding wanders off
    for temperature in (0.0, 1.5):
        out = generate(model, prompts, feats, GenerationConfig(max_new_tokens=12, temperature=temperature, seed=1),
                       model.config.eos_token_id, model.config.pad_token_id, trie=trie, answer_sets=sets)
        for ids, s in zip(out, sets):
            assert tokenizer.decode(ids) in (closed if s == "CLOSED" else open_), (tokenizer.decode(ids), s)
    # 'closed' mode: open rows decode freely, closed rows stay in their set
    trie = build_answer_trie(tokenizer, answers, model.config.eos_token_id, "closed")
    out = generate(model, prompts, feats, GenerationConfig(max_new_tokens=12), model.config.eos_token_id,
                   model.config.pad_token_id, trie=trie, answer_sets=sets)
    assert all(tokenizer.decode(ids) in closed for ids, s in zip(out, sets) if s == "CLOSED")
    assert [ids for ids, s in zip(out, sets) if s == "OPEN"] == [f for f, s in zip(free, sets) if s == "OPEN"]


def test_trie_shares_prefixes_and_refuses_empty_sets():
    trie = AnswerTrie({"A": [[5, 6, 2], [5, 7, 2]], "B": [[5, 2]]}, vocab_size=10)
    assert (trie.table >= 0).sum() == 3 + 2 + 2  # A: 5 -> {6, 7} -> 2 ; B: 5 -> 2
    with pytest.raises(ValueError, match="empty"):
        AnswerTrie({"A": []}, vocab_size=10)


def test_eval_reports_constrained_beside_free(tokenizer, tiny_tower, tmp_path, capsys):
    raw = write_hard_release(tmp_path / "raw", seed=1, n_train=20, n_val=2, n_test=6)
    from dataset.slake import convert, read_release
    convert(read_release(raw), tmp_path / "d")
    d = tmp_path / "d"
    path = save_checkpoint(tmp_path / "m.pth", _trie_model(tokenizer, tiny_tower), tokenizer, "sft", 0)
    assert eval_vlm.main(["--model_path", str(path), "--data_path", str(d / "medical_vqa_test.jsonl"),
                          "--train_path", str(d / "medical_vqa_train.jsonl"), "--images_path", str(d / "medical_images"),
                          "--out_dir", str(tmp_path / "o"), "--cache_dir", "", "--vision_model", "random-tiny",
                          "--constrain", "all"]) == 0
    out = capsys.readouterr().out
    assert "model, constrained (all)" in out and "image use:" in out
    m = json.loads((tmp_path / "o" / "eval" / "m" / "metrics.json").read_text())
    train_answers = {json.loads(line)["conversations"][-1]["content"]
                     for line in (d / "medical_vqa_train.jsonl").read_text().splitlines()}
    preds = [json.loads(line) for line in (tmp_path / "o" / "eval" / "m" / "predictions.jsonl").read_text().splitlines()]
    assert all(p["prediction_constrained"] in train_answers for p in preds)
    assert m["constrained"]["mode"] == "all" and m["constrained"]["closed_accuracy"] is not None


def test_api_constrains_like_eval(tokenizer, tiny_tower, tmp_path):
    from evaluation.api import MedicalVQA, guess_answer_type
    raw = write_hard_release(tmp_path / "raw", seed=2, n_train=20, n_val=2, n_test=4)
    from dataset.slake import convert, read_release
    convert(read_release(raw), tmp_path / "d")
    path = save_checkpoint(tmp_path / "m.pth", _trie_model(tokenizer, tiny_tower), tokenizer, "sft", 0)
    vqa = MedicalVQA.load(path, device="cpu", vision_model="random-tiny").constrain(
        tmp_path / "d" / "medical_vqa_train.jsonl", "all")
    img = next((tmp_path / "d" / "medical_images").rglob("*.png"))
    assert vqa.answer(img, "Is there a cyst in the left lung?") in ("Yes", "No")
    assert guess_answer_type("Is there a cyst?") == "CLOSED" and guess_answer_type("How many cysts?") == "OPEN"
    train_answers = {json.loads(line)["conversations"][-1]["content"]
                     for line in (tmp_path / "d" / "medical_vqa_train.jsonl").read_text().splitlines()}
    assert vqa.answer(img, "How many nodules are in the image?") in train_answers


def test_balance_closed_equalises_answers_per_question_text(tokenizer, tmp_path):
    from dataset.vqa_dataset import VQADataset, balance_closed
    from tests.helpers import random_image
    (tmp_path / "img").mkdir()
    random_image(0).save(tmp_path / "img" / "a.png")
    rows = [("Is there a cyst?", "Yes", "CLOSED")] * 5 + [("Is there a cyst?", "No", "CLOSED")] * 2 + \
           [("Is this a CT?", "Yes", "CLOSED")] * 3 + [("How many cysts?", "2", "OPEN")] * 4
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({
        "conversations": [{"role": "user", "content": f"<image>\n{q}"}, {"role": "assistant", "content": a}],
        "image": "a.png", "answer_type": t}) + "\n" for q, a, t in rows))
    data = VQADataset(tmp_path / "d.jsonl", tmp_path / "img", ChatEncoder(tokenizer, 196), 512)
    assert balance_closed(data, seed=0) == 3
    counts = Counter((s.record["conversations"][0]["content"], s.record["conversations"][1]["content"])
                     for s in data.samples)
    assert counts[("<image>\nIs there a cyst?", "Yes")] == counts[("<image>\nIs there a cyst?", "No")] == 5
    assert counts[("<image>\nIs this a CT?", "Yes")] == 3 and counts[("<image>\nHow many cysts?", "2")] == 4


def test_more_epochs_advice():
    from trainer.trainer import more_epochs_advice
    assert "more epochs would likely help (e.g. --epochs 8)" in more_epochs_advice([1.0, 0.8, 0.7], 4)
    assert more_epochs_advice([1.0, 0.8, 0.85], 4) is None and more_epochs_advice([0.8, 0.7999], 4) is None


def test_other_clip_towers_work(tmp_path):
    """A CLIP-format tower of another image size and patch size (like PubMedCLIP ViT-B/32,
    49 tokens): the token count follows the tower through training, checkpoint and evaluation."""
    from transformers import CLIPConfig, CLIPModel
    from model.vision import CLIP_MEAN, CLIP_STD, _ImageProcessor
    from trainer.cli import main as train_main
    folder = tmp_path / "tiny-clip-b32"
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=2, vocab_size=100, max_position_embeddings=16),
                         vision_config=dict(hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=2, image_size=96, patch_size=32),
                         projection_dim=16)).save_pretrained(folder)
    _ImageProcessor(size={"shortest_edge": 96}, crop_size={"height": 96, "width": 96}, image_mean=CLIP_MEAN,
                    image_std=CLIP_STD).save_pretrained(folder)
    raw = write_hard_release(tmp_path / "raw", seed=3, n_train=8, n_val=2, n_test=3)
    from dataset.slake import convert, read_release
    convert(read_release(raw), tmp_path / "d")
    d = tmp_path / "d"
    common = ["--vision_model", str(folder), "--hidden_size", "32", "--num_hidden_layers", "1", "--num_attention_heads",
              "2", "--num_key_value_heads", "1", "--device", "cpu", "--num_workers", "0", "--cache_dir", "",
              "--images_path", str(d / "medical_images"), "--out_dir", str(tmp_path / "o")]
    assert train_main("sft", common + ["--data_path", str(d / "medical_vqa_train.jsonl"), "--val_path", "",
                                       "--epochs", "1", "--batch_size", "4", "--from_weight", "none"]) == 0
    from model.checkpoint import load_model
    ckpt = load_model(tmp_path / "o" / "medical_vlm_32.pth")
    assert ckpt.config.image_tokens == 9 and ckpt.config.vision_hidden_size == 48  # (96 / 32)^2 tokens
    assert eval_vlm.main(["--model_path", str(tmp_path / "o" / "medical_vlm_32.pth"), "--data_path",
                          str(d / "medical_vqa_test.jsonl"), "--images_path", str(d / "medical_images"),
                          "--train_path", "", "--out_dir", str(tmp_path / "o"), "--cache_dir", ""]) == 0


def test_also_merges_training_splits_only_and_refuses_shared_images(tmp_path, capsys):
    from dataset.demo import write_demo_release
    main_raw = write_hard_release(tmp_path / "slake", seed=4, n_train=6, n_val=2, n_test=3)
    extra = write_demo_release(tmp_path / "vqa-rad", seed=5, n_train=4, n_val=2, n_test=2)
    out = tmp_path / "d"
    assert convert_slake_dataset.main(["--slake_dir", str(main_raw), "--out_dir", str(tmp_path / "alone")]) == 0
    assert convert_slake_dataset.main(["--slake_dir", str(main_raw), "--also", str(extra), "--out_dir", str(out)]) == 0
    alone = json.loads((tmp_path / "alone" / "manifest.json").read_text())
    m = json.loads((out / "manifest.json").read_text())
    extra_train = len(json.loads((extra / "train.json").read_text()))
    assert m["counts"]["train"] == alone["counts"]["train"] + extra_train
    for split in ("validation", "test"):  # SLAKE's evaluation splits untouched
        assert (out / f"medical_vqa_{split}.jsonl").read_text() == (tmp_path / "alone" / f"medical_vqa_{split}.jsonl").read_text()
    rows = [json.loads(line) for line in (out / "medical_vqa_train.jsonl").read_text().splitlines()]
    merged = [r for r in rows if r.get("source")]
    assert len(merged) == extra_train and all(r["image"].startswith(merged[0]["source"] + "/") for r in merged)
    assert all((out / "medical_images" / r["image"]).is_file() for r in rows)
    assert any("--also" in n for n in m["notes"])
    # a source that shares an image (same bytes, another name) with SLAKE is refused
    first = json.loads((main_raw / "test.json").read_text())[0]["img_name"]
    victim = json.loads((extra / "train.json").read_text())[0]["img_name"]
    (extra / "imgs" / victim).write_bytes((main_raw / "imgs" / first).read_bytes())
    before = (out / "manifest.json").read_text()
    capsys.readouterr()
    assert convert_slake_dataset.main(["--slake_dir", str(main_raw), "--also", str(extra), "--out_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "1 image(s) are also in" in err and (out / "manifest.json").read_text() == before


@pytest.mark.parametrize("mode,n", [("last:1", 1), ("all", 2)])
def test_train_vision_tunes_exactly_the_last_blocks(mode, n, tmp_path, tiny_tower):
    """--train_vision: gradients reach exactly the tuned blocks (copies of the tower's last
    ones), the cache keeps the frozen prefix's output, the checkpoint carries the tuned
    blocks and evaluation uses them; the tower itself never changes."""
    from dataset.features import FeatureStore
    from dataset.slake import convert, read_release
    from model.checkpoint import load_model
    from trainer.cli import main as train_main
    raw = write_hard_release(tmp_path / "raw", seed=6, n_train=6, n_val=2, n_test=3)
    convert(read_release(raw), tmp_path / "d")
    d = tmp_path / "d"
    base = ["--vision_model", "random-tiny", "--hidden_size", "32", "--num_hidden_layers", "1", "--num_attention_heads",
            "2", "--num_key_value_heads", "1", "--device", "cpu", "--num_workers", "0", "--cache_dir", str(tmp_path / "c"),
            "--images_path", str(d / "medical_images"), "--data_path", str(d / "medical_vqa_train.jsonl"),
            "--val_path", "", "--epochs", "1", "--batch_size", "4", "--from_weight", "none"]
    assert train_main("sft", base + ["--out_dir", str(tmp_path / "o"), "--train_vision", mode, "--vision_lr", "1e-3"]) == 0
    ckpt = load_model(tmp_path / "o" / "medical_vlm_32.pth", vision_model="random-tiny")
    model = ckpt.model
    assert len(model.vision_tuned) == n and model.cache_layers() == 2 - n
    tuned = {k for k in torch.load(tmp_path / "o" / "medical_vlm_32.pth", weights_only=True)["model"] if "vision" in k}
    assert tuned and all(k.startswith("vision_tuned.") for k in tuned)
    # the tuned blocks moved away from the tower's; the tower is the pristine one (same fingerprint)
    for mine, theirs in zip(model.vision_tuned, tiny_tower.layers[2 - n:]):
        assert not torch.equal(mine.mlp.fc1.weight, theirs.mlp.fc1.weight)
    assert model.vision_tower.fingerprint() == tiny_tower.fingerprint()
    assert list((tmp_path / "c").glob(f"vision_*_blocks{2 - n}.pt"))
    # gradients: the tuned blocks and the LM get them, the frozen tower none
    model.train()
    paths = sorted((d / "medical_images").rglob("*.png"))[:2]
    feats = FeatureStore(model.vision_tower, paths, "cpu", None, stop_before=model.cache_layers())
    assert feats.get(torch.tensor([0])).shape[1] == 197  # CLS + 196 patches: the prefix's hidden states
    enc = ChatEncoder(ckpt.tokenizer, 196)
    e = enc.encode([{"role": "user", "content": "<image>\nIs there a cyst in the left lung?"},
                    {"role": "assistant", "content": "Yes"}])
    for p in model.parameters():
        p.grad = None
    loss, k, _ = model(torch.tensor([e.input_ids]), feats.get(torch.tensor([0])), torch.tensor([e.labels]))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.vision_tuned.parameters()
               if p.requires_grad and p.ndim == 2)
    assert all(p.grad is None for p in model.vision_tower.parameters())
    # the per-batch path (no cache) gives the same features as the cache
    per_batch = FeatureStore(model.vision_tower, paths, "cpu", None, budget_gb=0, stop_before=model.cache_layers())
    assert torch.allclose(per_batch.get(torch.tensor([1])).float(), feats.get(torch.tensor([1])).float(), atol=1e-3)
    # evaluation runs the tuned blocks: zeroing them changes what the model sees
    assert eval_vlm.main(["--model_path", str(tmp_path / "o" / "medical_vlm_32.pth"), "--data_path",
                          str(d / "medical_vqa_test.jsonl"), "--images_path", str(d / "medical_images"), "--train_path",
                          "", "--out_dir", str(tmp_path / "o"), "--cache_dir", str(tmp_path / "c")]) == 0
    with torch.no_grad():
        model.eval()
        before = model.finish_image_features(feats.get(torch.tensor([0])))
        model.vision_tuned[-1].mlp.fc2.weight.zero_()
        assert not torch.allclose(before, model.finish_image_features(feats.get(torch.tensor([0]))))

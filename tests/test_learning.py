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
    trie = build_answer_trie(tokenizer, closed, open_, model.config.eos_token_id, "all")
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
    trie = build_answer_trie(tokenizer, closed, open_, model.config.eos_token_id, "closed")
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

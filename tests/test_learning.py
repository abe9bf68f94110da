"""Learning (issue #13): image-use metrics, the hard synthetic set, answer-constrained decoding."""
from __future__ import annotations

import json
from collections import Counter, defaultdict

import pytest
import torch

import convert_slake_dataset
import eval_vlm
from dataset.contract import is_derived
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


@pytest.mark.parametrize("rows, expected", [
    ([("Is there a cyst?", "Yes")] * 5 + [("Is there a cyst?", "No")] * 2 + [("Is this a CT?", "yes")] * 3,
     (10, 0.8)),  # (5 + 3) / 10; answers compare normalised
    ([("Is there a cyst?", "Yes"), ("Is there a cyst?", "No")] * 4, (8, 0.5)),  # balanced: the image decides
    ([("Is there a cyst?", "Yes"), ("is there a CYST ?", "No"), ("Is there a cyst?", "No")], (3, 2 / 3)),
    ([], (0, None)),
])
def test_closed_text_prior_is_the_share_the_text_alone_answers(rows, expected):
    from dataset.vqa_dataset import Sample, closed_text_prior
    samples = [Sample([], [], [], {"conversations": [{"role": "user", "content": f"<image>\n{q}"},
                                                     {"role": "assistant", "content": a}], "answer_type": "CLOSED"})
               for q, a in rows]
    samples.append(Sample([], [], [], {"conversations": [{"role": "user", "content": "What?"},
                                                         {"role": "assistant", "content": "x"}], "answer_type": "OPEN"}))
    n, prior = closed_text_prior(samples)
    assert n == expected[0] and (prior == pytest.approx(expected[1]) if expected[1] is not None else prior is None)


def test_more_epochs_advice():
    from trainer.validation import Validation, more_epochs_advice

    def hist(*pairs):
        return [Validation(loss, acc, acc) for loss, acc in pairs]
    assert "loss still falling" in more_epochs_advice(hist((1.0, .5), (.8, .5), (.7, .5)), 4)
    assert "more epochs would likely help (e.g. --epochs 8)" in more_epochs_advice(hist((1.0, .5), (.7, .5)), 4)
    # the loss turns up while the exact match keeps rising (confident mistakes): still say so
    advice = more_epochs_advice(hist((.30, .60), (.25, .70), (.33, .74)), 16)
    assert "exact match still rising (70.0% -> 74.0%" in advice and "--epochs 32" in advice
    assert more_epochs_advice(hist((1.0, .5), (.8, .6), (.85, .6)), 4) is None
    assert more_epochs_advice(hist((.8, .6), (.7999, .605)), 4) is None  # both flat
    assert more_epochs_advice(hist((.8, .7), (.9, .65), (.95, .69)), 4) is None  # below its best
    assert more_epochs_advice([Validation(.8, None, None), Validation(.9, None, None)], 4) is None


def test_validation_exact_match_is_what_greedy_decoding_answers(tmp_path, tokenizer):
    """The per-epoch exact match (teacher-forced, no generation) counts exactly the questions
    whose greedy answer is the reference, per answer type."""
    from dataset.features import FeatureStore
    from dataset.slake import convert, read_release
    from dataset.vqa_dataset import IGNORE_INDEX, VQADataset
    from model.checkpoint import load_model
    from trainer.cli import main as train_main
    from trainer.config import parse_train_args
    from trainer.distributed import Dist
    from trainer.validation import evaluate
    raw = write_hard_release(tmp_path / "raw", seed=4, n_train=4, n_val=1, n_test=1)
    convert(read_release(raw), tmp_path / "d")
    d = tmp_path / "d"
    args = ["--vision_model", "random-tiny", "--hidden_size", "32", "--num_hidden_layers", "1", "--num_attention_heads",
            "2", "--num_key_value_heads", "1", "--device", "cpu", "--num_workers", "0", "--cache_dir", "",
            "--images_path", str(d / "medical_images"), "--data_path", str(d / "medical_vqa_train.jsonl"),
            "--val_path", "", "--epochs", "25", "--batch_size", "4", "--learning_rate", "3e-3",
            "--from_weight", "none", "--out_dir", str(tmp_path / "o"), "--log_interval", "1000"]
    assert train_main("sft", args) == 0  # nearly memorises its 4 images' questions
    loaded = load_model(tmp_path / "o" / "medical_vlm_32.pth", vision_model="random-tiny")
    model, enc = loaded.model, ChatEncoder(loaded.tokenizer, 196)
    data = VQADataset(d / "medical_vqa_train.jsonl", d / "medical_images", enc, 512)
    feats = FeatureStore(model.vision_tower, data.image_paths, "cpu", None, progress=False)
    cfg = parse_train_args("sft", ["--batch_size", "5"])
    got = evaluate(model, data, feats, cfg, Dist(), torch.device("cpu"), torch.autocast("cpu", enabled=False))
    model.eval()
    hits = {"CLOSED": [], "OPEN": []}
    for s in data.samples:
        prompt = enc.encode(s.record["conversations"][:-1], add_generation_prompt=True).input_ids
        answer = [t for t in s.labels if t != IGNORE_INDEX][:-1]  # without the end-of-turn token
        out = generate(model, [prompt], feats.get(torch.tensor(s.images)), GenerationConfig(max_new_tokens=12),
                       model.config.eos_token_id, model.config.pad_token_id)[0]
        hits[s.record["answer_type"]].append(out == answer)
    closed, open_ = sum(hits["CLOSED"]) / len(hits["CLOSED"]), sum(hits["OPEN"]) / len(hits["OPEN"])
    assert 0 < closed + open_ < 2, "the test needs hits and misses"
    assert got.closed == pytest.approx(closed) and got.open == pytest.approx(open_)
    assert got.loss > 0


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
    merged = [r for r in rows if r.get("source") and not is_derived(r)]
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


@pytest.mark.parametrize("stage,argv,before,expected,lm_pretrained", [
    ("sft", [], {}, 5e-4, False),                                    # scratch: continues stage 1
    ("pretrain", [], {}, 1e-3, False),
    ("pretrain", ["--from_llm", "llm_128.pth"], {}, 4e-4, True),     # MiniMind2 start, this run
    ("sft", [], {"from_llm": "llm_128.pth"}, 1e-4, True),            # ... or the run it continues
    ("sft", [], {"lm_pretrained": True}, 1e-4, True),                # ... or a run before that
    ("sft", ["--learning_rate", "3e-3"], {"lm_pretrained": True}, 3e-3, True),  # the flag always wins
])
def test_learning_rate_is_chosen_per_stage_and_start(stage, argv, before, expected, lm_pretrained):
    """Without --learning_rate the rate follows the stage and whether the language model
    started from MiniMind2 weights: 1e-4 on a scratch model leaves closed questions at the
    question-text prior (issue #13)."""
    from trainer.config import parse_train_args
    cfg = parse_train_args(stage, argv)
    assert (cfg.learning_rate is None) == ("--learning_rate" not in argv)
    cfg.resolve_learning_rate(bool(cfg.from_llm or before.get("from_llm") or before.get("lm_pretrained")))
    assert cfg.learning_rate == pytest.approx(expected) and cfg.lm_pretrained is lm_pretrained
    with pytest.raises(SystemExit):
        parse_train_args(stage, ["--lm_pretrained"])


def test_chained_runs_keep_the_start_and_record_the_rate(tmp_path, capfd):
    """A stage-2 run from a stage-1 checkpoint whose language model came from MiniMind2
    weights gets the MiniMind2 rate; every checkpoint records the rate it used; the log says
    "saved" and never "nothing to train" after a normal run."""
    from trainer.cli import main as train_main
    raw = write_hard_release(tmp_path / "raw", seed=3, n_train=4, n_val=1, n_test=1)
    from dataset.slake import convert, read_release
    convert(read_release(raw), tmp_path / "d")
    d = tmp_path / "d"
    base = ["--vision_model", "random-tiny", "--hidden_size", "32", "--num_hidden_layers", "1", "--num_attention_heads",
            "2", "--num_key_value_heads", "1", "--device", "cpu", "--num_workers", "0", "--cache_dir", str(tmp_path / "c"),
            "--images_path", str(d / "medical_images"), "--val_path", "", "--epochs", "1", "--batch_size", "4",
            "--out_dir", str(tmp_path / "o")]
    assert train_main("pretrain", base + ["--data_path", str(d / "medical_pretrain.jsonl")]) == 0
    pre = tmp_path / "o" / "medical_pretrain_vlm_32.pth"
    assert torch.load(pre, weights_only=False)["extra"]["train_config"]["learning_rate"] == pytest.approx(1e-3)
    # mark the stage-1 run as one that started from MiniMind2 weights (as --from_llm would)
    state = torch.load(pre, weights_only=False)
    state["extra"]["train_config"]["from_llm"] = "model/llm_32.pth"
    torch.save(state, pre)
    capfd.readouterr()
    assert train_main("sft", base + ["--data_path", str(d / "medical_vqa_train.jsonl")]) == 0
    log = "".join(capfd.readouterr())
    tc = torch.load(tmp_path / "o" / "medical_vlm_32.pth", weights_only=False)["extra"]["train_config"]
    assert tc["learning_rate"] == pytest.approx(1e-4) and tc["lm_pretrained"] is True
    assert tc["lr_schedule"] == "cosine"  # MiniMind-V's, from MiniMind2 weights
    assert "then cosine decay to 0.1 of the peak (automatic for sft from MiniMind2 weights)" in log
    assert "learning rate 0.0001 (automatic for sft from MiniMind2 weights)" in log
    assert "saved " in log and "nothing to train" not in log
    import re
    (n, share), = re.findall(r"closed training questions: (\d+); the commonest answer of each question text is "
                             r"right for (\d+\.\d)%", log)
    assert int(n) > 0 and 50.0 <= float(share) <= 100.0
    assert ("the text alone predicts most closed answers" in log) == (float(share) >= 70.0)


def test_random_tower_patches_know_where_they_are(tiny_tower):
    """The random stand-in's position embeddings are smooth 2-D ones, as a trained CLIP's are:
    a patch's half of the image (left/right, top/bottom) is a linear function of its features.
    With a random vector per position it was not (73 % for the best linear read-out), and the
    hard set's "left lung" questions measured the stand-in instead of the recipe."""
    from model.vision import preprocess
    from tests.helpers import random_image
    with torch.no_grad():
        feats = tiny_tower(preprocess(tiny_tower.processor, [random_image(s) for s in range(8)])).double()
    x = torch.cat([feats.reshape(-1, feats.shape[-1]), torch.ones(8 * 196, 1, dtype=torch.double)], 1)
    for half in (torch.arange(196) % 14 >= 7, torch.arange(196) // 14 >= 7):
        y = half.double().repeat(8) * 2 - 1
        w = torch.linalg.lstsq(x[:6 * 196], y[:6 * 196, None]).solution
        accuracy = ((x[6 * 196:] @ w).squeeze(1).sign() == y[6 * 196:]).double().mean().item()
        assert accuracy > 0.95, accuracy


@pytest.mark.parametrize("closed,open_,argv,ok", [
    (0.71, 0.70, ["--margin", "0.15", "--open_margin", "0.30"], True),
    (0.69, 0.70, ["--margin", "0.15", "--open_margin", "0.30"], False),  # closed lead 14 points
    (0.71, 0.68, ["--margin", "0.15", "--open_margin", "0.30"], False),  # open lead 29 points
    (0.71, 0.68, ["--margin", "0.15"], True),                            # open uses --margin
    (0.61, 0.45, ["--margin", "0.05"], True),
    (0.59, 0.45, ["--margin", "0.05"], False),
])
def test_check_learning_margins(tmp_path, capsys, closed, open_, argv, ok):
    from scripts.check_learning import main as check
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"closed_accuracy": closed, "open_accuracy": open_, "baselines": {
        "majority_per_question": {"closed_accuracy": 0.54, "open_accuracy": 0.39},
        "majority_per_answer_type": {"closed_accuracy": 0.55, "open_accuracy": 0.15}}}))
    assert check([str(path), *argv]) == (0 if ok else 1)
    assert f"CLOSED {100 * (closed - 0.55):+.1f} points" in capsys.readouterr().out


def test_standin_llm_loads_through_from_llm(tmp_path, tokenizer, tiny_tower):
    """The CPU-sized MiniMind2 stand-in (text-only LM) is written in MiniMind's
    transformers-style naming and loads through --from_llm's code path unchanged."""
    from model.minimind_weights import load_minimind_llm
    from scripts.make_standin_llm import main as make_llm, text_conversations
    raw = write_hard_release(tmp_path / "raw", seed=5, n_train=3, n_val=1, n_test=1)
    assert all("<image>" not in c["conversations"][0]["content"] for c in text_conversations(raw))
    out = tmp_path / "llm_32.pth"
    assert make_llm(["--release", str(raw), "--hidden_size", "32", "--num_hidden_layers", "1",
                     "--num_attention_heads", "2", "--num_key_value_heads", "1", "--epochs", "1",
                     "--out", str(out)]) == 0
    sd = torch.load(out, weights_only=True)
    assert "model.embed_tokens.weight" in sd and "lm_head.weight" in sd and "model.layers.0.self_attn.q_proj.weight" in sd
    assert not any(k.startswith(("llm.", "projector", "model.projector")) for k in sd)
    model = make_tiny_model(tokenizer, tiny_tower, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            num_key_value_heads=1)
    load_minimind_llm(model, str(out))
    assert torch.equal(model.llm.embed_tokens.weight, sd["model.embed_tokens.weight"])
    assert torch.equal(model.llm.state_dict()["layers.0.self_attn.q_proj.weight"],
                       sd["model.layers.0.self_attn.q_proj.weight"])


def test_closed_questions_at_the_prior_are_reported(tmp_path, tokenizer):
    """The trainer computes what the per-question prior scores on the validation split, and
    warns when the closed exact match ends there (the image is not used for closed questions)."""
    from dataset.vqa_dataset import VQADataset
    from trainer.validation import Validation, prior_advice, validation_prior
    d = tmp_path / "d"
    d.mkdir()

    def write(name, rows):
        (d / name).write_text("".join(json.dumps({"conversations": [
            {"role": "user", "content": q}, {"role": "assistant", "content": a}], "answer_type": t}) + "\n"
            for q, a, t in rows))
    write("train.jsonl", [("Is it a cyst?", "Yes", "CLOSED")] * 3 + [("Is it a cyst?", "No", "CLOSED"),
                         ("What kind?", "Cyst", "OPEN"), ("What kind?", "Cyst", "OPEN"), ("What kind?", "Nodule", "OPEN")])
    write("val.jsonl", [("Is it a cyst?", "Yes", "CLOSED"), ("Is it a cyst?", "No", "CLOSED"),
                        ("Is it a cyst?", "No", "CLOSED"), ("Is it a cyst?", "No", "CLOSED"),
                        ("What kind?", "Nodule", "OPEN"), ("What kind?", "Cyst", "OPEN")])
    enc = ChatEncoder(tokenizer, 4)
    prior = validation_prior(VQADataset(d / "train.jsonl", d, enc, 64), VQADataset(d / "val.jsonl", d, enc, 64))
    assert prior.closed == pytest.approx(0.25) and prior.open == pytest.approx(0.5)
    assert "closed questions end near the question-text prior (validation exact match 26.0% vs 25.0%" \
        in prior_advice(Validation(0.3, 0.26, 0.9), prior, 4)
    assert "less than 5 points above" in prior_advice(Validation(0.3, 0.285, 0.9), prior, 4)  # 3.5 above: near
    assert "--epochs 32" in prior_advice(Validation(0.3, 0.26, 0.9), prior, 4)
    assert prior_advice(Validation(0.3, 0.30, 0.9), prior, 4) is None  # 5 points above: uses the image
    assert prior_advice(None, prior, 4) is None and prior_advice(Validation(0.3, 0.2, 0.9), None, 4) is None
    assert validation_prior(VQADataset(d / "train.jsonl", d, enc, 64), None) is None


@pytest.mark.parametrize("total", [40, 100, 1000])
def test_wsd_schedule_holds_the_peak_then_decays_only_at_the_end(total):
    """--lr_schedule wsd: linear warm-up, the peak held, then a linear decay to --min_lr_ratio
    over the last --decay_ratio of the steps; a longer run changes only where the decay starts."""
    from trainer.config import TrainConfig
    from trainer.schedule import lr_at
    cfg = TrainConfig(stage="sft", learning_rate=1e-3, lr_schedule="wsd", decay_ratio=0.2, warmup_ratio=0.05,
                      min_lr_ratio=0.1)
    lrs = [lr_at(s, total, cfg) for s in range(total)]
    warm, decay_start = int(0.05 * total), total - round(0.2 * total)
    assert all(a < b for a, b in zip(lrs[:warm], lrs[1:warm]))  # warm-up rises
    assert lrs[warm:decay_start] == [1e-3] * (decay_start - warm)  # stable at the peak
    assert all(a > b for a, b in zip(lrs[decay_start - 1:], lrs[decay_start:]))  # decays, strictly
    assert lrs[-1] == pytest.approx(1e-4)
    longer = [lr_at(s, 2 * total, cfg) for s in range(decay_start)]
    assert longer[warm * 2:decay_start] == lrs[warm * 2:decay_start]  # same stable phase
    cosine = TrainConfig(stage="sft", learning_rate=1e-3, warmup_ratio=0.05, min_lr_ratio=0.1, lr_schedule="cosine")
    assert lr_at(total // 2, total, cosine) < 1e-3 * 0.6  # cosine is already halfway down
    constant = TrainConfig(stage="sft", learning_rate=1e-3, lr_schedule="wsd", decay_ratio=0.0)
    assert lr_at(total - 1, total, constant) == 1e-3


@pytest.mark.parametrize("stage, argv, lm_pretrained, expected, source", [
    ("sft", [], False, "wsd", "automatic for sft from scratch"),
    ("sft", [], True, "cosine", "automatic for sft from MiniMind2 weights"),
    ("pretrain", [], False, "cosine", "automatic for pretrain from scratch"),
    ("pretrain", [], True, "cosine", "automatic for pretrain from MiniMind2 weights"),
    ("sft", ["--lr_schedule", "wsd"], False, "wsd", "--lr_schedule"),
    ("sft", ["--lr_schedule", "cosine"], False, "cosine", "--lr_schedule"),
    ("pretrain", ["--lr_schedule", "constant"], True, "constant", "--lr_schedule"),
])
def test_schedule_is_chosen_per_stage_and_start(stage, argv, lm_pretrained, expected, source):
    """--lr_schedule auto: warm-up-stable-decay for stage 2 from scratch (closed questions are
    learned late, while the rate is still high), MiniMind-V's cosine otherwise."""
    from trainer.config import parse_train_args
    from trainer.schedule import lr_at
    cfg = parse_train_args(stage, argv)
    assert cfg.lr_schedule == (argv[1] if argv else "auto")
    cfg.resolve_learning_rate(lm_pretrained)
    assert cfg.lr_schedule == expected and cfg.schedule_source == source  # stored resolved in the checkpoint
    last = lr_at(999, 1000, cfg) / cfg.learning_rate
    assert last == (pytest.approx(1.0) if expected == "constant" else pytest.approx(cfg.min_lr_ratio, rel=1e-3))


@pytest.mark.parametrize("argv, message", [(["--lr_schedule", "linear"], "--lr_schedule"),
                                           (["--decay_ratio", "1.5"], "--decay_ratio"),
                                           (["--decay_ratio", "-0.1"], "--decay_ratio")])
def test_schedule_flags_are_validated(argv, message, capsys):
    from trainer.config import parse_train_args
    with pytest.raises(SystemExit) as exc:
        parse_train_args("sft", argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err

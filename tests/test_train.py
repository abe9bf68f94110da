"""The shared trainer: masks, feature cache, resume, DDP, MiniMind weights, bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_sft_vlm
from dataset.demo import write_demo_release
from dataset.features import FeatureStore
from dataset.slake import convert, read_release
from dataset.vqa_dataset import VQADataset, collate
from model.checkpoint import load_model, read_checkpoint
from model.language_model import apply_rope, rope_tables
from model.minimind_weights import CheckpointError, interleaved_to_half, load_minimind_llm
from model.tokenization import IGNORE_INDEX, ChatEncoder
from trainer.config import PRESETS, parse_train_args
from tests.helpers import make_tiny_model, random_image

REPO = Path(__file__).resolve().parents[1]
TINY = ["--vision_model", "random-tiny", "--hidden_size", "32", "--num_hidden_layers", "1",
        "--num_attention_heads", "2", "--num_key_value_heads", "1", "--device", "cpu", "--num_workers", "0"]


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    write_demo_release(root / "raw", seed=1, n_train=16, n_val=4, n_test=4)
    convert(read_release(root / "raw"), root / "data")
    return root / "data"


def stage_args(data: Path, out: Path, stage="sft", **flags) -> list[str]:
    args = list(TINY) + ["--images_path", str(data / "medical_images"), "--out_dir", str(out),
                         "--cache_dir", str(out / "cache"), "--log_interval", "1"]
    if stage == "sft":
        args += ["--data_path", str(data / "medical_vqa_train.jsonl"),
                 "--val_path", str(data / "medical_vqa_validation.jsonl")]
    else:
        args += ["--data_path", str(data / "medical_pretrain.jsonl")]
    for k, v in flags.items():
        args += [f"--{k}"] if v is True else [f"--{k}", str(v)]
    return args


def losses(out: Path, name="medical_vlm_32") -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / f"{name}_metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_loss_mask_token_by_token(tokenizer, tmp_path):
    enc = ChatEncoder(tokenizer, 196)
    convs = [[{"role": "system", "content": "You are a radiologist."},
              {"role": "user", "content": "<image>\nWhich organ is abnormal?"},
              {"role": "assistant", "content": "Left Lung"}],
             [{"role": "user", "content": "<image>\nIs this normal?"}, {"role": "assistant", "content": "No"}]]
    samples = []
    from dataset.vqa_dataset import Sample
    for c in convs:
        e = enc.encode(c)
        samples.append(Sample(e.input_ids, e.labels, [0], {}))
    batch = collate(samples, tokenizer.pad_token_id)
    ids, labels = batch["input_ids"], batch["labels"]
    assert ids.shape == labels.shape == (2, max(len(s.input_ids) for s in samples))
    for row, conv in enumerate(convs):
        target_ids = tokenizer(conv[-1]["content"], add_special_tokens=False)["input_ids"] + [enc.end_id]
        n = len(samples[row].input_ids)
        kept = [(i, int(labels[row, i])) for i in range(ids.shape[1]) if labels[row, i] != IGNORE_INDEX]
        assert [t for _, t in kept] == target_ids  # answer + <|im_end|>, nothing else
        assert kept[-1][0] == n - 1 and kept[0][0] == n - len(target_ids)  # at the very end
        assert all(int(labels[row, i]) == int(ids[row, i]) for i, _ in kept)
        image_pos = (ids[row] == enc.image_id).nonzero().flatten()
        assert len(image_pos) == 196 and (labels[row, image_pos] == IGNORE_INDEX).all()
        assert (labels[row, n:] == IGNORE_INDEX).all() and (ids[row, n:] == tokenizer.pad_token_id).all()
    assert tokenizer.decode([t for t in labels[0].tolist() if t != IGNORE_INDEX]) == "Left Lung<|im_end|>"
    assert batch["image_index"].tolist() == [0, 0]


def test_truncation_keeps_answer_and_image(tokenizer, tmp_path):
    enc = ChatEncoder(tokenizer, 196)
    long_q = "Which organ " + "is really " * 60 + "abnormal?"
    conv = [{"role": "user", "content": f"<image>\n{long_q}"}, {"role": "assistant", "content": "Liver"}]
    full = enc.encode(conv)
    cut = enc.encode(conv, max_seq_len=230)
    assert len(full.input_ids) > 230 and len(cut.input_ids) == 230
    assert cut.truncated_tokens == len(full.input_ids) - 230
    assert cut.input_ids.count(enc.image_id) == 196
    assert [t for t in cut.labels if t != IGNORE_INDEX] == [t for t in full.labels if t != IGNORE_INDEX]
    with pytest.raises(ValueError, match="raise --max_seq_len"):
        enc.encode(conv, max_seq_len=150)


def test_dataset_counts_truncated_and_dropped(tokenizer, tmp_path):
    (tmp_path / "img").mkdir()
    random_image(0).save(tmp_path / "img" / "a.png")
    rows = [{"conversations": [{"role": "user", "content": "<image>\n" + "why " * n},
                               {"role": "assistant", "content": "Yes " * m}], "image": "a.png"}
            for n, m in ((2, 1), (40, 1), (2, 60))]  # fits, question cut, answer alone too long
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = VQADataset(tmp_path / "d.jsonl", tmp_path / "img", ChatEncoder(tokenizer, 196), max_seq_len=230)
    assert len(ds) == 2 and ds.truncated == 1 and len(ds.dropped) == 1
    assert "d.jsonl:3" in ds.dropped[0]
    assert all(len(s.input_ids) <= 230 for s in ds.samples)


def test_feature_cache_hit_invalidation_and_equality(tmp_path, tiny_tower, monkeypatch):
    import dataset.features as features
    paths = []
    for i in range(3):
        p = tmp_path / f"{i}.png"
        random_image(i).save(p)
        paths.append(p)
    calls = []
    real = features.compute_features
    monkeypatch.setattr(features, "compute_features", lambda tower, ps, *a, **k: calls.append(len(ps)) or real(tower, ps, *a, **k))
    cache = tmp_path / "cache"
    s1 = FeatureStore(tiny_tower, paths, "cpu", cache)
    s2 = FeatureStore(tiny_tower, paths, "cpu", cache)
    assert calls == [3]  # second store: a pure hit
    assert torch.equal(s1.features, s2.features)
    assert len(list(cache.glob("vision_*.pt"))) == 1
    random_image(99).save(paths[1])  # image content changes -> only that row recomputed
    s3 = FeatureStore(tiny_tower, paths, "cpu", cache)
    assert calls == [3, 1]
    assert torch.equal(s3.features[0], s1.features[0]) and not torch.equal(s3.features[1], s1.features[1])
    on_the_fly = FeatureStore(tiny_tower, paths, "cpu", cache, budget_gb=0)
    assert not on_the_fly.cached
    idx = torch.tensor([2, 0, 1])
    assert torch.allclose(on_the_fly.get(idx).float(), s3.get(idx).float(), atol=1e-3)
    assert s3.get(idx).dtype == on_the_fly.get(idx).dtype == torch.float16
    from model.vision import load_vision_tower
    other = load_vision_tower("random")  # another tower -> another cache file
    assert other.fingerprint() != tiny_tower.fingerprint()


def test_presets_differ_only_in_stage_fields():
    pre, sft = parse_train_args("pretrain", []), parse_train_args("sft", [])
    assert pre.data_path == "dataset/medical_pretrain.jsonl" and sft.data_path == "dataset/medical_vqa_train.jsonl"
    assert sft.from_weight == "pretrain" and pre.from_weight == "none"
    assert pre.frozen_llm == "none" and parse_train_args("pretrain", ["--from_llm", "x.pth"]).frozen_llm == "all"
    differing = {k for k in pre.to_dict() if pre.to_dict()[k] != sft.to_dict()[k]}
    assert differing <= set(PRESETS["pretrain"]) | set(PRESETS["sft"])
    for script in ("train_pretrain_vlm.py", "train_sft_vlm.py"):  # thin presets over one trainer
        assert len((REPO / script).read_text().splitlines()) < 20, script


def test_pretrain_then_sft_learns_and_chains(demo_data, tmp_path):
    out = tmp_path / "out"
    from trainer.cli import main
    assert main("pretrain", stage_args(demo_data, out, "pretrain", epochs=2, batch_size=4)) == 0
    pre = out / "medical_pretrain_vlm_32.pth"
    assert pre.is_file() and read_checkpoint(pre)["stage"] == "pretrain"
    assert train_sft_vlm.__doc__ and "python train_sft_vlm.py" in train_sft_vlm.__doc__
    assert main("sft", stage_args(demo_data, out, epochs=3, batch_size=8, learning_rate=3e-3)) == 0
    ckpt = read_checkpoint(out / "medical_vlm_32.pth")
    assert ckpt["stage"] == "sft" and ckpt["extra"]["train_config"]["from_weight"] == "pretrain"
    ls = losses(out)
    assert sum(ls[-3:]) / 3 < 0.6 * sum(ls[:3]) / 3, ls
    rows = [json.loads(r) for r in (out / "medical_vlm_32_metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if "val_loss" in r] == [1, 2, 3]
    assert (out / "medical_vlm_32_loss.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))


def test_resume_reproduces_uninterrupted_run(demo_data, tmp_path):
    from trainer.cli import main
    full, split = tmp_path / "full", tmp_path / "split"
    common = dict(epochs=2, batch_size=4, accumulation_steps=2, learning_rate=2e-3, from_weight="none")
    assert main("sft", stage_args(demo_data, full, **common)) == 0
    assert main("sft", stage_args(demo_data, split, stop_at_step=5, **common)) == 0
    assert len(losses(split)) == 5
    assert main("sft", stage_args(demo_data, split, resume=True, **common)) == 0
    a, b = losses(full), losses(split)
    assert len(a) == len(b) > 5
    assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    wa = read_checkpoint(full / "medical_vlm_32.pth")["model"]
    wb = read_checkpoint(split / "medical_vlm_32.pth")["model"]
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    with pytest.raises(SystemExit):
        parse_train_args("sft", ["--freeze_llm", "maybe"])
    assert main("sft", stage_args(demo_data, split, resume=True, **{**common, "batch_size": 2})) == 2


def test_two_process_ddp_matches_single_process(demo_data, tmp_path):
    """Both losses are means over the global batch: the answer tokens and, since the demo has boxes,
    the questions with a look target (a per-process mean of the look loss made two processes differ)."""
    assert json.loads((demo_data / "medical_boxes.json").read_text())  # the look loss takes part
    common = dict(epochs=1, learning_rate=2e-3, from_weight="none", val_path="", cache_dir=tmp_path / "cache")
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    from trainer.cli import main
    assert main("sft", stage_args(demo_data, single, batch_size=4, **common)) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    import socket
    with socket.socket() as sock:  # a free port, so parallel runs do not collide
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "train_sft_vlm.py", *stage_args(demo_data, ddp, batch_size=2, **common)]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert losses(single) == pytest.approx(losses(ddp), rel=1e-4)
    wa = read_checkpoint(single / "medical_vlm_32.pth")["model"]
    wb = read_checkpoint(ddp / "medical_vlm_32.pth")["model"]
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    assert read_checkpoint(ddp / "medical_vlm_32.pth")["extra"]["train_config"]["batch_size"] == 2


def _rope_interleaved(x, pos, theta=1e6):
    """MiniMind's original rotation: complex multiplication of interleaved pairs."""
    d = x.shape[-1]
    freqs = 1.0 / (theta ** (torch.arange(0, d, 2).float() / d))
    angle = pos * freqs
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * torch.polar(torch.ones_like(angle), angle)).flatten(-2)


def test_interleaved_rope_weights_give_identical_scores():
    torch.manual_seed(0)
    n_heads, hd, hidden = 2, 8, 16
    wq, wk = torch.randn(n_heads * hd, hidden), torch.randn(n_heads * hd, hidden)
    x1, x2 = torch.randn(hidden), torch.randn(hidden)
    cos, sin = rope_tables(hd, 64, 1e6)
    for h in range(n_heads):
        q_old = _rope_interleaved((wq @ x1).view(n_heads, hd)[h], 7)
        k_old = _rope_interleaved((wk @ x2).view(n_heads, hd)[h], 3)
        q_new = apply_rope((interleaved_to_half(wq, n_heads) @ x1).view(n_heads, hd)[h].view(1, 1, 1, hd),
                           cos[7].view(1, 1, 1, -1), sin[7].view(1, 1, 1, -1)).flatten()
        k_new = apply_rope((interleaved_to_half(wk, n_heads) @ x2).view(n_heads, hd)[h].view(1, 1, 1, hd),
                           cos[3].view(1, 1, 1, -1), sin[3].view(1, 1, 1, -1)).flatten()
        assert torch.allclose(q_old @ k_old, q_new @ k_new, rtol=1e-4, atol=1e-3)


def _as_minimind(model, naming: str) -> dict:
    """Our LM weights written out under MiniMind's names (and, for the original naming,
    with q/k rows back in interleaved order)."""
    sd = model.llm.state_dict()
    cfg = model.config
    out = {}
    inv = lambda w, h: w.view(h, 2, -1, w.shape[1]).transpose(1, 2).reshape(w.shape)  # noqa: E731
    for k, v in sd.items():
        if k == "lm_head.weight":
            continue
        if naming == "new":
            out[k if k.startswith("lm_head") else "model." + k] = v
            continue
        name = (k.replace("embed_tokens", "tok_embeddings").replace("self_attn.q_proj", "attention.wq")
                .replace("self_attn.k_proj", "attention.wk").replace("self_attn.v_proj", "attention.wv")
                .replace("self_attn.o_proj", "attention.wo").replace("input_layernorm", "attention_norm")
                .replace("post_attention_layernorm", "ffn_norm").replace("mlp.gate_proj", "feed_forward.w1")
                .replace("mlp.down_proj", "feed_forward.w2").replace("mlp.up_proj", "feed_forward.w3"))
        if name.endswith("attention.wq.weight"):
            v = inv(v, cfg.num_attention_heads)
        elif name.endswith("attention.wk.weight"):
            v = inv(v, cfg.num_key_value_heads)
        out[name] = v
    out["output.weight" if naming == "old" else "lm_head.weight"] = sd["embed_tokens.weight"]
    return out


@pytest.mark.parametrize("naming", ["old", "new"])
def test_minimind_weight_mapping(naming, tokenizer, tiny_tower, tmp_path):
    src = make_tiny_model(tokenizer, tiny_tower, seed=1, spread=0.2)
    sd = _as_minimind(src, naming)
    vocab = len(tokenizer)
    sd[("tok_embeddings" if naming == "old" else "model.embed_tokens") + ".weight"] = \
        sd[("tok_embeddings" if naming == "old" else "model.embed_tokens") + ".weight"][:vocab - 1]  # no image token
    path = tmp_path / "llm_64.pth"
    torch.save(sd, path)
    dst = make_tiny_model(tokenizer, tiny_tower, seed=2)
    load_minimind_llm(dst, str(path))
    ids = torch.tensor([[1, 50, 60, 70, 2]])
    emb = src.llm.embed_tokens(ids)
    assert torch.allclose(src.llm(emb), dst.llm(dst.llm.embed_tokens(ids)), atol=1e-5)
    new_row = dst.llm.embed_tokens.weight[vocab - 1]
    assert torch.allclose(new_row, src.llm.embed_tokens.weight[:vocab - 1].mean(0), atol=1e-6)
    wide = make_tiny_model(tokenizer, tiny_tower, hidden_size=128)
    with pytest.raises(CheckpointError, match="--hidden_size 64 --num_hidden_layers 2"):
        load_minimind_llm(wide, str(path))
    sd_big = dict(sd)
    key = "tok_embeddings.weight" if naming == "old" else "model.embed_tokens.weight"
    sd_big[key] = torch.zeros(6400, 64)
    torch.save(sd_big, path)
    with pytest.raises(CheckpointError, match="--tokenizer_path"):
        load_minimind_llm(dst, str(path))


def test_bad_inputs_give_clear_errors(demo_data, tmp_path, capsys):
    from trainer.cli import main
    out = tmp_path / "out"
    args = stage_args(demo_data, out, epochs=1, batch_size=4, from_weight="none")
    # argparse keeps the last value of a repeated flag: each case overrides the data
    assert main("sft", args + ["--data_path", str(tmp_path / "nope.jsonl")]) == 2
    assert "nope.jsonl not found" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert main("sft", args + ["--data_path", str(empty)]) == 2
    assert "has no records" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"conversations": [{"role": "user", "content": "<image>\\nq"}], "image": "x.png"}\n')
    assert main("sft", args + ["--data_path", str(bad)]) == 2
    assert "bad.jsonl:1: the last message must be a non-empty assistant answer" in capsys.readouterr().err
    broken_imgs = tmp_path / "imgs"
    broken_imgs.mkdir()
    (broken_imgs / "x.png").write_bytes(b"\x89PNG broken")
    ok = tmp_path / "ok.jsonl"
    ok.write_text("".join(json.dumps({"conversations": [{"role": "user", "content": "<image>\nq"},
                                                        {"role": "assistant", "content": "a"}], "image": "x.png"}) + "\n"
                          for _ in range(8)))
    assert main("sft", args + ["--data_path", str(ok), "--images_path", str(broken_imgs), "--val_path", ""]) == 2
    assert "x.png: not a readable image" in capsys.readouterr().err
    assert main("sft", args + ["--from_weight", str(tmp_path / "missing.pth")]) == 2
    assert "--from_weight" in capsys.readouterr().err
    assert main("sft", args) == 0
    ckpt = out / "medical_vlm_32.pth"
    wider = stage_args(demo_data, tmp_path / "o2", epochs=1, batch_size=4, from_weight=ckpt, hidden_size=64)
    assert main("sft", wider) == 2
    assert "hidden_size 32 vs 64" in capsys.readouterr().err


def test_divergence_stops_without_saving(demo_data, tmp_path, monkeypatch, capsys):
    import model.vlm as vlm
    from trainer.cli import main
    out = tmp_path / "out"
    real = vlm.F.cross_entropy
    monkeypatch.setattr(vlm.F, "cross_entropy", lambda *a, **k: real(*a, **k) * float("nan"))
    assert main("sft", stage_args(demo_data, out, epochs=1, batch_size=4, from_weight="none")) == 2
    err = capsys.readouterr().err
    assert "diverged" in err and "--learning_rate" in err
    assert not (out / "medical_vlm_32.pth").exists()


def test_interrupted_save_keeps_previous_checkpoint(demo_data, tmp_path, monkeypatch, capsys):
    from trainer.cli import main
    import model.checkpoint as ck
    out = tmp_path / "out"
    args = stage_args(demo_data, out, epochs=1, batch_size=4, from_weight="none")
    assert main("sft", args) == 0
    before = (out / "medical_vlm_32.pth").read_bytes()
    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        f.truncate(100)  # half-written file, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(ck.torch, "save", dying_save)
    capsys.readouterr()
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C: one line, no traceback; in-process callers see it too
        main("sft", args)
    err = capsys.readouterr().err
    assert "interrupted at step" in err and "from before is untouched" in err and "Traceback" not in err
    monkeypatch.setattr(ck.torch, "save", real_save)
    assert (out / "medical_vlm_32.pth").read_bytes() == before
    assert load_model(out / "medical_vlm_32.pth").stage == "sft"
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_packed_questions_structure_and_determinism(demo_data, tokenizer):
    from dataset.vqa_dataset import PackedQuestions
    enc = ChatEncoder(tokenizer, 196)
    data = VQADataset(demo_data / "medical_vqa_train.jsonl", demo_data / "medical_images", enc, 1024)
    packed = PackedQuestions(data, enc.image_id, k=3, seed=7)
    per_image = {}
    for s in data.samples:
        per_image[s.images[0]] = per_image.get(s.images[0], 0) + 1
    assert len(packed) == sum(-(-n // 3) for n in per_image.values()) < len(data)
    e0, e0_again, e1 = packed.epoch_samples(0), packed.epoch_samples(0), packed.epoch_samples(1)
    assert len(e0) == len(e1) == len(packed)
    assert [s.input_ids for s in e0] == [s.input_ids for s in e0_again]
    assert [s.input_ids for s in e0] != [s.input_ids for s in e1]
    answers = sum(len([t for t in s.labels if t == enc.end_id]) for s in e0)
    assert answers == len(data)  # every question answered exactly once per epoch
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    for s in e0:
        n_q = max(s.segments)
        assert s.input_ids.count(enc.image_id) == 196 and len(s.images) == 1  # the image once per sequence
        assert s.input_ids.count(im_start) == 1 + n_q  # one user header, one assistant header per question
        p = s.segments.count(0)
        for j in range(1, n_q + 1):  # each question keeps the positions it would have alone
            pos = [q for q, g in zip(s.positions, s.segments) if g == j]
            assert pos == list(range(p, p + len(pos)))


def test_shared_prefix_packing_equals_separate_samples(demo_data, tokenizer, tiny_tower):
    """Loss and gradients of a packed sequence equal those of its questions trained apart."""
    from dataset.vqa_dataset import PackedQuestions
    enc = ChatEncoder(tokenizer, 196)
    data = VQADataset(demo_data / "medical_vqa_train.jsonl", demo_data / "medical_images", enc, 1024)
    packed = PackedQuestions(data, enc.image_id, k=4, seed=0)
    group = next(g for g in packed.by_image if len(g) >= 4)[:4]
    model = make_tiny_model(tokenizer, tiny_tower, seed=3, spread=0.1).train()
    feats = FeatureStore(tiny_tower, data.image_paths, "cpu", None)

    def loss_and_grads(samples):
        model.zero_grad()
        b = collate(samples, tokenizer.pad_token_id)
        extra = {k: b[k] for k in ("position_ids", "attn_mask") if k in b}
        out = model(b["input_ids"], feats.get(b["image_index"]), b["labels"], **extra)
        loss, n = out.loss_sum, out.n_targets
        loss.backward()
        return loss.detach(), int(n), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    l_sep, n_sep, g_sep = loss_and_grads([data.samples[i] for i in group])
    l_pack, n_pack, g_pack = loss_and_grads([packed._pack(group)])
    assert n_sep == n_pack
    assert torch.allclose(l_sep, l_pack, rtol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(g_sep, g_pack))
    assert len(packed._pack(group).input_ids) < sum(len(data.samples[i].input_ids) for i in group) / 2


def test_packed_training_runs_and_resumes(demo_data, tmp_path):
    from trainer.cli import main
    common = dict(epochs=2, batch_size=4, learning_rate=2e-3, from_weight="none", pack_questions=3)
    full, split = tmp_path / "full", tmp_path / "split"
    assert main("sft", stage_args(demo_data, full, **common)) == 0
    assert main("sft", stage_args(demo_data, split, stop_at_step=3, **common)) == 0
    assert main("sft", stage_args(demo_data, split, resume=True, **common)) == 0
    assert losses(full) == pytest.approx(losses(split), rel=1e-5, abs=1e-6)
    assert losses(full)[-1] < losses(full)[0]

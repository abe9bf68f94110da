"""A newcomer's path II (issue #19): help that explains every flag, answers at once, and
hints that name the command to run."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from trainer.config import GROUPS, HELP, TrainConfig, parse_train_args
from dataclasses import fields
import json

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["train_pretrain_vlm.py", "train_sft_vlm.py", "eval_vlm.py", "web_demo_vlm.py", "convert_slake_dataset.py"]


def test_every_training_flag_has_a_group_and_a_help_line():
    names = [f.name for f in fields(TrainConfig) if f.name != "stage" and f.metadata.get("flag", True)]
    grouped = [n for ns in GROUPS.values() for n in ns]
    assert sorted(grouped) == sorted(names) and len(grouped) == len(set(grouped))
    missing = [n for n in names if not HELP.get(n)]
    assert not missing, f"flags without help: {missing}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_needs_no_torch_and_shows_defaults(script):
    """--help parses before any heavy import (torch, transformers): it answers in a blink."""
    code = (f"import runpy, sys; sys.argv = [{script!r}, '--help']\n"
            f"try:\n    runpy.run_path({script!r}, run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "print('HEAVY', sorted(m for m in ('torch', 'transformers', 'gradio', 'datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120).stdout
    assert "HEAVY []" in out, out[-300:]
    flags = [line for line in out.splitlines() if line.strip().startswith("--") and "help" not in line]
    assert flags and "default" in out and "--device" not in out or "cuda" in out


def test_missing_stage_two_checkpoint_points_at_stage_one_and_other_sizes(tmp_path, capfd):
    import eval_vlm
    (tmp_path / "medical_pretrain_vlm_768.pth").write_bytes(b"x")
    (tmp_path / "medical_vlm_512.pth").write_bytes(b"x")
    assert eval_vlm.main(["--model_mode", "1", "--out_dir", str(tmp_path)]) == 2
    err = capfd.readouterr().err
    assert "train_sft_vlm.py --hidden_size 768" in err
    assert "medical_vlm_512.pth" in err and "medical_pretrain_vlm_768.pth" in err


def test_typed_paths_count_from_the_working_directory(tmp_path, monkeypatch):
    """A path the user types is relative to where they stand; the defaults stay in the repository."""
    from model.config import resolve_path
    monkeypatch.chdir(tmp_path)
    (tmp_path / "w.pth").write_bytes(b"x")
    cfg = parse_train_args("sft", ["--data_path", "my/train.jsonl", "--out_dir", "runs", "--from_weight", "w.pth",
                                   "--vision_model", "openai/clip-vit-base-patch16"])
    assert cfg.data_path == str(tmp_path / "my" / "train.jsonl") and cfg.out_dir == str(tmp_path / "runs")
    assert cfg.from_weight == str(tmp_path / "w.pth")
    assert cfg.vision_model == "openai/clip-vit-base-patch16"  # a hub id stays one
    assert resolve_path(cfg.images_path) == ROOT / "dataset" / "medical_images"  # a default: the repository's
    import eval_vlm
    (tmp_path / "scan.png").write_bytes(b"x")  # --image must exist (checked before any heavy import)
    args = eval_vlm.parse_args(["--image", "scan.png", "--question", "Is it?"])
    assert args.image == str(tmp_path / "scan.png") and args.out_dir == "out"


@pytest.mark.parametrize("cores, load, want", [(2, 0.0, 2), (2, 0.9, 1), (2, 1.2, 1), (2, 3.0, 1), (16, 4.2, 12),
                                               (1, 0.0, 1), (8, 0.4, 8)])
def test_cpu_threads_leave_busy_cores_alone(cores, load, want):
    from infra.runtime import cpu_threads
    assert cpu_threads(cores, load) == want


@pytest.mark.parametrize("load, want", [(None, None), (0.0, None), (0.3, None), (0.5, "PASSIVE"), (1.7, "PASSIVE")])
def test_openmp_threads_spin_alone_and_sleep_on_a_shared_machine(load, want, monkeypatch):
    """Sleeping waiters made a CPU epoch alone 16 % slower (docs/benchmarks.md): only a busy machine gets them;
    the stage scripts decide before torch is imported and never override the user's OMP_WAIT_POLICY."""
    import ast
    from infra.machine import omp_wait_policy
    assert omp_wait_policy(load) == want
    cli = ast.parse((ROOT / "trainer" / "cli.py").read_text())
    main = next(n for n in cli.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    src = ast.unparse(main)
    assert src.index("omp_wait_policy(recent_busy_cores())") < src.index("import torch")
    assert "os.environ.setdefault('OMP_WAIT_POLICY', policy)" in src


def _fenced_commands(text: str) -> list[str]:
    import re
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_every_documented_command_parses_against_its_script(doc, monkeypatch):
    """Each fenced command of the README and docs/ names a script that exists and flags it accepts."""
    import shlex
    import eval_vlm
    import convert_slake_dataset
    import web_demo_vlm
    parsers = {"train_pretrain_vlm.py": lambda a: parse_train_args("pretrain", a),
               "train_sft_vlm.py": lambda a: parse_train_args("sft", a),
               "eval_vlm.py": eval_vlm.parse_args, "web_demo_vlm.py": web_demo_vlm.parse_args,
               "convert_slake_dataset.py": convert_slake_dataset.parse_args}
    checked = 0
    for cmd in _fenced_commands(doc.read_text(encoding="utf-8")):
        for part in cmd.split("&&"):
            words = shlex.split(part.strip())
            if not words:
                continue
            if words[0] == "bash" or (len(words) > 2 and words[0].startswith("DEMO")):
                script = next(w for w in words if w.endswith(".sh"))
                assert (ROOT / script).is_file(), f"{doc.name}: {part}"
                checked += 1
            for i, w in enumerate(words):
                if w in parsers:
                    try:
                        parsers[w](words[i + 1:])
                    except SystemExit as exc:
                        pytest.fail(f"{doc.name}: `{part.strip()}` is refused by {w} (exit {exc.code})")
                    checked += 1
                    break
                if w == "-m" and words[i + 1].startswith("scripts."):
                    assert (ROOT / (words[i + 1].replace(".", "/") + ".py")).is_file(), f"{doc.name}: {part}"
                    checked += 1
    if doc.name == "README.md":
        assert checked >= 8


@pytest.mark.parametrize("source, slake", [("demo-hard:seed=0", False), ("demo:seed=3", False),
                                           ("hub:BoKelvin/SLAKE", True), ("release", True), ("unknown", False)])
def test_model_card_states_the_real_data_and_epochs(source, slake):
    from model.pretrained import model_card
    meta = {"config": {"hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 100, "image_tokens": 196,
                       "vision_hidden_size": 64, "projector": "mlp"},
            "vision": {"id": "random-tiny", "fingerprint": "x"}, "stage": "sft", "step": 10,
            "extra": {"train_config": {"data_path": "/home/me/secret/dataset/medical_vqa_train.jsonl", "epochs": 16,
                                       "batch_size": 8, "learning_rate": 1e-3}, "epoch": 14, "data_source": source}}
    card = model_card(meta)
    assert "/home/me" not in card and "14 of 16 epochs" in card
    assert ("BoKelvin/SLAKE" in card) == slake and ("cc-by-4.0" in card) == slake
    assert ("not trained on SLAKE" in card) == (not slake)


def test_training_records_where_its_data_came_from(tmp_path):
    from trainer.checkpointing import data_source
    (tmp_path / "manifest.json").write_text(json.dumps({"source": "release:/home/me/Slake1.0 + /data/vqa_rad"}))
    cfg = TrainConfig(data_path=str(tmp_path / "medical_vqa_train.jsonl"))
    assert data_source(cfg) == "release + vqa_rad"
    (tmp_path / "manifest.json").write_text(json.dumps({"source": "demo-hard:seed=0"}))
    assert data_source(cfg) == "demo-hard:seed=0"
    (tmp_path / "manifest.json").unlink()
    assert data_source(cfg) == "unknown"


def _imports(path: Path, top_level_only: bool) -> set[str]:
    import ast
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_lower_floors_never_import_higher_ones():
    """infra < model < dataset < (trainer, evaluation) < webdemo, scripts and the stage scripts; and
    the checkpoint readers share model/format.py instead of importing each other."""
    higher = {"dataset": ("trainer", "evaluation", "webdemo", "scripts"),
              "model": ("dataset", "trainer", "evaluation", "webdemo", "scripts"),
              "infra": ("model", "dataset", "trainer", "evaluation", "webdemo", "scripts")}
    for floor, banned in higher.items():
        for f in (ROOT / floor).glob("*.py"):
            bad = [m for m in _imports(f, top_level_only=False) if m.split(".")[0] in banned]
            assert not bad, f"{f.relative_to(ROOT)} imports {bad}"
    pretrained = _imports(ROOT / "model" / "pretrained.py", top_level_only=False)
    assert not {"model.checkpoint", "model.vlm"} & pretrained
    for f in ("pretrained", "vlm", "format"):  # the loader owns loading: nothing below it imports it back
        assert "model.checkpoint" not in _imports(ROOT / "model" / f"{f}.py", top_level_only=False)
    # model/ holds the network, not file utilities (they live in infra/)
    assert not {"atomic.py", "lock.py", "safe_files.py", "runtime.py", "flags.py"} & {f.name for f in (ROOT / "model").iterdir()}


def test_stage_two_names_stage_one_files_of_another_size(tmp_path, caplog):
    import logging
    from trainer.trainer import resolve_from_weight
    (tmp_path / "medical_pretrain_vlm_512.pth").write_bytes(b"x")
    cfg = TrainConfig(out_dir=str(tmp_path), from_weight="pretrain", hidden_size=768)
    with caplog.at_level(logging.WARNING):
        assert resolve_from_weight(cfg) is None
    assert "medical_pretrain_vlm_512.pth" in caplog.text and "--hidden_size 768" in caplog.text


def test_busy_cores_is_a_snapshot_of_the_machine():
    import os
    from infra.runtime import busy_cores
    busy = busy_cores(0.05)
    assert busy is None or 0.0 <= busy <= (os.cpu_count() or 1) + 1e-6


def test_missing_data_and_clip_are_one_message(tmp_path, capfd):
    from trainer.cli import main as train_main
    rc = train_main("pretrain", ["--data_path", str(tmp_path / "none.jsonl"), "--out_dir", str(tmp_path / "o"),
                                 "--vision_model", str(tmp_path / "clip")])
    err = capfd.readouterr().err
    assert rc == 2 and "two things are missing" in err and "convert_slake_dataset.py" in err and "git clone" in err
    assert not (tmp_path / "o" / "medical_pretrain_vlm_768.pth").exists() and "Traceback" not in err


# ----------------------------------------------------------------------------- Newcomer III (issue #28)

@pytest.mark.parametrize("vision, data", [("/tmp/run123/clip", "/tmp/pytest-0/d/medical_vqa_test.jsonl"),
                                          ("openai/clip-vit-base-patch16", "C:\\Users\\me\\test.jsonl"),
                                          ("random-tiny", "/home/me/x/medical_vqa_test.jsonl")])
def test_model_card_holds_no_local_path(vision, data):
    from model.pretrained import model_card
    meta = {"config": {"hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 100, "image_tokens": 196,
                       "vision_hidden_size": 64, "projector": "mlp"},
            "vision": {"id": vision, "fingerprint": "x"}, "stage": "sft", "step": 10,
            "extra": {"train_config": {"data_path": data, "epochs": 4}, "data_source": "demo:seed=0"}}
    metrics = {"data": data, "count": {"all": 5}, "closed_accuracy": 0.5, "open_accuracy": 0.5,
               "overall_accuracy": 0.5, "baselines": {}}
    card = model_card(meta, metrics)
    for private in ("/tmp", "/home", "C:\\", "Users"):
        assert private not in card
    assert "medical_vqa_test.jsonl" in card or "test.jsonl" in card
    if vision.startswith("openai"):
        assert vision in card


@pytest.mark.parametrize("script, typo, suggestion", [
    ("train_sft_vlm.py", "--epoch", "--epochs"), ("train_pretrain_vlm.py", "--batchsize", "--batch_size"),
    ("eval_vlm.py", "--modle_mode", "--model_mode"), ("convert_slake_dataset.py", "--slakedir", "--slake_dir"),
    ("web_demo_vlm.py", "--model-path", "--model_path")])
def test_flag_typos_get_a_suggestion_and_no_abbreviations(script, typo, suggestion):
    run = subprocess.run([sys.executable, script, typo, "2"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) <= 4 and f"did you mean {suggestion}?" in run.stderr, run.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_agrees_with_the_readme(script):
    """No --help sends a user where the README says otherwise: scripts run from any folder, the
    data contract lives in docs/data.md, and no default is stated twice."""
    out = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120).stdout
    assert "Run from the repository root" not in out and 'README, "Data contract"' not in out
    import re
    assert all(entry.count("(default:") <= 1 for entry in re.split(r"\n\s+--", out))  # one default per flag
    for doc in ("docs/data.md", "docs/training.md", "docs/evaluation.md", "docs/learning.md"):
        if doc in out:
            assert (ROOT / doc).is_file()


def test_plots_a_student_reads(tmp_path):
    from evaluation.plots import plot_baselines, plot_reliability
    from trainer.logs import plot_losses
    metrics = {"closed_accuracy": 0.8, "open_accuracy": 0.7, "overall_accuracy": 0.75,
               "baselines": {"majority_per_answer_type": {"closed_accuracy": 0.5, "open_accuracy": 0.1,
                                                          "overall_accuracy": 0.3},
                             "majority_per_question": {"closed_accuracy": 0.6, "open_accuracy": 0.4,
                                                       "overall_accuracy": 0.5}}}
    assert plot_baselines(metrics, tmp_path / "b.png") and (tmp_path / "b.png").stat().st_size > 5000
    assert not plot_baselines({"closed_accuracy": 0.8}, tmp_path / "none.png") and not (tmp_path / "none.png").exists()
    calib = {"ece": 0.05, "brier": 0.1, "reliability": [{"bin": [0.5, 0.6], "count": 12, "accuracy": 0.55},
                                                        {"bin": [0.9, 1.0], "count": 40, "accuracy": 0.9}]}
    plot_reliability(calib, tmp_path / "r.png")
    rows = [{"step": s, "loss": 6.0 / (s + 1)} for s in range(1, 50)] + \
        [{"step": 25, "val_loss": 0.2, "val_closed_acc": 0.6, "val_open_acc": 0.7},
         {"step": 49, "val_loss": 0.1, "val_closed_acc": 0.7, "val_open_acc": 0.8}]
    plot_losses(rows, tmp_path / "l.png", "run")
    for name in ("r.png", "l.png"):
        assert (tmp_path / name).stat().st_size > 5000


@pytest.mark.parametrize("script", ["eval_vlm.py", "web_demo_vlm.py"])
def test_flags_are_grouped(script):
    """Every flag of the evaluation and demo scripts sits in a named group (not the catch-all 'options')."""
    out = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120).stdout
    loose = out.split("options:", 1)[1].split("\n\n", 1)[0]
    assert [line for line in loose.splitlines() if line.strip().startswith("--")] == []
    assert out.count(":\n  --") >= 2


@pytest.mark.parametrize("extra", [[], ["--question", "Is there a lesion?"]])
def test_a_wrong_image_path_answers_before_any_heavy_import(tmp_path, extra):
    """`eval_vlm.py --image nope.png --question ...` stops at once: neither torch nor transformers is
    imported before the path is checked (a fresh clone took 3 s when the question was cleaned first)."""
    import subprocess
    import sys
    code = ("import sys, eval_vlm\n"
            "try:\n    eval_vlm.parse_args(sys.argv[1:])\nexcept SystemExit as e:\n    print('exit', e.code)\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code, "--image", str(tmp_path / "nope.png"), *extra],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "does not exist" in res.stderr and res.stdout.split("\n")[:2] == ["exit 2", "[]"], res


def test_the_machine_is_measured_once_per_start(monkeypatch):
    """The OpenMP policy and the thread count share one 0.3 s measurement; a later run measures again."""
    from infra import machine
    calls = []
    monkeypatch.setattr(machine, "busy_cores", lambda seconds=0.3: calls.append(seconds) or 0.25)
    monkeypatch.setattr(machine, "_last", None)
    assert machine.recent_busy_cores() == machine.recent_busy_cores() == 0.25 and len(calls) == 1
    monkeypatch.setattr(machine, "_last", (machine._last[0] - 60, 0.25))
    assert machine.recent_busy_cores() == 0.25 and len(calls) == 2


def _doc_default(cell: str, value) -> bool | None:
    """Whether a default cell of docs/training.md's flag table states ``value``; None when the
    cell is prose (``automatic: …``) or empty, which the test leaves to the reader."""
    cell = cell.strip().strip("`")
    if not cell or cell.startswith("automatic"):
        return None
    if cell == "''":
        return value in ("", None)
    if value is None:  # a flag whose unset value means "decide per machine"
        return cell == "auto"
    if cell in ("off", "on") and isinstance(value, bool):
        return value == (cell == "on")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return float(cell) == float(value)
        except ValueError:
            return False
    return cell == str(value)


@pytest.mark.parametrize("stage", ["pretrain", "sft"])
def test_training_doc_states_todays_defaults(stage):
    """docs/training.md's flag table names each flag's default per stage; a default that changed
    in the code and not there (the table said `all` long after `nearest` became the default)
    fails here, naming the row."""
    cfg = parse_train_args(stage, [])
    column = 1 if stage == "pretrain" else 2
    checked = 0
    for line in (ROOT / "docs" / "training.md").read_text().splitlines():
        if not line.startswith("| `--"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        names = [n.strip("`") for n in cells[0].split(", ")]
        pre = cells[1].split(", ")
        values = cells[column].split(", ") if cells[column] != "same" else pre
        if len(values) != len(names):  # prose or an empty stage column
            continue
        for name, cell in zip(names, values):
            ok = _doc_default(cell, getattr(cfg, name.lstrip("-")))
            assert ok is not False, f"docs/training.md: {name} default {cell!r} but {stage} uses " \
                                    f"{getattr(cfg, name.lstrip('-'))!r}"
            checked += ok is True
    assert checked >= 25

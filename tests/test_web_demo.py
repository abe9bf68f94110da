"""web_demo_vlm.py: handler logic, and an end-to-end run in headless Chromium.

The browser test needs Debian's chromium and the playwright package (.ci/run installs
both). Outside CI it is skipped when they are missing; in CI (CI=true) it fails instead.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import web_demo_vlm
from model.checkpoint import save_checkpoint
from tests.helpers import make_tiny_model, train_tiny_on_demo
from webdemo.app import EXAMPLES_DIR, Session, checkpoints_in, text_of

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("web")
    train_tiny_on_demo(root, seed=5, n_train=24, n_val=2, n_test=2, cache_dir="", epochs=3, val=False)
    return root / "out" / "medical_vlm_48.pth"


def test_examples_are_shipped():
    names = {p.name for p in EXAMPLES_DIR.iterdir()}
    assert {"ct_chest_lesions.png", "mri_head_normal.png", "ct_abdomen_lesion.dcm"} <= names


def test_session_streams_and_validates(tokenizer, tiny_tower, tmp_path, monkeypatch):
    # widely spread random weights: long answers without an end token, to see the stream
    path = save_checkpoint(tmp_path / "medical_vlm_64.pth", make_tiny_model(tokenizer, tiny_tower, spread=0.3),
                           tokenizer, "sft", 0)
    s = Session([path], "cpu")
    img, err = s.read_upload(str(EXAMPLES_DIR / "ct_abdomen_lesion.dcm"))
    assert err == "" and img.size == (224, 224)
    replies = list(s.respond("What modality is used to take this image?", [], img, None, 0.0, 1.0, 12))
    texts = [r.chat[-1]["content"] for r in replies]
    # the empty turn, an update per token (whole characters only), then the answer with its explanation
    assert 6 <= len(replies) <= 2 + 12 and replies[-1].explanation is not None
    assert all(r.explanation is None for r in replies[:-1])
    assert texts[0] == "" and len(texts[-1]) > len(texts[3]) > 0
    assert all(texts[-1].startswith(t) for t in texts)
    chat = replies[-1].chat
    follow = list(s.respond("How many lesions are in the image?", chat, img, None, 0.0, 1.0, 16))[-1]
    assert len(follow.chat) == 4 and follow.chat[0]["content"] == "What modality is used to take this image?"
    assert list(s.respond("", [], img, None, 0, 1, 8))[-1].error == "Type a question first."
    assert "Upload an image" in list(s.respond("Hi?", [], None, None, 0, 1, 8))[-1].error
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    img2, err2 = s.read_upload(str(bad))
    assert img2 is None and "Cannot use this file" in err2
    assert str(tmp_path) not in err2 and "notes.png" in err2  # the file's name, not the server's folder
    gone = s.read_upload(str(tmp_path / "deleted_by_the_cache_cleanup.png"))
    assert gone[0] is None and "expired" in gone[1] and "upload it again" in gone[1]
    truncated = tmp_path / "cut.png"
    truncated.write_bytes((EXAMPLES_DIR / "mri_head_normal.png").read_bytes()[:3000])
    assert s.read_upload(str(truncated))[0] is None and "Cannot use this file" in s.read_upload(str(truncated))[1]
    no_pixels = Path(__import__("pydicom").__file__).parent / "data" / "test_files" / "rtplan.dcm"
    assert "no pixel data" in s.read_upload(str(no_pixels))[1]
    monkeypatch.setattr("webdemo.app.MAX_UPLOAD_MB", 0)
    assert "larger than 0 MB" in s.read_upload(str(EXAMPLES_DIR / "mri_head_normal.png"))[1]
    assert text_of([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]) == "ab"


def test_folder_and_missing_checkpoint(checkpoint, tmp_path, capsys):
    assert checkpoints_in(checkpoint.parent) == [checkpoint]  # the _resume file is not offered
    assert web_demo_vlm.main(["--model_path", str(tmp_path / "medical_vlm_768.pth")]) == 2
    assert "python train_sft_vlm.py" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert web_demo_vlm.main(["--model_path", str(tmp_path / "empty")]) == 2


def _tinted_share(a: bytes, b: bytes, threshold: int = 40) -> float:
    """The share of pixels that differ by more than ``threshold`` (0-255, any channel) between two
    PNG screenshots, the second resized to the first. A model trained where to look tints a few
    patches strongly, so a mean over the image would hide the overlay."""
    import io

    import numpy as np
    from PIL import Image
    x = Image.open(io.BytesIO(a)).convert("RGB")
    y = Image.open(io.BytesIO(b)).convert("RGB").resize(x.size)
    diff = np.abs(np.asarray(x, dtype=np.int16) - np.asarray(y, dtype=np.int16)).max(-1)
    return float((diff > threshold).mean())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _browser_or_skip():
    import importlib.util
    if importlib.util.find_spec("playwright") is None:
        if os.environ.get("CI"):
            pytest.fail("playwright is missing in CI: it is in requirements-dev.txt")
        pytest.skip("playwright not installed (pip install -r requirements-dev.txt)")
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing in CI: .ci/run must install Debian's chromium")
        pytest.skip("chromium not installed (apt-get install chromium)")


def test_browser_end_to_end(checkpoint, tmp_path):
    _browser_or_skip()
    from playwright.sync_api import expect, sync_playwright
    port = _free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "CUDA_VISIBLE_DEVICES": ""}
    server = subprocess.Popen([sys.executable, "web_demo_vlm.py", "--model_path", str(checkpoint.parent),
                               "--port", str(port), "--device", "cpu"], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise AssertionError(f"server did not start:\n{server.stdout.read() if server.poll() is not None else ''}")
                time.sleep(0.5)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
                "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url)
            expect(page.get_by_text("Research model — not for diagnosis")).to_be_visible(timeout=30000)
            expect(page.locator("#model-card")).to_contain_text("RANDOM vision tower")

            def preview_src() -> str | None:
                img = page.locator("#preview img")
                return img.first.get_attribute("src") if img.count() else None

            seen = {None}  # every preview shown so far (sources are content-addressed)

            def upload(path, expect_preview=True):
                """Uploads and waits until the preview shows *this* file. Events still queued (the
                overlay switched off, the conversation cleared) repaint an older preview meanwhile,
                so any change is not enough: the preview must be one never shown before."""
                seen.add(preview_src())
                clear_file = page.locator("#upload button[aria-label=Clear]")
                if clear_file.count():
                    clear_file.click()
                page.locator("input[type=file]").first.set_input_files(str(path))
                if expect_preview:
                    deadline = time.time() + 30
                    while preview_src() in seen and time.time() < deadline:
                        time.sleep(0.2)
                    assert preview_src() not in seen, "the preview did not show the new file"
                    seen.add(preview_src())

            upload(EXAMPLES_DIR / "ct_chest_lesions.png")
            expect(page.locator("#preview img")).to_be_visible(timeout=30000)
            page.locator("#question textarea").fill("What modality is used to take this image?")
            page.locator("#ask").click()
            bot = page.locator("#chat .message.bot").last
            expect(bot).not_to_be_empty(timeout=60000)
            expect(bot).not_to_have_text("", timeout=60000)
            first_answer = bot.inner_text().strip()
            assert first_answer
            # the confidence panel, then "where it looked" over the scan (issue #21)
            expect(page.locator("#confidence .bar")).to_be_visible(timeout=60000)
            expect(page.locator("#confidence")).to_contain_text("%")
            plain = page.locator("#preview img").screenshot()
            page.locator("#show-look input[type=checkbox]").check()
            deadline = time.time() + 30
            while True:  # the preview is swapped for the overlay
                shown = page.locator("#preview img").screenshot()
                if _tinted_share(plain, shown) > 0.005 or time.time() > deadline:
                    break
                time.sleep(0.5)
            assert _tinted_share(plain, shown) > 0.005, "the overlay looks like the plain image"  # one patch of 196
            ARTIFACTS.mkdir(exist_ok=True)
            (ARTIFACTS / "web_demo_overlay.png").write_bytes(shown)
            seen.add(preview_src())
            page.locator("#show-look input[type=checkbox]").uncheck()
            deadline = time.time() + 30
            while _tinted_share(plain, page.locator("#preview img").screenshot()) > 0.005 and time.time() < deadline:
                time.sleep(0.5)  # switched off: the plain scan again
            assert _tinted_share(plain, page.locator("#preview img").screenshot()) <= 0.005, "the overlay stayed"

            page.locator("#clear").click()
            upload(EXAMPLES_DIR / "ct_abdomen_lesion.dcm")
            expect(page.locator("#preview img")).to_be_visible(timeout=30000)
            page.locator("#question textarea").fill("Is this image abnormal?")
            page.locator("#ask").click()
            expect(page.locator("#chat .message.bot").last).not_to_have_text("", timeout=60000)
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "web_demo.png"), full_page=True)

            bad = tmp_path / "scan.png"
            bad.write_text("this is not an image")
            upload(bad, expect_preview=False)
            expect(page.locator("#error")).to_contain_text("Cannot use this file", timeout=30000)
            page.locator("#clear").click()  # clears the error too, so the ask's own error is seen
            expect(page.locator("#error")).not_to_contain_text("Cannot use this file", timeout=30000)
            page.locator("#question textarea").fill("Is it normal?")
            page.locator("#ask").click()  # the ask reads the file itself, never an earlier image
            expect(page.locator("#error")).to_contain_text("Cannot use this file", timeout=30000)
            expect(page.locator("#question textarea")).to_have_value("Is it normal?")
            assert page.locator("#chat .message.bot").count() == 0
            page.locator("#upload button[aria-label=Clear]").click()
            page.locator("#ask").click()
            expect(page.locator("#error")).to_contain_text("Upload an image", timeout=30000)
            browser.close()
        assert server.poll() is None, "the server must keep serving after bad uploads"
        assert (ARTIFACTS / "web_demo.png").stat().st_size > 10000
    finally:
        server.terminate()
        server.wait(timeout=30)

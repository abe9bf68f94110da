"""The Gradio page behind web_demo_vlm.py.

Handlers are plain functions (``Session``) so they are unit-tested without a browser;
``build_app`` wires them to components. One model instance serves everyone: requests
are queued (concurrency 1), never run in parallel on it.
"""
from __future__ import annotations

import html
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from dataset.images import ImageReadError, load_image
from evaluation.runner import answer_stream
from model.checkpoint import LoadedCheckpoint, load_model, locate_checkpoint
from model.pretrained import is_pretrained_dir
from model.config import IMAGE_PLACEHOLDER, resolve_path
from model.generation import GenerationConfig
from model.tokenization import MAX_QUESTION_CHARS, clean_question

log = logging.getLogger("web_demo")

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
MAX_UPLOAD_MB = 30          # refused by the server before the upload is stored (launch(max_file_size))
UPLOAD_CACHE = (300, 900)   # every 5 min, delete uploads older than 15 min (and all at restart)
DISCLAIMER = ("**Research model — not for diagnosis.** Answers come from a small model trained on a public "
              "dataset; they can be wrong and must not guide clinical decisions.")


def checkpoints_in(spec: str | Path) -> list[Path]:
    """A checkpoint (.pth, model folder or hub id), or every checkpoint in a folder: its
    .pth files (resume states excluded) and its model folders."""
    path = locate_checkpoint(spec)
    if path.is_dir() and not is_pretrained_dir(path):
        found = sorted(p for p in path.glob("*.pth") if not p.stem.endswith("_resume"))
        found += sorted(p for p in path.iterdir() if p.is_dir() and is_pretrained_dir(p))
        if not found:
            raise FileNotFoundError(f"no checkpoints (*.pth or model folders) in {path}; train one with "
                                    "python train_sft_vlm.py")
        return found
    return [path]


def text_of(content) -> str:
    """Chat message content as plain text (Gradio 6 sends a list of typed parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return str(content or "")


def model_card(ckpt: LoadedCheckpoint) -> str:
    c = ckpt.config
    s = ckpt.model.parameter_summary()
    tower = ckpt.model.vision_tower
    lines = [f"**Checkpoint:** `{ckpt.path.name}` — stage `{ckpt.stage}`, step {ckpt.step}",
             f"**Language model:** {c.hidden_size} wide × {c.num_hidden_layers} layers"
             f"{' (MoE)' if c.use_moe else ''}, {s['llm'] / 1e6:.1f}M parameters; projector `{c.projector}`",
             f"**Vision tower:** `{c.vision_model}` ({s['vision_frozen'] / 1e6:.1f}M, frozen)"]
    if tower is not None and tower.is_random:
        lines.append("⚠️ **This model uses a RANDOM vision tower**: it was trained for a smoke test or the "
                     "offline demo and does not understand real images.")
    return "\n\n".join(lines)


@dataclass
class Reply:
    chat: list[dict]
    error: str = ""


class Session:
    """Model loading and the chat logic, independent of Gradio."""

    def __init__(self, paths: list[Path], device, vision_model: str | None = None):
        self.paths = paths
        self.device = device
        self.vision_model = vision_model
        self._loaded: LoadedCheckpoint | None = None

    def model(self, path: str | Path | None = None) -> LoadedCheckpoint:
        path = resolve_path(path) if path else resolve_path(self.paths[0])
        # compared the way load_model records it, so an unchanged choice never reloads
        if self._loaded is None or self._loaded.path != path:
            self._loaded = None  # free the previous model before loading the next
            self._loaded = load_model(path, self.device, vision_model=self.vision_model)
        return self._loaded

    @staticmethod
    def read_upload(file_path: str | None):
        """Returns (PIL image or None, error message)."""
        if not file_path:
            return None, ""
        p = Path(file_path)
        if p.stat().st_size > MAX_UPLOAD_MB * 1024 * 1024:
            return None, f"The file is larger than {MAX_UPLOAD_MB} MB."
        try:
            return load_image(p), ""
        except ImageReadError as exc:
            return None, f"Cannot use this file: {exc.args[0].split(': ', 1)[-1]}"

    def respond(self, question: str, chat: list[dict], image, ckpt_path, temperature: float, top_p: float,
                max_new_tokens: int) -> Iterator[Reply]:
        chat = [{"role": m["role"], "content": text_of(m["content"])} for m in (chat or [])]
        if image is None:
            yield Reply(chat, "Upload an image (PNG, JPEG or DICOM) or pick an example first.")
            return
        if not (question or "").strip():
            yield Reply(chat, "Type a question first.")
            return
        try:
            question = clean_question(question)
        except ValueError as exc:
            yield Reply(chat, f"Cannot use this question: {exc}.")
            return
        history = [dict(m, content=(IMAGE_PLACEHOLDER + "\n" + m["content"]) if i == 0 else m["content"])
                   for i, m in enumerate(chat)]
        cfg = GenerationConfig(max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                               top_p=float(top_p))
        turn = chat + [{"role": "user", "content": question}]
        answer = ""
        yield Reply(turn + [{"role": "assistant", "content": answer}])
        for answer in answer_stream(self.model(ckpt_path), [image], history, question, cfg):
            yield Reply(turn + [{"role": "assistant", "content": answer}])
        if not answer:
            yield Reply(turn + [{"role": "assistant", "content": "(no answer)"}])


def _error_html(msg: str) -> str:
    return f'<div class="demo-error" role="alert">{html.escape(msg)}</div>' if msg else ""


def build_app(session: Session):
    import gradio as gr

    examples = sorted(str(p) for p in EXAMPLES_DIR.glob("*") if p.suffix.lower() in (".png", ".jpg", ".dcm"))
    # System fonts only: the default theme would fetch web fonts, which hangs offline.
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])
    with gr.Blocks(title="Medical VQA demo", analytics_enabled=False, delete_cache=UPLOAD_CACHE) as app:
        gr.Markdown("# Medical visual question answering\n" + DISCLAIMER)
        image_state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                ckpt = gr.Dropdown([str(p) for p in session.paths], value=str(session.paths[0]),
                                   label="Checkpoint", visible=len(session.paths) > 1)
                card = gr.Markdown(model_card(session.model()), elem_id="model-card")
                upload = gr.File(label="Image (PNG, JPEG or DICOM .dcm)", type="filepath", elem_id="upload")
                if examples:
                    gr.Examples(examples, inputs=upload, label="Examples")
                preview = gr.Image(label="Preview (DICOM shown after windowing)", interactive=False,
                                   type="pil", elem_id="preview", height=280)
                with gr.Accordion("Sampling", open=False):
                    temperature = gr.Slider(0.0, 1.5, value=0.0, step=0.05, label="Temperature (0 = greedy)")
                    top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p")
                    max_new = gr.Slider(1, 256, value=64, step=1, label="Max new tokens")
            with gr.Column(scale=2):
                chatbot = gr.Chatbot(label="Conversation", elem_id="chat", height=420)
                error = gr.HTML(elem_id="error")
                question = gr.Textbox(label="Question", placeholder="e.g. Which organ is abnormal?",
                                      elem_id="question", lines=1, max_length=MAX_QUESTION_CHARS)
                with gr.Row():
                    send = gr.Button("Ask", variant="primary", elem_id="ask")
                    clear = gr.Button("Clear conversation", elem_id="clear")

        def on_upload(path):
            img, err = Session.read_upload(path)
            return img, img, [], _error_html(err)

        def on_ask(q, chat, img, path, t, p, n):
            for reply in session.respond(q, chat, img, path, t, p, n):
                yield reply.chat, _error_html(reply.error), ("" if not reply.error else q)

        def on_checkpoint(path):
            return model_card(session.model(path)), []

        upload.change(on_upload, upload, [preview, image_state, chatbot, error])
        ask_inputs = [question, chatbot, image_state, ckpt, temperature, top_p, max_new]
        send.click(on_ask, ask_inputs, [chatbot, error, question])
        question.submit(on_ask, ask_inputs, [chatbot, error, question])
        clear.click(lambda: ([], ""), None, [chatbot, error])
        ckpt.change(on_checkpoint, ckpt, [card, chatbot])
    app.queue(default_concurrency_limit=1, max_size=64)
    css = ".demo-error{color:#b00020;font-weight:600;padding:6px 0}"
    return app, theme, css

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
from evaluation.api import guess_answer_type
from evaluation.explain import Explanation, explain, read_answer_sets
from evaluation.inference import answer_stream, chat_prompt, generation_autocast, image_features
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


MAX_HISTORY_CHARS = 2000  # earlier turns the model sees (newest kept): bounds generation and explanation cost


def safe_history(chat) -> list[dict]:
    """The earlier turns of a conversation, rebuilt from what the client sent (the Gradio API
    lets a client send any history): only user questions each followed by an assistant answer,
    in that order (a forged system turn, a leading answer or a stray message are dropped), each
    question cleaned like a typed one (clean_question: no image placeholder, length capped),
    answers without placeholders, and only the newest turns that fit MAX_HISTORY_CHARS."""
    pairs, question = [], None
    for m in chat if isinstance(chat, list) else []:
        if not isinstance(m, dict):
            continue
        role, text = m.get("role"), text_of(m.get("content"))
        if role == "user":
            try:
                question = clean_question(text)
            except ValueError:
                question = None
        elif role == "assistant" and question is not None:
            answer = " ".join(text.replace(IMAGE_PLACEHOLDER, " ").split())[:MAX_QUESTION_CHARS]
            if answer:
                pairs.append((question, answer))
            question = None
    kept, used = [], 0
    for q, a in reversed(pairs):
        used += len(q) + len(a)
        if used > MAX_HISTORY_CHARS:
            break
        kept.append((q, a))
    return [{"role": role, "content": text} for q, a in reversed(kept) for role, text in (("user", q), ("assistant", a))]


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
    explanation: Explanation | None = None


def confidence_html(e: Explanation | None) -> str:
    """The answer's probability as a bar, and the alternatives under it."""
    if e is None:
        return ""
    pct = 100 * e.probability
    colour = "#2e7d32" if pct >= 80 else "#f9a825" if pct >= 50 else "#c62828"
    what = "over the possible answers" if e.scored_over == "candidates" else "of its words"
    head = (f"<b>Not sure</b>: the model's answer <i>{html.escape(e.model_answer)}</i> has {pct:.0f}% "
            f"(below the threshold)" if e.abstained else f"<b>{html.escape(e.answer)}</b>: {pct:.0f}% {what}")
    alts = "".join(f"<li>{html.escape(a)}: {100 * p:.0f}%</li>" for a, p in e.alternatives[:4])
    return (f'<div class="confidence"><div>{head}</div>'
            f'<div class="bar" role="meter" aria-valuenow="{pct:.0f}" aria-valuemin="0" aria-valuemax="100">'
            f'<div style="width:{pct:.1f}%;background:{colour}"></div></div>'
            + (f'<div>Alternatives:</div><ul class="alternatives">{alts}</ul>' if alts else "") + "</div>")


class Session:
    """Model loading and the chat logic, independent of Gradio."""

    def __init__(self, paths: list[Path], device, vision_model: str | None = None, train_path: Path | None = None):
        self.paths = paths
        self.device = device
        self.vision_model = vision_model
        self._loaded: LoadedCheckpoint | None = None
        # the answers alternatives are scored from (closed: Yes / No without a training split)
        self.sets = None
        if train_path is not None and train_path.is_file():
            self.sets = read_answer_sets(train_path)

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
        if not p.is_file():  # deleted by the upload cache's clean-up (UPLOAD_CACHE)
            return None, f"The upload has expired on the server (kept {UPLOAD_CACHE[1] // 60} minutes): upload it again."
        if p.stat().st_size > MAX_UPLOAD_MB * 1024 * 1024:
            return None, f"The file is larger than {MAX_UPLOAD_MB} MB."
        try:
            return load_image(p), ""
        except ImageReadError as exc:  # the server's upload folder is not the user's business
            return None, f"Cannot use this file: {exc.args[0].split(': ', 1)[-1].replace(str(p), p.name)}"

    def explain(self, ckpt: LoadedCheckpoint, image, feats, history: list[dict], question: str, answer: str,
                abstain_below: float | None) -> Explanation:
        prompt = chat_prompt(ckpt, [image], history, question)
        with generation_autocast(self.device):
            return explain(ckpt.model, ckpt.tokenizer, ckpt.model.vision_tower, image, prompt, feats, answer,
                           guess_answer_type(question), self.sets, abstain_below=abstain_below)

    def respond(self, question: str, chat: list[dict], image, ckpt_path, temperature: float, top_p: float,
                max_new_tokens: int, abstain_below: float = 0.0) -> Iterator[Reply]:
        chat = safe_history(chat)
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
        ckpt = self.model(ckpt_path)
        feats = image_features(ckpt, [image])  # once: for the answer and for its explanation
        for answer in answer_stream(ckpt, [image], history, question, cfg, feats):
            yield Reply(turn + [{"role": "assistant", "content": answer}])
        if not answer:
            yield Reply(turn + [{"role": "assistant", "content": "(no answer)"}])
            return
        try:
            why = self.explain(ckpt, image, feats, history, question, answer, abstain_below or None)
        except Exception:  # noqa: BLE001 (the answer stands without its explanation; the log has why)
            log.exception("could not explain the answer %r", answer)
            yield Reply(turn + [{"role": "assistant", "content": answer}],
                        "The answer's confidence and map could not be computed (see the server log).")
            return
        shown = f"not sure (the model's answer: {answer}, {100 * why.probability:.0f}%)" if why.abstained else answer
        yield Reply(turn + [{"role": "assistant", "content": shown}], explanation=why)


@dataclass(frozen=True)
class Upload:
    """A file as an upload event read it: its server path, and its image or why there is none."""
    path: str | None
    image: object = None
    error: str = ""

    @classmethod
    def read(cls, path: str | None) -> Upload:
        image, error = Session.read_upload(path)
        return cls(path, image, error)


def _image_of(uploaded: Upload | None):
    return uploaded.image if uploaded is not None else None


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
        image_state = gr.State(None)  # the Upload of the last upload event
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
                show_look = gr.Checkbox(False, label="Show where the model looked (after an answer)",
                                        elem_id="show-look")
                with gr.Accordion("Confidence", open=False):
                    abstain = gr.Slider(0.0, 1.0, value=0.0, step=0.05, elem_id="abstain",
                                        label="Answer 'not sure' below this probability (0 = always answer)")
                with gr.Accordion("Sampling", open=False):
                    temperature = gr.Slider(0.0, 1.5, value=0.0, step=0.05, label="Temperature (0 = greedy)")
                    top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p")
                    max_new = gr.Slider(1, 256, value=64, step=1, label="Max new tokens")
            with gr.Column(scale=2):
                chatbot = gr.Chatbot(label="Conversation", elem_id="chat", height=420)
                confidence = gr.HTML(elem_id="confidence")
                error = gr.HTML(elem_id="error")
                question = gr.Textbox(label="Question", placeholder="e.g. Which organ is abnormal?",
                                      elem_id="question", lines=1, max_length=MAX_QUESTION_CHARS)
                with gr.Row():
                    send = gr.Button("Ask", variant="primary", elem_id="ask")
                    clear = gr.Button("Clear conversation", elem_id="clear")

        overlay_state = gr.State(None)

        def on_upload(path):
            up = Upload.read(path)
            return up.image, up, [], _error_html(up.error), None, ""

        def on_ask(q, chat, file_path, uploaded, path, t, p, n, a, show):
            # The image is the file the browser shows, decided in this call: after a quick click the
            # upload event may not have run yet, and its state would still hold the previous image.
            # The state is used when it is of this very file (read once; the server deletes uploads
            # after UPLOAD_CACHE, while a conversation may go on).
            up = uploaded if uploaded is not None and uploaded.path == file_path else Upload.read(file_path)
            if up.error:
                yield chat, _error_html(up.error), q, "", gr.update(), gr.update()
                return
            img = up.image
            for reply in session.respond(q, chat, img, path, t, p, n, a):
                why = reply.explanation
                look = why.overlay if why is not None else None
                yield (reply.chat, _error_html(reply.error), ("" if not reply.error else q), confidence_html(why),
                       look if why is not None else gr.update(), look if (show and look is not None) else
                       (img if why is not None else gr.update()))

        def on_show(show, uploaded, look):
            return look if show and look is not None else _image_of(uploaded)

        def on_checkpoint(path):
            return model_card(session.model(path)), []

        upload.change(on_upload, upload, [preview, image_state, chatbot, error, overlay_state, confidence])
        ask_inputs = [question, chatbot, upload, image_state, ckpt, temperature, top_p, max_new, abstain, show_look]
        ask_outputs = [chatbot, error, question, confidence, overlay_state, preview]
        send.click(on_ask, ask_inputs, ask_outputs)
        question.submit(on_ask, ask_inputs, ask_outputs)
        show_look.change(on_show, [show_look, image_state, overlay_state], preview)
        clear.click(lambda uploaded: ([], "", "", None, _image_of(uploaded)), image_state, [chatbot, error, confidence, overlay_state, preview])
        ckpt.change(on_checkpoint, ckpt, [card, chatbot])
    app.queue(default_concurrency_limit=1, max_size=64)
    css = (".demo-error{color:#b00020;font-weight:600;padding:6px 0}"
           ".confidence .bar{height:10px;background:#e0e0e0;border-radius:5px;margin:4px 0;max-width:320px}"
           ".confidence .bar div{height:10px;border-radius:5px}.confidence ul{margin:2px 0 0 18px}")
    return app, theme, css

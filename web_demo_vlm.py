"""Browser demo: upload a scan (PNG, JPEG or DICOM), ask questions, watch the answer stream.

Run from any folder:
    python web_demo_vlm.py --model_path out/medical_vlm_768.pth      # then open http://127.0.0.1:7860
    python web_demo_vlm.py --model_path out/                         # pick among the checkpoints in out/
Research use only, not for diagnosis.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from infra import flags
from model.config import user_path

log = logging.getLogger("web_demo")


def parse_args(argv=None):
    ap = flags.ArgumentParser(description=__doc__)
    model = ap.add_argument_group("the model")
    model.add_argument("--model_path", default="out/medical_vlm_768.pth",
                       help="a checkpoint (.pth, model folder or hub id) or a folder of them")
    model.add_argument("--vision_model", help="load the vision tower from here (weights must match)")
    model.add_argument("--device", default="auto", help=flags.DEVICE_HELP)
    serve = ap.add_argument_group("serving")
    serve.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve your local network")
    serve.add_argument("--port", type=flags.port, default=7860, help="the port to serve on")
    serve.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    model.add_argument("--train_path", default="dataset/medical_vqa_train.jsonl",
                    help="the training split whose answers the confidence panel scores as alternatives "
                         "(without it: Yes / No for closed questions, none for open ones)")
    args = ap.parse_args(argv)
    args.train_path = user_path(args.train_path, ap.get_default("train_path"))
    args.model_path = user_path(args.model_path, ap.get_default("model_path"), may_be_remote=True)
    args.vision_model = user_path(args.vision_model, None, may_be_remote=True)
    return args


def stage_of(path: Path) -> str | None:
    return "pretrain" if path.name.startswith("medical_pretrain_vlm") else "sft"


def main(argv=None) -> int:
    args = parse_args(argv)  # before the heavy imports: --help and flag mistakes answer at once
    from infra.errors import UserError
    from infra.runtime import pick_device, setup_logging
    from model.checkpoint import read_checkpoint
    from webdemo.app import MAX_UPLOAD_MB, Session, build_app, checkpoints_in
    setup_logging()
    try:
        free = flags.port_is_free(args.host, args.port)
    except flags.FlagError as exc:
        log.error("error: %s", exc)
        return 2  # a user-caused error: one named message, exit code 2
    if not free:
        log.error("error: port %d on %s is already in use (another demo still running?); pass --port %d or stop "
                  "the other server", args.port, args.host, args.port + 1)
        return 2  # a user-caused error: one named message, exit code 2
    try:
        paths = checkpoints_in(args.model_path)
        read_checkpoint(paths[0], stage_hint=stage_of(paths[0]))  # fail fast, with the stage to run
        from model.config import resolve_path
        train = resolve_path(args.train_path)
        if not train.is_file():
            log.info("no training split at %s: alternatives are scored over Yes / No for closed questions only "
                     "(pass --train_path)", train)
        session = Session(paths, pick_device(args.device), args.vision_model, train)
        app, theme, css = build_app(session)
    except (FileNotFoundError, UserError) as exc:
        log.error("error: %s", exc)
        return 2  # a user-caused error: one named message, exit code 2
    except KeyboardInterrupt:
        log.error("interrupted before the server started")
        return 130
    log.info("serving %d checkpoint(s) on http://%s:%d", len(paths), args.host, args.port)
    try:
        app.launch(server_name=args.host, server_port=args.port, share=args.share, theme=theme, css=css,
                   footer_links=[], show_error=True, max_file_size=f"{MAX_UPLOAD_MB}mb",
                   quiet=True)  # Gradio's own hints ("set share=True in launch()") would contradict --share
    except KeyboardInterrupt:
        log.info("stopped")
        return 130
    except OSError as exc:  # the port was taken between the check and the start
        log.error("error: cannot serve on %s:%d (%s); pass another --port", args.host, args.port, exc)
        return 2  # a user-caused error: one named message, exit code 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Tokenizer loading and the one chat format used for training, evaluation and the demo.

Conversations are rendered with the tokenizer's own turn markers. With this toolkit's
tokenizer and MiniMind's 2025-04+ one that is ChatML::

    <|im_start|>user\n<image tokens>\nWhat organ is this?<|im_end|>\n<|im_start|>assistant\nLiver<|im_end|>\n

and with MiniMind's 2025-02 tokenizer (the one paired with the original-naming MiniMind2
weights) ``<s>user\n...</s>\n<s>assistant\nLiver</s>\n``. Only the assistant's content and
its closing marker carry loss. ``<image>`` in a user message becomes ``image_tokens``
copies of the tokenizer's image token.
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from model.config import DEFAULT_TOKENIZER, IMAGE_PLACEHOLDER, resolve_path

log = logging.getLogger(__name__)

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
IMAGE_TOKEN = "<|image_pad|>"
IGNORE_INDEX = -100
MEMO_ENTRIES = 50_000  # distinct texts ChatEncoder remembers (SLAKE has ~3,000; a few MB at most)
MAX_QUESTION_CHARS = 2000  # typed questions (web demo, --question, the API): far above any real one


@dataclass(frozen=True)
class ChatMarkers:
    """The tokens that open a turn (followed by the role and a newline) and close it (the
    model's end token)."""
    start: str
    end: str

    def template(self) -> str:
        """A Jinja chat template for tokenizers that have none."""
        return ("{%- for message in messages -%}"
                f"{{{{ '{self.start}' + message['role'] + '\\n' + message['content'] + '{self.end}' + '\\n' }}}}"
                "{%- endfor -%}"
                f"{{%- if add_generation_prompt -%}}{{{{ '{self.start}assistant\\n' }}}}{{%- endif -%}}")


CHATML = ChatMarkers(IM_START, IM_END)
CHAT_TEMPLATE = CHATML.template()


def chat_markers(tok: PreTrainedTokenizerBase) -> ChatMarkers:
    """Turn markers derived from the tokenizer itself: ChatML when it has those tokens;
    otherwise the special tokens its chat template puts around a message (MiniMind's
    2025-02 tokenizer: ``<s>`` and ``</s>``); otherwise its BOS/EOS tokens."""
    vocab = tok.get_vocab()
    if IM_START in vocab and IM_END in vocab:
        return CHATML
    specials = sorted({t for t in [*tok.all_special_tokens, *tok.get_added_vocab()] if t in vocab},
                      key=len, reverse=True)
    if tok.chat_template:
        probe = "\u2063probe\u2063"
        try:
            text = tok.apply_chat_template([{"role": "user", "content": probe}], tokenize=False)
            at = text.index(probe)
            before, after = text[:text.rindex("user", 0, at)], text[at + len(probe):]
            start = next((t for t in specials if before.endswith(t)), None)
            end = next((t for t in specials if after.startswith(t)), None)
            if start and end and start != end:
                return ChatMarkers(start, end)
        except Exception:  # a template that needs other inputs: fall back to BOS/EOS
            pass
    if tok.bos_token in vocab and tok.eos_token in vocab and tok.bos_token != tok.eos_token:
        return ChatMarkers(tok.bos_token, tok.eos_token)
    raise ValueError("the tokenizer has no turn markers: neither the ChatML tokens "
                     f"{[IM_START, IM_END]}, nor a chat template with special tokens around a message, nor "
                     f"distinct BOS/EOS tokens; use {DEFAULT_TOKENIZER} or MiniMind's tokenizer")


def prepare_tokenizer(tok: PreTrainedTokenizerBase, source: str) -> PreTrainedTokenizerBase:
    """Finds the turn markers and adds the image token when a foreign tokenizer (e.g.
    MiniMind's) lacks it, at the end of the vocabulary: every existing id keeps the meaning
    the weights were trained with, and the model's vocabulary follows ``len(tok)``."""
    try:
        markers = chat_markers(tok)
    except ValueError as exc:
        raise ValueError(f"tokenizer at {source}: {exc}") from None
    vocab = tok.get_vocab()
    if IMAGE_TOKEN not in vocab:
        tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
        log.info("tokenizer %s: added special token %s (id %d)", source, IMAGE_TOKEN,
                 tok.convert_tokens_to_ids(IMAGE_TOKEN))
    if tok.pad_token is None:
        tok.pad_token = next(t for t in (PAD_TOKEN, tok.unk_token, markers.end) if t and t in tok.get_vocab())
    tok.eos_token = markers.end
    if not tok.chat_template:
        tok.chat_template = markers.template()
    return tok


def load_tokenizer(path: str = DEFAULT_TOKENIZER) -> PreTrainedTokenizerBase:
    resolved = resolve_path(path)
    if not resolved.is_dir():
        raise FileNotFoundError(f"tokenizer directory {resolved} not found; pass --tokenizer_path "
                                f"to a Hugging Face tokenizer folder (default {DEFAULT_TOKENIZER})")
    return prepare_tokenizer(AutoTokenizer.from_pretrained(str(resolved)), str(resolved))


def clean_question(text: str, max_chars: int = MAX_QUESTION_CHARS) -> str:
    """A question typed by a person, made safe to put in a prompt: the image placeholder is
    removed (images are attached by the program, not by text) and the length is capped.
    Special tokens such as ``<|im_end|>`` need no removal: ChatEncoder encodes message text
    with ``split_special_tokens``, so they are ordinary characters there."""
    if not isinstance(text, str):
        raise ValueError("the question must be text")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate, or bytes a shell could not decode (e.g. \xff)
        raise ValueError(f"the question is not valid text (character {exc.start + 1} cannot be encoded as UTF-8; "
                         "retype it, or save it as UTF-8)") from None
    text = " ".join(text.replace(IMAGE_PLACEHOLDER, " ").split())
    if not text:
        raise ValueError("the question is empty")
    if len(text) > max_chars:
        raise ValueError(f"the question has {len(text):,} characters; the limit is {max_chars:,}")
    return text


def answer_ids(tok: PreTrainedTokenizerBase, answer: str, end_id: int) -> list[int]:
    """An answer as the model writes it: its tokens (special-token text in it stays plain text),
    then the end-of-turn token. What constrained decoding, candidate scoring and relevance maps
    all score."""
    return tok(answer, add_special_tokens=False, split_special_tokens=True)["input_ids"] + [end_id]


def image_token_id(tok: PreTrainedTokenizerBase) -> int:
    return tok.convert_tokens_to_ids(IMAGE_TOKEN)


def end_token_id(tok: PreTrainedTokenizerBase) -> int:
    return tok.convert_tokens_to_ids(chat_markers(tok).end)


@dataclass
class EncodedChat:
    input_ids: list[int]
    labels: list[int]
    n_images: int
    truncated_tokens: int = 0


class ChatEncoder:
    """Turns a conversation (list of {"role", "content"}) into ids and loss labels."""

    def __init__(self, tok: PreTrainedTokenizerBase, image_tokens: int):
        self.tok = tok
        self.image_tokens = image_tokens
        self.image_id = image_token_id(tok)
        self.markers = chat_markers(tok)
        self.end_id = tok.convert_tokens_to_ids(self.markers.end)
        # VQA data repeats the same questions and answers many times: tokenise each once. Bounded
        # (least recently used out): an API answering endless distinct questions must not grow.
        self._memo: OrderedDict[tuple[str, bool], tuple[int, ...]] = OrderedDict()
        self._memo_lock = threading.Lock()
        self.newline = self._ids("\n")

    def _ids(self, text: str, markup: bool = False) -> list[int]:
        """Token ids of message text, where special-token strings (``<|im_end|>``, the image
        token) are plain characters; ``markup=True`` only for the chat headers we write."""
        key = (text, markup)
        with self._memo_lock:
            ids = self._memo.get(key)
            if ids is not None:
                self._memo.move_to_end(key)
                return list(ids)
        ids = tuple(self.tok(text, add_special_tokens=False, split_special_tokens=not markup)["input_ids"]) \
            if text else ()
        with self._memo_lock:
            self._memo[key] = ids
            if len(self._memo) > MEMO_ENTRIES:
                self._memo.popitem(last=False)
        return list(ids)

    def _header(self, role: str) -> list[int]:
        return self._ids(f"{self.markers.start}{role}\n", markup=True)

    def _content(self, text: str) -> tuple[list[int], list[bool]]:
        """Token ids of a user/system message with image placeholders expanded; the mask
        marks text tokens that may be cut when the sample is too long."""
        ids, cuttable = [], []
        for i, part in enumerate(text.split(IMAGE_PLACEHOLDER)):
            if i:
                ids += [self.image_id] * self.image_tokens
                cuttable += [False] * self.image_tokens
            part_ids = self._ids(part)
            ids += part_ids
            cuttable += [True] * len(part_ids)
        return ids, cuttable

    def encode(self, conversations: list[dict], max_seq_len: int | None = None,
               add_generation_prompt: bool = False) -> EncodedChat:
        """Training form when the last message is the assistant's; with
        ``add_generation_prompt`` the prompt a model continues from."""
        pieces = []  # (ids, is_target, cuttable)
        n_images = 0
        for msg in conversations:
            role, content = msg["role"], msg["content"]
            pieces.append((self._header(role), False, None))
            if role == "assistant":
                pieces.append((self._ids(content) + [self.end_id], True, None))
            else:
                n_images += content.count(IMAGE_PLACEHOLDER)
                ids, cuttable = self._content(content)
                pieces.append((ids, False, cuttable))
                pieces.append(([self.end_id], False, None))
            pieces.append((self.newline, False, None))
        if add_generation_prompt:
            pieces.append((self._header("assistant"), False, None))
        elif pieces:
            pieces.pop()  # the newline after the last answer carries no information
        total = sum(len(p[0]) for p in pieces)
        truncated = 0
        if max_seq_len is not None and total > max_seq_len:
            overflow = total - max_seq_len
            # Cut question text from the end of the latest user turn backwards; answers and
            # image tokens are never cut, so the sample keeps its supervision and its image.
            for idx in range(len(pieces) - 1, -1, -1):
                ids, is_target, cuttable = pieces[idx]
                if cuttable is None or overflow == 0:
                    continue
                keep_ids, keep_cut = list(ids), list(cuttable)
                j = len(keep_ids) - 1
                while j >= 0 and overflow:
                    if keep_cut[j]:
                        del keep_ids[j], keep_cut[j]
                        overflow -= 1
                        truncated += 1
                    j -= 1
                pieces[idx] = (keep_ids, is_target, keep_cut)
            if overflow:
                raise ValueError(f"sample needs {total} tokens but max_seq_len={max_seq_len} and only "
                                 f"{truncated} question tokens can be cut (answers and image tokens are "
                                 "kept); raise --max_seq_len")
        input_ids, labels = [], []
        for ids, is_target, _ in pieces:
            input_ids += ids
            labels += ids if is_target else [IGNORE_INDEX] * len(ids)
        return EncodedChat(input_ids, labels, n_images, truncated)

"""Answer text normalisation, shared by the data side (closed-question grouping, answer priors)
and the metrics (evaluation/metrics.py re-exports it). English: lower-case, number words to
digits, punctuation to spaces, articles dropped; Chinese has rules of its own."""
from __future__ import annotations

import re
import unicodedata

NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile(r"[^\w\s]")


_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
# whole Chinese answers that are numbers ("两个" = 2); SLAKE's Chinese counts are mostly digits already
CHINESE_NUMBERS = {c: str(i) for i, c in enumerate("零一二三四五六七八九十")} | {"两": "2"}


def is_chinese(text: str) -> bool:
    return bool(_CJK.search(str(text)))


def normalize(text: str) -> str:
    """English: lower-case, number words to digits, punctuation to spaces, articles dropped.
    Chinese (any CJK character): full-width forms to ASCII (NFKC), punctuation and spaces
    removed (Chinese has no word spaces), Latin letters lower-cased, a whole-number answer
    ("两个", "三") to digits; no article or word rules."""
    text = unicodedata.normalize("NFKC", str(text))
    if is_chinese(text):
        t = _PUNCT.sub("", text).replace(" ", "").lower()
        core = t[:-1] if len(t) == 2 and t.endswith("个") else t
        return CHINESE_NUMBERS.get(core, t)
    words = _PUNCT.sub(" ", text.lower()).split()
    return " ".join(NUMBER_WORDS.get(w, w) for w in words if w not in ARTICLES)

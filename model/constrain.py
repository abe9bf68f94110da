"""Answer-constrained decoding: the model may only spell out answers from a fixed set.

SLAKE tables mostly come from classifiers over a fixed answer set; a generative model
scored by exact match is compared fairly to them when it also chooses from that set
(``eval_vlm.py --constrain closed|all``). The answer sets are token sequences (answer +
end token) stored as a prefix trie, flattened into a transition table on the device:
``table[state, token]`` is the next state or -1. Each decoding step masks the logits to
the tokens with a transition and advances the state with a gather, so constrained
decoding adds no host-device sync. Several answer sets share one table, each with its own
root (closed questions start at one, open ones at another).
"""
from __future__ import annotations

import torch

from model.tokenization import answer_ids


class AnswerTrie:
    def __init__(self, answer_sets: dict[str, list[list[int]]], vocab_size: int):
        """``answer_sets``: name -> token sequences (each ending with the end token)."""
        children: list[dict[int, int]] = []
        self.roots: dict[str, int] = {}
        self.sequences = {name: {tuple(s) for s in seqs} for name, seqs in answer_sets.items()}
        for name, seqs in answer_sets.items():
            if not seqs:
                raise ValueError(f"answer set '{name}' is empty")
            self.roots[name] = len(children)
            children.append({})
            for seq in seqs:
                state = self.roots[name]
                for tok in seq:
                    if tok not in children[state]:
                        children[state][tok] = len(children)
                        children.append({})
                    state = children[state][tok]
        rows, cols, nxt = [], [], []
        for state, d in enumerate(children):
            for tok, n in d.items():
                rows.append(state)
                cols.append(tok)
                nxt.append(n)
        self.table = torch.full((len(children), vocab_size), -1, dtype=torch.int32)
        self.table[torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)] = \
            torch.tensor(nxt, dtype=torch.int32)

    def to(self, device) -> "AnswerTrie":
        self.table = self.table.to(device)
        return self

    def start(self, names: list[str | None], device) -> torch.Tensor:
        """Start states per row: the root of its answer set, or -1 (free) for a set not held."""
        return torch.tensor([self.roots.get(n, -1) if n else -1 for n in names], dtype=torch.long, device=device)

    def mask(self, logits: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """Logits with every token outside the answer set at -inf. A row whose answer is
        complete (no transition left) is left as it is: it is finished anyway."""
        allowed = self.table[state.clamp(min=0), :logits.shape[-1]] >= 0
        allowed |= (~allowed.any(-1, keepdim=True)) | (state < 0).unsqueeze(-1)  # -1: an unconstrained row
        return logits.masked_fill(~allowed, float("-inf"))

    def advance(self, state: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        nxt = self.table[state.clamp(min=0), token].long()
        return torch.where((nxt >= 0) & (state >= 0), nxt, state)


def build_answer_trie(tokenizer, answers: list[tuple[str, str]], end_id: int, mode: str) -> AnswerTrie:
    """``answers``: (answer, answer_type) of the training split. ``mode``: 'closed' constrains
    closed questions only (open ones decode freely), 'all' constrains both, open questions to
    the training split's answer vocabulary."""
    closed = [a for a, t in answers if t == "CLOSED"]
    open_ = [a for a, t in answers if t == "OPEN"]
    def seqs(answers):
        out = []
        for a in sorted(set(answers)):
            ids = answer_ids(tokenizer, a, end_id)
            if len(ids) > 1:  # not an empty answer
                out.append(ids)
        return out
    sets = {"CLOSED": seqs(closed)}
    if mode == "all":
        sets["OPEN"] = seqs(open_)
    return AnswerTrie(sets, len(tokenizer))

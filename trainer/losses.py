"""Training-only losses beside the language-model loss (Learning II: make closed questions use
the image). Each is off at weight 0 and changes nothing at inference.

* ``look_loss``: where the model looks. For a question that names organs or findings with boxes
  in its image ("Is there a cyst in the left lung?"), head 0 of the last layer, at the position
  that predicts the answer, is trained to attend to those patches (the patches of all the named
  boxes together when they overlap, else of the largest named box: the region to search), as
  in attention-grounding supervision (HINT, Selvaraju et al. 2019). It trains the look-up that
  yes/no questions need directly, instead of only through the answer token.
"""
from __future__ import annotations

import torch


def look_loss(q: torch.Tensor, k: torch.Tensor, query_pos: torch.Tensor, image_slots: torch.Tensor,
              image_of: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
              reduction: str = "mean") -> torch.Tensor:
    """Mean (``reduction='sum'``: sum) over the N supervised questions (``weight`` [N]: 1, or 0 for the padding slots of a
    fixed step shape) of the cross-entropy between ``target`` [N, P] (a
    distribution over the patches of the question's image) and head 0's attention at
    ``query_pos`` [N] (flat positions) over that image's P keys. ``q`` [B, T, D] and ``k``
    [B, T, D] are head 0's rotated queries and keys (model.language_model.Attention.kept_qk);
    ``image_of`` [N] the batch image each question looks at; ``image_slots`` the flat positions
    of all image tokens, P per image."""
    d = q.shape[-1]
    qa = q.reshape(-1, d).index_select(0, query_pos).float()
    n_patch = target.shape[1]
    slots = image_slots.view(-1, n_patch).index_select(0, image_of)
    keys = k.reshape(-1, d).index_select(0, slots.reshape(-1)).view(len(query_pos), n_patch, d).float()
    logits = (keys @ qa.unsqueeze(-1)).squeeze(-1) / d ** 0.5
    per_question = -(target * torch.log_softmax(logits, dim=-1)).sum(-1)
    if weight is not None:
        per_question = per_question * weight
    if reduction == "sum":
        return per_question.sum()
    return per_question.sum() / (weight.sum().clamp(min=1.0) if weight is not None else len(per_question))

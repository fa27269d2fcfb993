"""Contrastive loss: weighted, symmetric InfoNCE with in-batch and mined hard negatives.

InfoNCE (van den Oord et al. 2018; CLIP's symmetric form, Radford et al. 2021): each query
must pick its positive out of every positive in the batch, and each positive its query.
- Per-pair weights come from harvesting (clipped inverse propensity, save boost), so a
  click deep in the grid counts for more than one at the top; the loss is their weighted mean.
- In-batch "negatives" that share the positive's group (same product) are masked: they are
  not negatives, and pushing them away would teach the model to split a product's photos.
- Hard negatives (items that look close to the query but were not engaged, mined by the
  trainer) are appended as extra columns for the query -> positive direction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def weighted_info_nce(queries: torch.Tensor, positives: torch.Tensor, weights: torch.Tensor,
                      groups: torch.Tensor | None = None,
                      hard_negatives: torch.Tensor | None = None,
                      temperature: float = 0.07) -> torch.Tensor:
    """queries, positives: (B, D) unit vectors, row i a pair; weights (B,) >= 0;
    groups (B,) int ids (same id = same product: masked as negatives); hard_negatives
    (B, D) or (M, D) unit vectors that are negatives for every query."""
    b = queries.shape[0]
    if positives.shape != queries.shape or weights.shape != (b,):
        raise ValueError(f"shape mismatch: queries {tuple(queries.shape)}, positives "
                         f"{tuple(positives.shape)}, weights {tuple(weights.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if bool((weights < 0).any()) or float(weights.sum()) <= 0:
        raise ValueError("weights must be >= 0 with a positive sum")
    logits = queries @ positives.T / temperature  # (B, B): row i's positive is column i
    if groups is not None:
        same = groups[:, None] == groups[None, :]
        same.fill_diagonal_(False)
        logits = logits.masked_fill(same, float("-inf"))
    target = torch.arange(b, device=queries.device)
    q_logits = logits
    if hard_negatives is not None and hard_negatives.numel():
        q_logits = torch.cat([logits, queries @ hard_negatives.T / temperature], dim=1)
    loss_q = F.cross_entropy(q_logits, target, reduction="none")
    loss_p = F.cross_entropy(logits.T, target, reduction="none")
    per_pair = (loss_q + loss_p) / 2
    return (per_pair * weights).sum() / weights.sum()

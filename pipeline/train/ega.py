"""The Explicit Gradient Amplifier (EGA) loss: info-NCE forward, hard-negative-amplified backward.

Form (see docs/training.md for the reasons). For query i, candidates j (every in-batch positive and every mined
negative in the batch, gathered across DDP ranks), cosine similarities s_ij, the query's own positive p = p(i):

    z_ij   = s_ij / tau                                     logits; the forward loss is info-NCE on them
    P_ij   = softmax_j(z_ij)                                info-NCE probabilities
    h_ij   = exp(min(s_ij - s_ip, 0) / beta), h_ip = 0      relative-similarity hardness (detached): 1 at or above
                                                            the positive, 1/e at beta below it, -> 0 far below
    P̄_ij  = P_ij * (1 + alpha * h_ij)          (j != p)    amplified probabilities of the negatives
    P̄_ip  = P_ip - alpha * sum_j h_ij P_ij                 the added mass is taken from the positive (sum = 1)
    dL/ds_ij = (P̄_ij - I_ij) / tau                          per query; divided by B for `reduction="mean"`

A negative's gradient is its info-NCE gradient times `1 + alpha * h`: a function of its probability and its
hardness only, so of two negatives with the same probability the harder one gets the larger gradient. The extra
gradient is `alpha * sum_j h_ij P_ij * d(s_ij - s_ip) / tau`: it widens the margin between the positive and each
hard negative, and adding a constant to all of a query's similarities changes nothing (without the positive's share,
every step would also push all similarities down, and a learned projection drifts and collapses doing so).

The backward pass needs no custom autograd function: the loss is `CE(z) + c - c.detach()` with
`c = sum((P̄ - P).detach() * z)`, whose value is exactly CE(z) and whose gradient is `(P - I) + (P̄ - P) = P̄ - I`;
it is plain autograd, so DDP, AMP and checkpointing see nothing unusual. `alpha = 0` returns
`F.cross_entropy(S / tau, target)` itself: value and gradient are info-NCE bit for bit.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def hardness(scores: torch.Tensor, target: torch.Tensor, beta: float) -> torch.Tensor:
    """Relative-similarity hardness of every candidate against the query's positive, in [0, 1]; 0 on the target.

    It is a function of the gap `s_neg - s_pos` only (how close a negative comes to the positive, not how high its
    score is), so it is defined whatever the sign of `s_pos` and on the same scale the softmax sees.
    """
    s_pos = scores.gather(1, target[:, None])
    h = torch.exp(torch.clamp(scores - s_pos, max=0.0) / beta)
    return h.scatter(1, target[:, None], 0.0)


def ega_from_scores(scores: torch.Tensor, target: torch.Tensor, valid: Optional[torch.Tensor] = None,
                    tau: float = 0.02, alpha: float = 1.0, beta: float = 0.1,
                    reduction: str = "mean") -> torch.Tensor:
    """EGA on a similarity matrix `scores` (B, C); `target` (B,) is each query's positive column; `valid` (B, C)
    excludes padding and known false negatives (the target must be valid). Forward value = info-NCE."""
    logits = scores / tau
    if valid is not None:
        logits = logits.masked_fill(~valid, float("-inf"))
    ce = F.cross_entropy(logits, target, reduction=reduction)
    if alpha == 0:
        return ce
    with torch.no_grad():
        delta = alpha * hardness(scores, target, beta) * torch.softmax(logits, dim=1)  # P̄ - P on negatives
        delta.scatter_(1, target[:, None], -delta.sum(1, keepdim=True))                # ... taken from the positive
        if reduction == "mean":
            delta /= scores.shape[0]
        elif reduction != "sum":
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    finite = logits if valid is None else logits.masked_fill(~valid, 0.0)
    correction = (delta * finite).sum()
    return ce + (correction - correction.detach())


def gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenate `t` from every DDP rank along dim 0; the local slice keeps its autograd graph (remote slices
    are constants here: their owner back-propagates its own queries' part). Identity without a process group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    world, rank = dist.get_world_size(), dist.get_rank()
    shape = torch.tensor(list(t.shape), dtype=torch.long)
    shapes = [torch.empty_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape)
    if any(not torch.equal(s, shape) for s in shapes):
        raise ValueError(f"EGALoss(gather=True) needs the same batch shape on every rank, got "
                         f"{[s.tolist() for s in shapes]}: use drop_last / an even split of the shards")
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous())
    parts[rank] = t
    return torch.cat(parts)


class EGALoss(nn.Module):
    """EGA over in-batch positives and mined negatives (shared by the whole batch, optionally across DDP ranks).

    tau: temperature (0.02, the usual value in this family). alpha: amplification; a negative at or above its
    positive gets `1 + alpha` times its info-NCE gradient, and the positive an equal extra pull (0 = info-NCE).
    beta: hardness scale in cosine units (a negative `beta` below its positive has hardness 1/e).
    gather: all-gather candidates across DDP ranks.
    """

    def __init__(self, tau: float = 0.02, alpha: float = 1.0, beta: float = 0.1, gather: bool = False,
                 reduction: str = "mean"):
        super().__init__()
        if tau <= 0 or beta <= 0 or alpha < 0:
            raise ValueError(f"need tau > 0, beta > 0, alpha >= 0; got tau={tau}, beta={beta}, alpha={alpha}")
        self.tau, self.alpha, self.beta, self.gather, self.reduction = tau, alpha, beta, gather, reduction

    def forward(self, q: torch.Tensor, pos: torch.Tensor, neg: Optional[torch.Tensor] = None,
                neg_mask: Optional[torch.Tensor] = None, pos_keys: Optional[torch.Tensor] = None,
                neg_keys: Optional[torch.Tensor] = None, group_keys: Optional[torch.Tensor] = None,
                extra_pos: Optional[torch.Tensor] = None, extra_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """q, pos: (B, d) L2-normalised embeddings; neg: (B, k, d) mined negatives; neg_mask: (B, k), False on
        padding. Optional int64 content keys (`content_key`) mask false negatives: a candidate whose key equals
        the query's positive key, and (group_keys, -1 = none) another query's positive of the same group.
        extra_pos: (B, m, d) the query's extra positives (`pos_extra_*`, filters.relabel), extra_mask (B, m) False on
        padding: each is a positive against the same candidates, the loss averaged over all positives."""
        distributed = self.gather and dist.is_available() and dist.is_initialized()
        gather = gather_with_grad if distributed else (lambda t: t)
        b = q.shape[0]
        target = torch.arange(b, device=q.device) + b * (dist.get_rank() if distributed else 0)
        cands = [gather(pos)]
        n_pos = cands[0].shape[0]
        valid = [torch.ones(b, n_pos, dtype=torch.bool, device=q.device)]
        keys = [gather(pos_keys)] if pos_keys is not None else None
        if neg is not None and neg.shape[1] > 0:
            k = neg.shape[1]
            cands.append(gather(neg.reshape(b * k, -1)))
            mask = neg_mask if neg_mask is not None else torch.ones(b, k, dtype=torch.bool, device=q.device)
            valid.append(gather(mask.reshape(-1).to(torch.uint8)).bool().expand(b, -1))
            if keys is not None:
                if neg_keys is None:
                    raise ValueError("pos_keys given without neg_keys")
                keys.append(gather(neg_keys.reshape(-1)))
        scores = q @ torch.cat(cands).T
        valid = torch.cat(valid, dim=1)
        not_target = torch.ones_like(valid).scatter(1, target[:, None], False)
        if keys is not None:
            dup = (torch.cat(keys)[None, :] == pos_keys[:, None]) & (pos_keys[:, None] >= 0)
            valid &= ~(dup & not_target)
        if group_keys is not None:
            same = (gather(group_keys)[None, :] == group_keys[:, None]) & (group_keys[:, None] >= 0)
            valid[:, :n_pos] &= ~(same & not_target[:, :n_pos])
        if extra_pos is None or extra_pos.shape[1] == 0:
            return ega_from_scores(scores, target, valid, self.tau, self.alpha, self.beta, self.reduction)
        emask = extra_mask if extra_mask is not None else torch.ones(extra_pos.shape[:2], dtype=torch.bool,
                                                                    device=q.device)
        extra_scores = torch.einsum("bd,bmd->bm", q, extra_pos)
        total = ega_from_scores(scores, target, valid, self.tau, self.alpha, self.beta, "sum")
        for j in range(extra_pos.shape[1]):  # extra positive j in the positive's column, same candidates
            rows = emask[:, j]
            if rows.any():
                swapped = scores.scatter(1, target[:, None], extra_scores[:, j:j + 1])
                total = total + ega_from_scores(swapped[rows], target[rows], valid[rows], self.tau, self.alpha,
                                                self.beta, "sum")
        return total / (b + emask.sum()) if self.reduction == "mean" else total


def content_key(item_id: str) -> int:
    """An int64 key from a 32-hex content hash (its first 60 bits), for the tensor-side false-negative masks."""
    return int(item_id[:15], 16) if item_id else -1

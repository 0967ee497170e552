"""Greedy non-maximum suppression in pure torch, batched over groups (images, pyramid levels), on any device.

The result is exactly classic greedy NMS (torchvision's ``batched_nms`` for ``mode="union"``, the MTCNN/facenet
numpy ``"Min"`` NMS for ``mode="min"``), computed without a Python loop over boxes:

1. boxes are sorted by (group, score descending); only pairs inside one group are formed (vectorised
   ``repeat_interleave``), so groups never interact and no coordinate-offset trick (with its float32 rounding on
   large offsets) is needed;
2. the pairs whose overlap exceeds the threshold form a sparse "i suppresses j" relation (i ranked before j);
3. the keep mask is the fixed point of ``keep[j] = not any(keep[i] for (i, j) in pairs)``, found by iterating from
   "keep everything". After t rounds the first t boxes of every group are final, and the fixed point is unique (it is
   the recursive definition of greedy NMS), so stopping when a round changes nothing gives the greedy result. In
   practice suppression chains are short: a handful of rounds, each a couple of vectorised ops (Cluster-NMS idea,
   Zheng et al. 2020).
"""

from __future__ import annotations

import torch

# Upper bound on candidate pairs materialised at once (each pair costs ~40 bytes of temporaries).
_PAIR_CHUNK = 1 << 23


def _overlap(a: torch.Tensor, b: torch.Tensor, mode: str) -> torch.Tensor:
    """Overlap of box pairs ``a[k]``/``b[k]`` ((P, 4) float, x1 y1 x2 y2) with the reference implementations' rounding.

    ``union``: torchvision IoU, areas (x2 - x1) * (y2 - y1). ``min``: MTCNN "Min", +1 pixel convention,
    intersection / min(area_a, area_b).
    """
    one = 1.0 if mode == "min" else 0.0
    w = (torch.minimum(a[:, 2], b[:, 2]) - torch.maximum(a[:, 0], b[:, 0]) + one).clamp_(min=0)
    h = (torch.minimum(a[:, 3], b[:, 3]) - torch.maximum(a[:, 1], b[:, 1]) + one).clamp_(min=0)
    inter = w * h
    area_a = (a[:, 2] - a[:, 0] + one) * (a[:, 3] - a[:, 1] + one)
    area_b = (b[:, 2] - b[:, 0] + one) * (b[:, 3] - b[:, 1] + one)
    if mode == "min":
        return inter / torch.minimum(area_a, area_b)
    return inter / (area_a + area_b - inter)


def batched_nms(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    groups: torch.Tensor,
    threshold: float,
    *,
    mode: str = "union",
) -> torch.Tensor:
    """Greedy NMS applied independently within each group.

    Args:
        boxes: (N, 4) float x1 y1 x2 y2.
        scores: (N,) float.
        groups: (N,) integer group id (image, or image×pyramid level); boxes of different groups never suppress
            each other.
        threshold: a box is suppressed when its overlap with a kept, higher-scoring box of its group is
            ``> threshold``.
        mode: ``"union"`` (IoU, torchvision conventions) or ``"min"`` (MTCNN "Min", +1 pixel areas).

    Returns:
        (K,) int64 indices of the kept boxes, on the boxes' device, sorted by descending score (ties: lower index
        first), like torchvision's ``batched_nms``.
    """
    if mode not in ("union", "min"):
        raise ValueError(f"mode must be 'union' or 'min', not {mode!r}")
    device = boxes.device
    n = boxes.shape[0]
    if n == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    # Rank by score (stable, so ties keep index order), then stable-sort by group: score order inside groups.
    by_score = torch.sort(scores, descending=True, stable=True).indices
    order = by_score[torch.sort(groups[by_score], stable=True).indices]
    sboxes = boxes[order]
    sgroups = groups[order]

    # For sorted box p, the later boxes of its group are p+1 .. end(p)-1.
    pos = torch.arange(n, device=device)
    new_group = torch.ones(n, dtype=torch.bool, device=device)
    new_group[1:] = sgroups[1:] != sgroups[:-1]
    # end(p) = first position of the next group = reversed running minimum of the next positions' group starts.
    next_start = torch.where(new_group, pos, n)
    next_start = torch.cat([next_start[1:], next_start.new_full((1,), n)])
    group_end = torch.flip(torch.cummin(torch.flip(next_start, [0]), 0).values, [0])
    n_later = group_end - pos - 1  # (N,) pairs formed by each box as the higher-ranked one
    cum = torch.cumsum(n_later, 0)
    total = int(cum[-1])  # host sync: sizes the pair tensors

    # Chunk the boxes so that each chunk forms at most ~_PAIR_CHUNK pairs (one more sync only when that matters).
    chunks = [(0, n, 0, total)]
    if total > _PAIR_CHUNK:
        marks = torch.arange(_PAIR_CHUNK, total, _PAIR_CHUNK, device=device)
        cuts = sorted(set((torch.searchsorted(cum, marks) + 1).clamp(max=n).tolist()) - {n})
        first_pair = [0, *cum[torch.tensor(cuts, device=device) - 1].tolist()] if cuts else [0]
        edges = [0, *cuts, n]
        pair_edges = [*first_pair, total]
        chunks = [(edges[c], edges[c + 1], pair_edges[c], pair_edges[c + 1]) for c in range(len(edges) - 1)]
    # One chunk (the usual case): every candidate pair is kept with its "overlaps" flag, no boolean compaction
    # (a host sync); the fixed-point rounds count only flagged pairs. Several chunks: only the overlapping pairs
    # are kept, which bounds the memory.
    sup_i: list[torch.Tensor] = []
    sup_j: list[torch.Tensor] = []
    sup_w: list[torch.Tensor] = []
    for lo, hi, p0, p1 in chunks:
        if p1 == p0:
            continue
        counts = n_later[lo:hi]
        first = cum[lo:hi] - counts - p0  # index of each box's first pair inside this chunk
        i = torch.repeat_interleave(pos[lo:hi], counts, output_size=p1 - p0)
        j = i + 1 + torch.arange(p1 - p0, device=device) - first.repeat_interleave(counts, output_size=p1 - p0)
        hit = _overlap(sboxes[i], sboxes[j], mode) > threshold
        if len(chunks) > 1:
            i, j, hit = i[hit], j[hit], hit[hit]
        sup_i.append(i)
        sup_j.append(j)
        sup_w.append(hit.to(torch.int32))

    keep = torch.ones(n, dtype=torch.bool, device=device)
    if sup_i:
        pi, pj, pw = (torch.cat(v) if len(v) > 1 else v[0] for v in (sup_i, sup_j, sup_w))
        # Fixed-point iteration (see module docstring). Convergence is checked after 4, 8, 16, ... rounds: a
        # check is a host sync, a round a few cheap ops, and most batches converge within 4-8 rounds.
        counts = torch.zeros(n, dtype=torch.int32, device=device)
        rounds = 4
        while True:
            prev = keep
            for _ in range(rounds):
                counts.zero_()
                counts.index_add_(0, pj, keep[pi].to(torch.int32) * pw)
                keep = counts == 0
            if bool(torch.equal(prev, keep)):
                break
            rounds *= 2
    kept = order[keep]
    # Global descending-score order, ties by original index (the sort of `order` by score is stable).
    rank = torch.empty(n, dtype=torch.int64, device=device)
    rank[by_score] = pos
    return kept[torch.argsort(rank[kept])]

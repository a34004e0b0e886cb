"""Loop oracle of pooled top-p selection over every causal block (threshold_scope "total"), written
from the definition, and an input built so that reading the diagonal segment in the wrong layout
changes the plan. Shared by the reference and the GPU-path tests.

Definition: query block i reads key blocks of earlier segments in permuted order (slot s holds
original key perm[s]) and the blocks of its own segment in original order. Each causal key block j
is scored by the mean query of block i against the mean of the keys that block i reads at block j;
softmax over the causal blocks; forced blocks (the diagonal segment up to i, the sink, ``local``
blocks before the segment) rank first and count towards tau; the others are kept in descending
probability while the mass before them is below tau.

``antidiagonal_masses`` is the loop oracle of score "antidiagonal" (``PBSConfig``), written from its
definition: stripe r of query block i holds queries i*B + r*s .. + s-1, key stripe c the slots c*s .. + s-1
of the layout block i reads; their logit is the mean of the s antidiagonal logits.
"""

from __future__ import annotations

import itertools
import math

import torch


def planted_total_case(seed: int = 0, h_q: int = 2, h_kv: int = 1, d: int = 16):
    """q (1, H_q, 96, D), k (1, H_kv, 96, D), perm int32 (1, H_kv, 96) for 16-token blocks in
    32-token segments. In segments 1 and 2 the permutation swaps the two blocks (and shuffles
    inside them), and the keys of each segment's second block point along the queries of its first
    block: scored in permuted order, the first block of a segment would see those (future) keys in
    its own diagonal block and keep far fewer candidates."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, h_q, 96, d, generator=gen)
    k = torch.randn(1, h_kv, 96, d, generator=gen)
    direction = torch.randn(d, generator=gen)
    direction = direction / direction.norm() * 3.0
    for first in (32, 64):
        q[:, :, first : first + 16] += direction
        k[:, :, first + 16 : first + 32] += direction
    perm = torch.arange(96).repeat(1, h_kv, 1)
    for first in (32, 64):
        for h in range(h_kv):
            swapped = torch.cat([torch.arange(first + 16, first + 32), torch.arange(first, first + 16)])
            perm[0, h, first : first + 32] = swapped[torch.randperm(32, generator=gen)]
    # token 0 stays in slot block 0 of segment 0, which the permutation leaves alone
    return q, k, perm.to(torch.int32)


def pooled_total_plan(q: torch.Tensor, k: torch.Tensor, perm: torch.Tensor, block_size: int, segment_size: int,
                      threshold: float, sink: bool = True, local: int = 0, diagonal_layout: str = "original"
                      ) -> torch.Tensor:
    """Bool (B, H_q, N_b, N_b): the kept blocks, by loops in fp64. ``diagonal_layout="permuted"``
    scores the diagonal segment through the permutation instead (the layout attention does not read;
    used to show that a test can tell the two apart)."""
    b, h_q, n, d = q.shape
    g_kv, g_perm = h_q // k.shape[1], h_q // perm.shape[1]
    n_b, per_seg = -(-n // block_size), segment_size // block_size
    keep = torch.zeros(b, h_q, n_b, n_b, dtype=torch.bool)
    for bi in range(b):
        for h in range(h_q):
            keys, slots = k[bi, h // g_kv].double(), perm[bi, h // g_perm].long()
            sink_block = int((slots == 0).nonzero()[0, 0]) // block_size
            for i in range(n_b):
                start = i // per_seg * per_seg
                q_bar = q[bi, h, i * block_size : min(n, (i + 1) * block_size)].double().mean(0)
                scores = []
                for j in range(i + 1):
                    cols = range(j * block_size, min(n, (j + 1) * block_size))
                    read_permuted = j < start or diagonal_layout == "permuted"
                    k_bar = keys[[int(slots[c]) if read_permuted else c for c in cols]].mean(0)
                    scores.append(float(q_bar @ k_bar) / math.sqrt(d))
                probs = torch.tensor(scores, dtype=torch.float64).softmax(0).tolist()
                forced = {j for j in range(i + 1) if j >= start or (start - local <= j < start)
                          or (sink and j == sink_block)}
                order = sorted(forced) + sorted(set(range(i + 1)) - forced, key=lambda j: -probs[j])
                acc = 0.0
                for j in order:
                    if j in forced or acc < threshold - 1e-6:
                        keep[bi, h, i, j] = True
                    acc += probs[j]
    return keep


def antidiagonal_masses(q, k, perm, cfg):
    """Loop oracle of score="antidiagonal", from its definition: (B, H_q, N_b, m, N_b) in fp64."""
    b, h_q, n, d = q.shape
    bs, m, per_seg = cfg.block_size, cfg.sample_rows, cfg.segment_size // cfg.block_size
    s, n_b = bs // m, -(-n // bs)
    g_kv, g_perm = h_q // k.shape[1], h_q // perm.shape[1]
    out = torch.zeros(b, h_q, n_b, m, n_b, dtype=torch.float64)
    for bi, h, i, r in itertools.product(range(b), range(h_q), range(n_b), range(m)):
        diag = i // per_seg * per_seg
        first = min(n - 1, i * bs + r * s)

        def key(slot):  # the key that query block i reads at this slot (zero past N)
            if slot >= n:
                return torch.zeros(d, dtype=torch.float64)
            source = slot if slot // bs >= diag else int(perm[bi, h // g_perm, slot])
            return k[bi, h // g_kv, source].double()

        stripes = [c for c in range(n_b * m) if c * s <= first]
        logits = torch.tensor([sum(float(q[bi, h, min(n - 1, i * bs + r * s + s - 1 - t)].double() @ key(c * s + t))
                                   for t in range(s)) / (s * math.sqrt(d)) for c in stripes], dtype=torch.float64)
        for c, p in zip(stripes, logits.softmax(0).tolist()):
            out[bi, h, i, r, c // m] += p
    return out

"""The token-level oracle of block-sparse attention, written from the definition and shared by the
reference, kernel and band-plan tests.

``token_mask`` turns a plan into the original keys each query sees (query block i reads the key blocks
of earlier segments in permuted order, slot s holding original key perm[s], and the blocks of its own
segment in original order; causal inside them). ``masked_attention`` is dense attention under such a
mask with every op in one dtype: fp64 (the default) is the oracle, q's dtype gives the error plain
PyTorch makes at that precision (the tolerance rule of test_triton_attention.py).
"""

from __future__ import annotations

import itertools
import math

import torch


def token_mask(plan) -> torch.Tensor:
    """Bool (B, H_q, N, N) over ORIGINAL key positions, from ``plan.to_dense()`` and ``plan.perm`` with
    plain loops (on the CPU, whatever the plan's device)."""
    dense = plan.to_dense().cpu()
    perm = plan.perm.cpu().long()
    b, h_q, n_qb, _ = dense.shape
    n, bs = plan.seq_len, plan.block_size
    per_seg = plan.segment_size // bs
    g = h_q // perm.shape[1]
    mask = torch.zeros(b, h_q, n, n, dtype=torch.bool)
    for bi, h, i in itertools.product(range(b), range(h_q), range(n_qb)):
        for j in torch.nonzero(dense[bi, h, i]).flatten().tolist():
            slots = torch.arange(j * bs, min(n, (j + 1) * bs))
            keys = slots if j >= (i // per_seg) * per_seg else perm[bi, h // g, slots]
            mask[bi, h, i * bs : (i + 1) * bs, keys] = True
    return mask & torch.ones(n, n, dtype=torch.bool).tril()


def masked_attention(q, k, v, mask, dtype=torch.float64, softcap=None, scale=None, sinks=None) -> torch.Tensor:
    """Dense attention on the CPU under a token ``mask`` (broadcast to (B, H_q, N, N)), every op in ``dtype``.

    q (B, H_q, N, D); k, v (B, H_kv, N, D), repeated to the query heads. scale: default 1/sqrt(D).
    softcap: scores become ``softcap * tanh(scores / softcap)`` before masking. sinks (H_q,): one more
    logit per head in each softmax, whose weight is dropped. Returns (B, H_q, N, D) in ``dtype``.
    """
    g = q.shape[1] // k.shape[1]
    q, k, v = (x.cpu().to(dtype) for x in (q, k, v))
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (q @ k.transpose(-1, -2)) * (scale if scale is not None else 1.0 / math.sqrt(q.shape[-1]))
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.cpu().to(dtype)[None, :, None, None].expand(*s.shape[:-1], 1)], -1)
    return s.softmax(-1)[..., : k.shape[2]] @ v

"""Signals: run the models once into arrays that attacks and bounds consume (AUDIT.md §2).

* :func:`block_logprobs`: per-token log-probabilities ``[n_blocks, T−1]`` of each block under one
  adapter (or the public model), batched; the input of the sequence attacks.
* :func:`pmixed_contexts`: the public model's and every member's next-token log-probabilities at a
  fixed list of teacher-forced contexts, ``[C, V]`` and ``[C, N, V]``: the input of the exact audit.

Both are restricted data (they derive from the private members); only aggregates leave ``audit/``.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["block_logprobs", "pmixed_contexts"]


@torch.no_grad()
def block_logprobs(
    model: torch.nn.Module, adapter: str | None, blocks: torch.Tensor, *, batch_size: int = 16
) -> np.ndarray:
    """log p(x_t | x_<t) for t = 1..T−1 of every block ``[n, T]`` → float64 ``[n, T−1]``."""
    if blocks.ndim != 2 or blocks.shape[1] < 2:
        raise ValueError(f"blocks must have shape [n, T >= 2]. Found {tuple(blocks.shape)}.")
    out = []
    for i in range(0, len(blocks), batch_size):
        x = blocks[i : i + batch_size]
        names = ["__base__" if adapter is None else adapter] * len(x)
        logits = model(input_ids=x, adapter_names=names).logits[:, :-1].double()
        logp = torch.log_softmax(logits, dim=-1)
        out.append(logp.gather(-1, x[:, 1:, None])[..., 0].numpy())
    return np.concatenate(out)


@torch.no_grad()
def pmixed_contexts(
    model: torch.nn.Module, members: list[str], blocks: torch.Tensor, n_contexts: int
) -> tuple[np.ndarray, np.ndarray]:
    """(log p0 ``[C, V]``, log p_i ``[C, N, V]``) at the first ``n_contexts`` teacher-forced positions.

    Positions are taken in block order (block 0 positions 1..T−1, then block 1, ...), the stream
    the utility evaluation scores; one forward of N + 1 rows per block.
    """
    if n_contexts < 1:
        raise ValueError(f"n_contexts must be >= 1. Found {n_contexts}.")
    lp0, lps, have = [], [], 0
    for x in blocks:
        rows = x.unsqueeze(0).repeat(len(members) + 1, 1)
        logits = model(input_ids=rows, adapter_names=["__base__", *members]).logits[:, :-1]
        logp = torch.log_softmax(logits.double(), dim=-1).numpy()  # [N+1, T−1, V]
        take = min(n_contexts - have, logp.shape[1])
        lp0.append(logp[0, :take])
        lps.append(np.swapaxes(logp[1:, :take], 0, 1))
        have += take
        if have == n_contexts:
            return np.concatenate(lp0), np.concatenate(lps)
    raise ValueError(f"blocks hold {have} contexts; n_contexts={n_contexts}.")

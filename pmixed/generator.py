"""``PrivateGenerator``: prompts in, tokens out; every private token is paid for before it leaves.

A thin facade (like Opacus's ``PrivacyEngine``): the models (``EnsembleLM``), the mechanism
(``sample_subset``, ``release_log_many``) and the deployment (budget, ledger, randomness:
:class:`~pmixed.deployment.Deployment`) each do their own part. A request is validated whole
before anything is spent (prompt ids and length against the model's context, temperature, top-k,
the member set); then, per generated token, :meth:`Deployment.serve_batch
<pmixed.deployment.Deployment.serve_batch>` charges (one query per unfinished prompt, all prompts
advancing together), and only then:

1. **Subsample** members with the prompt's generator (spawned from the deployment's); ONE forward
   over every prompt's public row and sampled members (every member with ``constant_work``).
2. **Public pre-processing** only (PMIXED_MATH.md §2.1): temperature on p0 and every p_i, and a
   top-k set chosen from p0 (ties by token id), both before mollification.
3. **Mollify, mix, draw one token**; the subset and λ go to the restricted ledger file; then
   release.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pmixed._checks import logsumexp
from pmixed.deployment import Deployment, check_prompt, check_sampling
from pmixed.mechanism import release_log_many, sample_subset, sample_token
from pmixed.models import EnsembleLM, SequenceState

__all__ = ["Generation", "PrivateGenerator", "public_transform", "public_transform_many"]

#: A transformed row must sum to 1 within this (in log space) before it reaches the mollifier.
NORMALISATION_TOLERANCE = 1e-12


@dataclass(frozen=True)
class Generation:
    """What one prompt received: public information only.

    ``prompt_truncated`` counts prompt tokens dropped from the left to fit the context (only when
    truncation was asked for); ``refused`` says the budget ran out and the request was refused.
    """

    prompt_tokens: tuple[int, ...]
    tokens: tuple[int, ...]
    private_steps: int
    public_steps: int
    refused: bool
    prompt_truncated: int = 0


def public_transform(
    lp0: np.ndarray, lps: np.ndarray, *, temperature: float, top_k: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Temperature and a top-k set chosen from p0 alone, applied to p0 and every member row.

    The set is the k largest entries of p0, ties broken by token id; everything outside it is
    masked to −inf and each row is renormalised with logsumexp. Temperature and k are checked
    first (:func:`~pmixed.deployment.check_sampling`); every returned row is a distribution to
    1e-12 (FloatingPointError otherwise: never an unnormalised row into the mollifier).
    """
    owner = np.zeros(len(lps), dtype=np.int64)
    lp0, lps = public_transform_many(lp0[None], lps, owner, temperature=temperature, top_k=top_k)
    return lp0[0], lps


def public_transform_many(
    lp0: np.ndarray, lps: np.ndarray, owner: np.ndarray, *, temperature: float, top_k: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`public_transform` for several prompts at once: p0 rows ``lp0 [P, V]`` and member
    rows ``lps [R, V]``, member row r belonging to prompt ``owner[r]``; each prompt's top-k set
    comes from its own p0 row. Row for row the same result as one prompt at a time."""
    check_sampling(temperature, top_k, lp0.shape[-1])
    lp0, lps = lp0 / temperature, lps / temperature
    if top_k is not None:
        # ascending -lp0, stable: the k largest, ties by token id (NaN last, as lexsort)
        top = np.argsort(-lp0, axis=-1, kind="stable")[:, :top_k]
        keep = np.zeros(lp0.shape, bool)
        np.put_along_axis(keep, top, True, axis=-1)
        lp0 = np.where(keep, lp0, -np.inf)
        lps = np.where(keep[owner], lps, -np.inf)
    lp0 = lp0 - logsumexp(lp0, axis=-1, keepdims=True)
    norm = logsumexp(lps, axis=-1, keepdims=True)
    if lps.size and not np.isfinite(norm).all():
        raise FloatingPointError("a member has no probability mass on the public top-k set.")
    lps = lps - norm
    for rows in (lp0, lps):
        if rows.size and (np.abs(logsumexp(rows, axis=-1)) > NORMALISATION_TOLERANCE).any():
            raise FloatingPointError("a transformed row does not sum to 1 within 1e-12.")
    return lp0, lps


class PrivateGenerator:
    """Generates text under PMixED through one :class:`~pmixed.deployment.Deployment`.

    Args:
        lm: the public model and the members (as many as the deployment's calibration has).
        deployment: where every token is paid for (budget, ledger, randomness).
        constant_work: compute every member at every step (their outputs unused unless sampled),
            so the rows of a step's forward do not depend on the sampled subset: which members
            were sampled, and how many, is restricted (the mollifier's work still grows with how
            many). Default off (only sampled members are computed; a member catches up on the
            tokens it missed when next sampled).
    """

    def __init__(self, lm: EnsembleLM, deployment: Deployment, *, constant_work: bool = False):
        n = deployment.calibration.config.n_members
        if n != lm.n_members:
            raise ValueError(f"the deployment has n_members={n}; the model has {lm.n_members}.")
        self.lm, self.deployment = lm, deployment
        self.calibration = deployment.calibration
        self.constant_work = bool(constant_work)

    def _private_tokens(self, states: list[SequenceState], rngs, temperature: float, top_k):
        """One private token per state: subsets drawn per state, ONE forward over all rows."""
        cfg = self.calibration.config
        subsets = [
            sample_subset(cfg.n_members, cfg.sampling_rate, rng, sampler=cfg.reference_sampler)
            for rng in rngs
        ]
        every = list(range(cfg.n_members))
        computed = [every if self.constant_work else sorted({int(i) for i in s}) for s in subsets]
        outs = self.lm.next_logprobs_many(list(zip(states, computed)))
        # every prompt's rows transformed together (row for row as one prompt at a time)
        sampled = [
            lps.numpy()[[members.index(int(i)) for i in subset]]
            for (_, lps), subset, members in zip(outs, subsets, computed)
        ]
        owner = np.repeat(np.arange(len(outs)), [len(rows) for rows in sampled])
        lp0s, rows = public_transform_many(
            np.stack([lp0.numpy() for lp0, _ in outs]),
            np.concatenate(sampled),
            owner,
            temperature=temperature,
            top_k=top_k,
        )
        queries = [(rows[owner == j], lp0s[j]) for j in range(len(outs))]
        released = release_log_many(queries, self.calibration, rngs)
        return [
            (token, {"subset": subset, "subset_size": len(subset), "lambdas": lam})
            for (token, lam, _), subset in zip(released, subsets)
        ]

    def _public_token(self, state: SequenceState, temperature: float, top_k: int | None, rng):
        lp0, _ = self.lm.next_logprobs(state, [])
        lp0, _ = public_transform(
            lp0.numpy(), np.zeros((0, lp0.shape[0])), temperature=temperature, top_k=top_k
        )
        return sample_token(lp0, rng)

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        truncate: bool = False,
    ) -> list[Generation]:
        """Extends each tokenised prompt by up to ``max_new_tokens`` tokens, all prompts together.

        The whole request is validated first (:class:`~pmixed.deployment.InvalidRequest`, nothing
        spent): prompts must be non-empty token ids of the model's vocabulary and fit its context
        with the new tokens (``truncate=True`` drops their oldest tokens instead, and the result
        says how many). Each prompt gets its own generator (:meth:`Deployment.streams`), so its
        tokens are those it would get alone. Each step serves one query per unfinished prompt
        (:meth:`Deployment.serve_batch`: every query charged, then one forward over all their
        rows); a refused prompt stops where the budget ran out.
        """
        vocab, ctx = self.lm.vocab_size, self.lm.max_positions
        check_sampling(temperature, top_k, vocab)
        fitted = [
            check_prompt(
                p, vocab_size=vocab, max_positions=ctx, new_tokens=max_new_tokens, truncate=truncate
            )
            for p in prompts
        ]
        rngs = self.deployment.streams(len(fitted))
        states = [SequenceState(list(prompt)) for prompt, _ in fitted]
        private, public = [0] * len(states), [0] * len(states)
        refused = [False] * len(states)
        active = list(range(len(states)))
        for _ in range(max_new_tokens if active else 0):
            answers = self.deployment.serve_batch(
                [rngs[i] for i in active],
                lambda idx, gens, act=active: self._private_tokens(
                    [states[act[j]] for j in idx], gens, temperature, top_k
                ),
                lambda j, gen, act=active: self._public_token(
                    states[act[j]], temperature, top_k, gen
                ),
            )
            for i, answer in zip(active, answers):
                if answer.refused:
                    refused[i] = True
                    continue
                private[i] += answer.private
                public[i] += not answer.private
                states[i].tokens.append(int(answer.value))  # released
            active = [i for i in active if not refused[i]]
            if not active:
                break
        return [
            Generation(
                tuple(original),
                tuple(state.tokens[len(prompt) :]),
                private[i],
                public[i],
                refused[i],
                dropped,
            )
            for i, ((prompt, dropped), original, state) in enumerate(zip(fitted, prompts, states))
        ]

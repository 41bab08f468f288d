"""``PrivateGenerator``: prompts in, tokens out; every private token is paid for before it leaves.

A thin facade (like Opacus's ``PrivacyEngine``): the models (``EnsembleLM``), the mechanism
(``sample_subset``, ``release_log``), the budget (``accounting.RenyiFilter``) and the ledger each do
their own part. Per generated token:

1. **Charge** the calibrated per-query cost through the filter: the ledger record is written and
   fsync'ed first. If the budget cannot pay, answer from the public model alone (a zero-cost public
   step, also recorded) or refuse, as configured; no private member is touched then.
2. **Subsample** members with the explicit generator; forward the public row and the sampled members.
3. **Public pre-processing** only (PMIXED_MATH.md §2.1): temperature on p0 and every p_i, and a top-k
   set chosen from p0 (ties by token id), both before mollification.
4. **Mollify, mix, draw one token**; the subset and λ go to the restricted ledger file; then release.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from accounting import BudgetExhausted, Ledger, PublicStepEvent, RenyiFilter
from pmixed._checks import logsumexp
from pmixed.ledgering import query_event
from pmixed.mechanism import release_log, sample_subset, sample_token
from pmixed.models import EnsembleLM, SequenceState
from pmixed.privacy import Calibration

__all__ = ["Generation", "PrivateGenerator", "public_transform"]


@dataclass(frozen=True)
class Generation:
    """What one prompt received: public information only."""

    prompt_tokens: tuple[int, ...]
    tokens: tuple[int, ...]
    private_steps: int
    public_steps: int
    refused: bool


def public_transform(
    lp0: np.ndarray, lps: np.ndarray, *, temperature: float, top_k: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Temperature and a top-k set chosen from p0 alone, applied to p0 and every member row.

    The set is the k largest entries of p0, ties broken by token id; everything outside it is
    masked to −inf and each row is renormalised with logsumexp.
    """
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0. Found {temperature}.")
    lp0, lps = lp0 / temperature, lps / temperature
    if top_k is not None:
        if not 1 <= top_k <= lp0.shape[-1]:
            raise ValueError(f"top_k must be in [1, {lp0.shape[-1]}]. Found {top_k}.")
        order = np.lexsort((np.arange(lp0.shape[-1]), -lp0))  # by -lp0, then token id
        keep = np.zeros(lp0.shape[-1], bool)
        keep[order[:top_k]] = True
        lp0 = np.where(keep, lp0, -np.inf)
        lps = np.where(keep, lps, -np.inf)
    lp0 = lp0 - logsumexp(lp0, axis=-1, keepdims=True)
    norm = logsumexp(lps, axis=-1, keepdims=True)
    if lps.size and not np.isfinite(norm).all():
        raise FloatingPointError("a member has no probability mass on the public top-k set.")
    return lp0, lps - norm


class PrivateGenerator:
    """Generates text under PMixED, charging a ledger-backed Rényi filter before every private token.

    Args:
        lm: the public model and the members.
        calibration: the deployment's calibration (its ``n_members`` must match ``lm``).
        budget: a ``RenyiFilter`` attached to ``ledger`` (``budget.ledger is ledger``).
        on_exhausted: ``"public"`` (answer from the public model, a zero-cost step) or ``"refuse"``.
        seed: audits and tests only. None (deployment) draws the generator from OS entropy; the
            ledger header's ``seeded`` flag must say which.
    """

    def __init__(
        self,
        lm: EnsembleLM,
        calibration: Calibration,
        budget: RenyiFilter,
        *,
        on_exhausted: str = "public",
        seed: int | None = None,
    ) -> None:
        if calibration.config.n_members != lm.n_members:
            raise ValueError(
                f"calibration has n_members={calibration.config.n_members}; the model has "
                f"{lm.n_members} members."
            )
        if on_exhausted not in ("public", "refuse"):
            raise ValueError(f"on_exhausted must be 'public' or 'refuse'. Found {on_exhausted!r}.")
        ledger = budget.ledger
        if not isinstance(ledger, Ledger):
            raise ValueError("budget must be a RenyiFilter attached to a ledger.")
        if ledger.header["seeded"] is not (seed is not None):
            raise ValueError(
                f"the ledger header says seeded={ledger.header['seeded']}; seed={seed!r} disagrees."
            )
        self.lm, self.calibration, self.budget, self.ledger = lm, calibration, budget, ledger
        self.on_exhausted = on_exhausted
        self.event = query_event(calibration)
        self._rng = np.random.default_rng(seed)  # seed=None: OS entropy
        #: Test hook: called after the charge and the restricted record, just before release.
        self.before_release: Callable[[int], None] | None = None

    def _private_token(self, state: SequenceState, temperature: float, top_k: int | None):
        cfg = self.calibration.config
        subset = sample_subset(cfg.n_members, cfg.sampling_rate, self._rng,
                               sampler=cfg.reference_sampler)  # fmt: skip
        members = sorted({int(i) for i in subset})
        lp0, lps = self.lm.next_logprobs(state, members)
        lp0, lps = public_transform(lp0.numpy(), lps.numpy(), temperature=temperature, top_k=top_k)
        rows = lps[[members.index(int(i)) for i in subset]]
        token, lam, _ = release_log(rows, lp0, self.calibration, self._rng)
        return token, {"subset": subset, "subset_size": len(subset), "lambdas": lam}

    def _public_token(self, state: SequenceState, temperature: float, top_k: int | None) -> int:
        lp0, _ = self.lm.next_logprobs(state, [])
        lp0, _ = public_transform(lp0.numpy(), np.zeros((0, lp0.shape[0])),
                                  temperature=temperature, top_k=top_k)  # fmt: skip
        return sample_token(lp0, self._rng)

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
    ) -> list[Generation]:
        """Extends each tokenised prompt by up to ``max_new_tokens`` tokens.

        Every private token costs one query; a refused prompt stops where the budget ran out.
        """
        if (
            isinstance(max_new_tokens, bool)
            or not isinstance(max_new_tokens, int)
            or max_new_tokens < 0
        ):
            raise ValueError(f"max_new_tokens must be an integer >= 0. Found {max_new_tokens!r}.")
        out = []
        for prompt in prompts:
            state = SequenceState(list(prompt))
            priv = pub = 0
            refused = False
            for _ in range(max_new_tokens):
                if len(state.tokens) >= self.lm.max_positions:
                    break
                try:
                    receipt = self.budget.charge(self.event)
                except BudgetExhausted:
                    if self.on_exhausted == "refuse":
                        refused = True
                        break
                    self.budget.charge(PublicStepEvent())
                    token = self._public_token(state, temperature, top_k)
                    pub += 1
                else:
                    token, restricted = self._private_token(state, temperature, top_k)
                    self.ledger.append_restricted(receipt, restricted)
                    if self.before_release is not None:
                        self.before_release(token)
                    priv += 1
                state.tokens.append(token)  # released
            out.append(Generation(tuple(prompt), tuple(state.tokens[len(prompt) :]), priv, pub,
                                  refused))  # fmt: skip
        return out

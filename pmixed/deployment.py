"""``Deployment``: one PMixED deployment, and the one place a query is served.

A deployment owns its calibration, its budget (a Rényi filter fixed in the ledger header), its
ledger and its randomness. :meth:`Deployment.serve` is the only code path that pays for a query,
and it runs the steps in the only allowed order:

1. **validate** everything that can be checked before private data is touched (the caller's
   ``check``; :func:`check_sampling` and :func:`check_prompt` for generation), so bad input
   raises :class:`InvalidRequest` having spent nothing;
2. **charge** the calibrated, data-independent cost through the filter (the ledger record is
   fsync'ed); if the budget cannot pay, answer from the public model (a zero-cost, recorded step)
   or refuse, as configured, without touching a member;
3. **compute** the private answer (the caller's ``private(rng)``);
4. **record** its restricted data (subset, λ) in the 0600 file;
5. **release** (return) it.

:meth:`Deployment.serve_batch` does the same for several queries at once (each charged before any
is computed). :class:`~pmixed.generator.PrivateGenerator`, the teacher-forced evaluation, the audit's game and
the benchmarks all go through here; nothing else calls the filter's ``charge`` (a test greps the
source tree for it).

Randomness: a deployment created without a seed draws from OS entropy. A seed (audits and tests
only) is fixed when the deployment is created and kept in the restricted ledger header; reopening a
seeded deployment continues from a stream keyed by (seed, records so far), so no call replays an
earlier one's subsets or tokens. A seeded deployment is a single-writer audit deployment.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from accounting import (
    BudgetExhausted,
    Ledger,
    PrivacyBudget,
    PublicStepEvent,
    RenyiFilter,
    Spent,
    compose,
    restricted_path,
)
from pmixed._checks import is_int, is_real
from pmixed.ledgering import create_ledger, query_event
from pmixed.privacy import Calibration, PMixEDConfig

__all__ = [
    "TEMPERATURE_RANGE",
    "Answer",
    "Deployment",
    "InvalidRequest",
    "check_prompt",
    "check_sampling",
]

#: Temperatures outside this range are refused before any charge: below it, log p / T overflows
#: for realistic logits (T = 1e-310 turned p0 into NaN); above it the public distribution is
#: uniform to float64 precision anyway.
TEMPERATURE_RANGE = (1e-2, 1e2)


class InvalidRequest(ValueError):
    """A request that is refused before anything is charged.

    ``str()`` names the Python parameter; :meth:`for_flag` names the command-line flag.
    """

    def __init__(self, param: str, rule: str, found: object) -> None:
        self.param, self.rule, self.found = param, rule, found
        super().__init__(f"{param} {rule}. Found {found!r}.")

    def for_flag(self) -> str:
        return f"--{self.param.replace('_', '-')} {self.rule}. Found {self.found!r}."


def check_sampling(temperature: object, top_k: object, vocab_size: int) -> None:
    """Temperature in :data:`TEMPERATURE_RANGE`, top-k None or an integer in [1, V]."""
    lo, hi = TEMPERATURE_RANGE
    if not is_real(temperature) or not lo <= float(temperature) <= hi:
        raise InvalidRequest("temperature", f"must be in [{lo:g}, {hi:g}]", temperature)
    if top_k is not None and (not is_int(top_k) or not 1 <= top_k <= vocab_size):
        raise InvalidRequest("top_k", f"must be an integer in [1, {vocab_size}]", top_k)


def check_prompt(
    tokens: Sequence[int],
    *,
    vocab_size: int,
    max_positions: int,
    new_tokens: int,
    truncate: bool = False,
) -> tuple[list[int], int]:
    """(the prompt to use, tokens dropped from its left) for ``new_tokens`` more tokens.

    Generating n tokens reads contexts of up to len(prompt) + n − 1 tokens; that must fit the
    model's ``max_positions``. An over-long prompt is an error, or, with ``truncate``, loses its
    oldest tokens (the caller reports how many).
    """
    if not is_int(new_tokens) or not 0 <= new_tokens <= max_positions:
        raise InvalidRequest(
            "max_new_tokens", f"must be an integer in [0, {max_positions}]", new_tokens
        )
    toks = list(tokens)
    if not toks:
        raise InvalidRequest("prompt", "must hold at least one token", "")
    if any(not is_int(t) or not 0 <= t < vocab_size for t in toks):
        bad = next(t for t in toks if not is_int(t) or not 0 <= t < vocab_size)
        raise InvalidRequest("prompt", f"token ids must be integers in [0, {vocab_size})", bad)
    room = max_positions - max(new_tokens - 1, 0)
    if len(toks) <= room:
        return toks, 0
    if not truncate:
        raise InvalidRequest(
            "prompt",
            f"must fit the context: at most {room} tokens for {new_tokens} new ones "
            f"(the model holds {max_positions}; or ask for truncation)",
            f"{len(toks)} tokens",
        )
    return toks[len(toks) - room :], len(toks) - room


def _check_on_exhausted(on_exhausted: object) -> None:
    if on_exhausted not in ("public", "refuse"):
        raise InvalidRequest("on_exhausted", "must be 'public' or 'refuse'", on_exhausted)


@dataclass(frozen=True)
class Answer:
    """What :meth:`Deployment.serve` released: public information only."""

    value: Any
    private: bool
    refused: bool


def _config_from_header(cal: Mapping) -> PMixEDConfig:
    fields = {f.name for f in dataclasses.fields(PMixEDConfig)}
    kw = {k: v for k, v in cal.items() if k in fields}
    kw["orders"] = tuple(kw["orders"])
    return PMixEDConfig(**kw)


def _seed_of(path: Path) -> int | None:
    """The audit seed from the restricted header (line 1 of the 0600 file)."""
    first = restricted_path(path).read_bytes().split(b"\n", 1)[0]
    return json.loads(first).get("seed")


class Deployment:
    """A deployment's calibration, Rényi filter, ledger and generator (use :meth:`create` or
    :meth:`open`).

    Args:
        calibration: the calibration the ledger header was written from.
        ledger: the open ledger (its header fixes the budget).
        rng: the deployment's generator.
        on_exhausted: ``"public"`` (the public model answers, a zero-cost recorded step) or
            ``"refuse"``.
    """

    def __init__(
        self,
        calibration: Calibration,
        ledger: Ledger,
        rng: np.random.Generator,
        *,
        on_exhausted: str = "public",
    ) -> None:
        _check_on_exhausted(on_exhausted)
        budget_rec = ledger.header["budget"]
        if budget_rec is None:
            raise ValueError(f"{ledger.path} has no budget in its header; it cannot be served.")
        budget = PrivacyBudget(budget_rec["epsilon"], budget_rec["delta"], calibration.orders)
        self.filter = RenyiFilter(budget, budget_rec["monitored_orders"], ledger=ledger)
        self.calibration, self.ledger, self.on_exhausted = calibration, ledger, on_exhausted
        self.event = query_event(calibration)
        self._rng = rng
        #: Test hook: called with the value after the charge and the restricted record, just
        #: before it is released.
        self.before_release: Callable[[Any], None] | None = None

    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        calibration: Calibration,
        *,
        seed: int | None = None,
        on_exhausted: str = "public",
        signing_key=None,
        fsync: bool = True,
    ) -> Deployment:
        """A new deployment ledger at ``path`` with the budget (ε, δ) of ``calibration``, the
        single monitored order best for its query budget, and optionally an Ed25519 signing key.

        ``seed`` (audits and tests only) fixes the randomness for good; None draws OS entropy.
        """
        if seed is not None and (not is_int(seed) or seed < 0):
            raise InvalidRequest("seed", "must be an integer >= 0", seed)
        _check_on_exhausted(on_exhausted)  # before any file is created
        cfg = calibration.config
        budget = PrivacyBudget(cfg.epsilon, cfg.delta, calibration.orders)
        budget_filter = RenyiFilter.for_plan(budget, query_event(calibration), cfg.query_budget)
        seed = None if seed is None else int(seed)
        ledger = create_ledger(
            path,
            calibration,
            budget=budget_filter.header_record(),
            seed=seed,
            fsync=fsync,
            signing_key=signing_key,
        )
        rng = np.random.default_rng(None if seed is None else int(seed))
        return cls(calibration, ledger, rng, on_exhausted=on_exhausted)

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        *,
        calibration: Calibration | None = None,
        on_exhausted: str = "public",
        signing_key=None,
        fsync: bool = True,
    ) -> Deployment:
        """An existing deployment: its calibration is rebuilt from the ledger header (and must
        equal ``calibration`` when one is given); a signed ledger needs its ``signing_key``."""
        _check_on_exhausted(on_exhausted)
        ledger = Ledger(path, fsync=fsync, signing_key=signing_key)
        try:
            header = ledger.header["calibration"]
            rebuilt = _config_from_header(header).calibrate()
            if calibration is not None and calibration.config != rebuilt.config:
                raise ValueError(
                    f"{path} was created for another configuration: "
                    f"{rebuilt.config} != {calibration.config}."
                )
            cal = calibration or rebuilt
            if list(cal.per_query_rdp_values) != list(header["per_query_rdp"]):
                raise ValueError(
                    f"{path}: the calibration recomputed here differs from the "
                    "one in its header (another library version?)."
                )
            seed = _seed_of(Path(path)) if ledger.header["seeded"] else None
            state = None if seed is None else [int(seed), ledger.contents().next_seq]
            return cls(cal, ledger, np.random.default_rng(state), on_exhausted=on_exhausted)
        except BaseException:
            ledger.close()
            raise

    # ---------------------------------------------------------------------------------- state

    @property
    def seeded(self) -> bool:
        return bool(self.ledger.header["seeded"])

    @property
    def signed(self) -> bool:
        return self.ledger.header.get("signing") is not None

    def spent(self) -> Spent:
        """The ledger composed with dp-accounting at the budget's δ (``overrun`` says if over)."""
        return compose(self.ledger, self.filter.budget.delta)

    def can_pay(self) -> bool:
        return self.filter.can_pay(self.event)

    def close(self) -> None:
        self.ledger.close()

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------------------------- serve

    def streams(self, n: int) -> list[np.random.Generator]:
        """``n`` independent generators spawned from the deployment's, in order: one per request,
        so a request's subsets and tokens do not depend on what is served beside it."""
        return self._rng.spawn(n)

    def serve(
        self,
        private: Callable[[np.random.Generator], tuple[Any, Mapping]],
        public: Callable[[np.random.Generator], Any] | None = None,
        *,
        check: Callable[[], None] | None = None,
    ) -> Answer:
        """Serves one query: check -> charge -> compute -> restricted record -> release.

        Args:
            private: ``private(rng) -> (value, restricted)``, run only after the charge is
                durable; ``restricted`` (subset, λ, ...) goes to the 0600 file.
            public: ``public(rng) -> value``, the public model's answer when the budget cannot pay
                (None: refuse then, whatever ``on_exhausted`` says).
            check: raises (:class:`InvalidRequest`) to refuse the query before anything is spent.
        """
        return self.serve_batch(
            [self._rng],
            lambda _, rngs: [private(rngs[0])],
            None if public is None else (lambda _, rng: public(rng)),
            check=check,
        )[0]

    def serve_batch(
        self,
        rngs: Sequence[np.random.Generator],
        private: Callable[[list[int], list[np.random.Generator]], Sequence[tuple[Any, Mapping]]],
        public: Callable[[int, np.random.Generator], Any] | None = None,
        *,
        check: Callable[[], None] | None = None,
    ) -> list[Answer]:
        """Serves ``len(rngs)`` queries at once, each with its own generator: check, then charge
        every query in order, then compute the paid ones together, then record each, then release.

        Args:
            private: ``private(indices, rngs) -> [(value, restricted), ...]`` for the queries whose
                charge went through (their indices into ``rngs``), run after every charge is
                durable.
            public: ``public(index, rng) -> value`` for a query the budget cannot pay (None:
                refuse it, whatever ``on_exhausted`` says).
            check: as in :meth:`serve`; nothing is charged when it raises.
        """
        if check is not None:
            check()
        answers: list[Answer | None] = [None] * len(rngs)
        paid = []
        for i, rng in enumerate(rngs):
            try:
                paid.append((i, self.filter.charge(self.event)))
            except BudgetExhausted:
                if self.on_exhausted == "refuse" or public is None:
                    answers[i] = Answer(None, False, True)
                    continue
                self.filter.charge(PublicStepEvent())
                answers[i] = Answer(public(i, rng), False, False)
        if paid:
            results = private([i for i, _ in paid], [rngs[i] for i, _ in paid])
            for (i, receipt), (value, restricted) in zip(paid, results, strict=True):
                self.ledger.append_restricted(receipt, restricted)
                if self.before_release is not None:
                    self.before_release(value)
                answers[i] = Answer(value, True, False)
        return answers

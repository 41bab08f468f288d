"""The audit plan, and what the targets of one run share: signals computed once, on first use.

:class:`AuditPlan` holds the pre-registered sizes and the attacks, fixed before any signal is
computed. :class:`AuditContext` holds the loaded run (model, blocks, partitions, recipe) and computes
on first use, for every target that needs it:

* ``ensemble``: the PMixED signals: the public model's and every member's next-token log-probs at
  the canary prompt and ``n_contexts`` held-out contexts, the audited member (the one farthest
  from the public model: restricted), the canary member planted by the deployment's own recipe and
  the poisoned member (its partition holds the canary user's records only);
* ``reference``: the public model's per-token log-probs on the membership blocks;
* ``canary_audit``: the DP-SGD canary audit (target and non-private positive control), whose
  trainings :meth:`AuditContext.start_canary_runs` starts first, so that an executor that runs
  jobs in the background (``processes``, ``ray``) trains them while the other audits run here.

A kind's ``start`` hook hands self-contained work to :meth:`AuditContext.submit` (the ``pmixed``
kind: each target's exact pairs and worst cases, NumPy on one core) and its ``audit`` takes the
results with :meth:`AuditContext.collect`; :meth:`AuditContext.close` stops whatever was never
collected.

Restricted values (the member, the canary's token, raw scores) go to ``restricted``, the annex.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch

from audit.attacks import ATTACKS
from audit.canaries import MemberRecipe, drop_adapter
from audit.dpsgd import CanaryPlan, CanaryRuns, finish_canary_audit, start_canary_runs
from audit.exposure import ExposurePlan
from audit.game import GamePlan, PlantedCanary, plant_canary, poison_member
from audit.signals import block_logprobs, pmixed_contexts
from audit.targets import AuditTarget
from pmixed.executor import Job, LocalExecutor, polling

__all__ = ["AuditContext", "AuditPlan", "EnsembleSignals"]


@dataclass(frozen=True)
class AuditPlan:
    """Pre-registered sizes and attacks, fixed before any signal is computed.

    ``configuration_starts``: random starts of the configuration's worst-case search (then
    Nelder-Mead from the best ``starts // 30``, ``2 * starts`` iterations each).
    ``attacks``: the membership-inference attacks of the risk audit, by their names in
    ``audit.attacks.ATTACKS`` (the risk audit supplies every input an attack may need: the
    public model's log-probs as reference, and the blocks' text)."""

    n_contexts: int = 256
    mia_blocks: int = 256
    conformance_samples: int = 1000
    bootstrap: int = 1000
    eta: float = 0.05
    seed: int = 0
    worst_case_evaluations: int = 120
    configuration_starts: int = 150
    canaries: CanaryPlan = field(default_factory=CanaryPlan)
    game: GamePlan = field(default_factory=GamePlan)
    exposure: ExposurePlan = field(default_factory=ExposurePlan)
    attacks: tuple[str, ...] = ("loss", "reference")

    def __post_init__(self) -> None:
        if not (isinstance(self.configuration_starts, int) and self.configuration_starts >= 1):
            raise ValueError(
                f"AuditPlan.configuration_starts must be an integer >= 1. "
                f"Found {self.configuration_starts!r}."
            )
        if not self.attacks or isinstance(self.attacks, str):
            raise ValueError(
                f"AuditPlan.attacks must name at least one attack. Found {self.attacks!r}."
            )
        for name in self.attacks:
            if name not in ATTACKS:
                raise ValueError(
                    f"AuditPlan.attacks: {name!r} is not a registered attack; "
                    f"registered: {', '.join(sorted(ATTACKS))}."
                )
        object.__setattr__(self, "attacks", tuple(self.attacks))


@dataclass(frozen=True)
class EnsembleSignals:
    """The PMixED signals shared by every PMixED target (restricted: they derive from members).

    Row 0 of each array is the canary prompt, rows 1.. the held-out contexts."""

    members: tuple[str, ...]
    member: int  # the audited member
    logp_public: np.ndarray  # [C+1, V]
    logp_members: np.ndarray  # [C+1, N, V]
    logp_canary: np.ndarray  # [C+1, V] the member retrained with the canary user's blocks
    logp_poisoned: np.ndarray  # [C+1, V] the member trained on the canary user's records only
    canary: PlantedCanary


def _farthest_member(lp0: np.ndarray, lps: np.ndarray) -> int:
    """The member with the largest mean KL(p_i ‖ p0) over the contexts (data-dependent: restricted)."""
    p = np.exp(lps)  # [C, N, V]
    with np.errstate(invalid="ignore"):
        kl = np.where(p > 0, p * (lps - lp0[:, None, :]), 0.0).sum(-1)
    return int(np.argmax(kl.mean(0)))


class AuditContext:
    """One run's shared audit inputs (see the module docstring); :meth:`close` removes the
    adapters it planted from the model."""

    def __init__(
        self,
        model: torch.nn.Module,
        targets: Sequence[AuditTarget],
        plan: AuditPlan,
        progress: Callable[[str, int], Callable[[int], None]],
        *,
        train_blocks: torch.Tensor,
        held_blocks: torch.Tensor,
        partitions: Sequence[torch.Tensor],
        recipe: MemberRecipe,
        tokenizer,
        dpsgd: Mapping | None = None,
        base: str | os.PathLike | None = None,
        executor: object | None = None,
    ) -> None:
        self.model, self.targets, self.plan = model, list(targets), plan
        self.train_blocks, self.held_blocks = train_blocks, held_blocks
        self.partitions, self.recipe, self.tokenizer = list(partitions), recipe, tokenizer
        self.dpsgd, self.base = dpsgd, base
        self.executor = executor or LocalExecutor()
        # every bar update lets the executor see that the background trainings have finished
        self.progress = polling(progress, self.executor)
        self.restricted: dict = {}
        self._planted: list[str] = []
        self._canary_runs: CanaryRuns | None = None
        self._pending: dict[str, object] = {}
        self._check()

    def _check(self) -> None:
        """One-line errors before any signal is computed."""
        if self.dpsgd is not None and self.base is None:
            raise ValueError(
                "base (the public model's folder) is needed for the DP-SGD canary audit."
            )
        pmixed = [t for t in self.targets if t.calibration is not None]
        if not pmixed:
            return
        if any(t.model != pmixed[0].model for t in pmixed) or not isinstance(
            pmixed[0].model, tuple
        ):
            raise ValueError(
                "every PMixED target's model must be the same tuple of member adapters."
            )
        if len(self.partitions) != len(pmixed[0].model):
            raise ValueError(
                f"partitions must hold one tensor per member ({len(pmixed[0].model)})."
            )
        budget = min(t.calibration.config.query_budget for t in pmixed)
        if self.plan.n_contexts + 1 > budget:  # the pairs compose the canary context and n_contexts
            raise ValueError(
                f"n_contexts must be <= query_budget - 1 = {budget - 1}. Found {self.plan.n_contexts}."
            )

    @cached_property
    def ensemble(self) -> EnsembleSignals:
        pmixed = [t for t in self.targets if t.calibration is not None]
        members, plan = list(pmixed[0].model), self.plan
        bar = self.progress("audit: signals", 1)
        lp0, lps = pmixed_contexts(self.model, members, self.held_blocks, plan.n_contexts)
        bar(1)
        member = _farthest_member(lp0, lps)
        # the canary's token is chosen against the black-box target's calibration (else the first
        # certified one): the deployment the game attacks
        chooser = next(
            (t for t in pmixed if t.black_box),
            next((t for t in pmixed if t.calibration.certified), pmixed[0]),
        ).calibration
        partition = self.partitions[member]
        canary = plant_canary(
            self.model,
            members,
            self.tokenizer,
            chooser,
            plan.game,
            member=member,
            partition=partition,
            recipe=self.recipe,
        )
        self._planted.append(canary.adapter)
        lc = pmixed_contexts(self.model, [canary.adapter], self.held_blocks, plan.n_contexts)[1]
        bar = self.progress("audit: poisoned member", 1)
        at_prompt = poison_member(self.model, canary, partition=partition, recipe=self.recipe)
        lpz = pmixed_contexts(self.model, ["poisoned-member"], self.held_blocks, plan.n_contexts)
        drop_adapter(self.model, "poisoned-member")
        bar(1)
        self.restricted["member"] = member
        return EnsembleSignals(
            members=tuple(members),
            member=member,
            logp_public=np.concatenate([canary.logp_public[None], lp0]),
            logp_members=np.concatenate([canary.logp_members[None], lps]),
            logp_canary=np.concatenate([canary.logp_canary[None], lc[:, 0]]),
            logp_poisoned=np.concatenate([at_prompt[None], lpz[1][:, 0]]),
            canary=canary,
        )

    @cached_property
    def membership_blocks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(training blocks, held-out blocks), ``mia_blocks`` of each at most, equally many."""
        n = min(self.plan.mia_blocks, len(self.train_blocks), len(self.held_blocks))
        return self.train_blocks[:n], self.held_blocks[:n]

    @cached_property
    def reference(self) -> tuple[np.ndarray, np.ndarray]:
        """The public model's per-token log-probs on the training and held-out blocks."""
        return tuple(block_logprobs(self.model, None, b) for b in self.membership_blocks)

    @cached_property
    def texts(self) -> tuple[list[str], list[str]]:
        """The membership blocks as text (for attacks that need it, e.g. zlib)."""
        return tuple([self.tokenizer.decode(x.tolist()) for x in b] for b in self.membership_blocks)

    def start_canary_runs(self) -> None:
        """Submits the DP-SGD canary audit's trainings to the executor (nothing without DP-SGD
        settings, or once started); :attr:`canary_audit` collects them."""
        if self.dpsgd is None or self._canary_runs is not None or "canary_audit" in vars(self):
            return
        self._canary_runs = start_canary_runs(
            self.model,
            self.train_blocks,
            self.plan.canaries,
            seed=self.plan.seed,
            base=self.base,
            executor=self.executor,
            **self.dpsgd,
        )

    @cached_property
    def canary_audit(self) -> dict | None:
        """The DP-SGD canary audit's public result (None: the run has no DP-SGD settings)."""
        if self.dpsgd is None:
            return None
        self.start_canary_runs()
        runs, self._canary_runs = self._canary_runs, None
        public, self.restricted["canaries"] = finish_canary_audit(
            self.model, runs, progress=self.progress
        )
        return public

    def submit(self, key: str, jobs: Sequence[Job]) -> None:
        """Starts ``jobs`` on the executor (in the background where it can) under ``key``."""
        if key in self._pending:
            raise ValueError(f"jobs {key!r} were already submitted.")
        self._pending[key] = self.executor.submit(jobs)

    def collect(self, key: str) -> list:
        """The return values of the jobs submitted under ``key``, in job order (waits for them)."""
        return self._pending.pop(key).results()

    def close(self) -> None:
        for pending in self._pending.values():  # submitted, never collected: the audit failed
            pending.cancel()
        self._pending.clear()
        if self._canary_runs is not None:
            self._canary_runs.cancel()
            self._canary_runs = None
        for name in self._planted:
            drop_adapter(self.model, name)
        self._planted.clear()

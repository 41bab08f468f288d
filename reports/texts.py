"""Fixed report texts: the guarantee statement template (REPORT.md §5), implementation and
governance notes. Statements are generated from values only; nothing here computes privacy."""

from __future__ import annotations

__all__ = ["GOVERNANCE", "IMPLEMENTATION", "statement"]

IMPLEMENTATION = {
    "rng": "privacy-critical draws (subsampling, token sampling, canary inclusion) take explicit "
    "numpy/torch generators; deployments seed them from OS entropy, audits record a fixed seed "
    "(the ledger header says whether it was seeded and keeps the seed in its 0600 file)",
    "opacus_secure_mode": False,
    "floating_point": "float64 in log space for the mollifier, laws and accounting; NaN or "
    "infinite values fail closed (a query that cannot be bounded is refused)",
    "side_channels": "public-fallback and private steps take different times; no per-query "
    "timestamps are written to the public ledger",
    "restricted_data": "mixing weights, subsets, the audited member and raw scores are kept in "
    "mode-0600 files next to the public ones, never in public artefacts",
    "incident_procedure": "a ledger that does not verify, or a spent budget above its limit, "
    "stops the service (fail verdict); answer from the public model only until reviewed",
}

GOVERNANCE = {
    "nist_sp_800_226": {
        "top (privacy guarantee)": "groups 2, 3, 5: unit, statement, accounting",
        "middle (algorithm and implementation)": "groups 4, 8, 9: parameters, audit, security",
        "bottom (trust and data collection)": "groups 3, 9: trust model, access control",
    },
    "gdpr": "Recital 26, Art. 25, Art. 35 (DPIA); EDPB Opinion 28/2024 on AI models: the epsilon "
    "statement plus the empirical audit is the evidence package",
    "eu_ai_act": "Art. 10 data governance; Art. 11 and Annex IV technical documentation; Art. 12 "
    "record keeping (the hash-chained ledger)",
    "dp_deployments_registry_tier": "Tier 2 fields present (flavour, unit, parameters, model)",
    "note": "a non-legal summary; sign-off and DPIA reference are to be filled by the owner",
    "sign_off": None,
}

_COVERED = {
    "pmixed": (
        "Covered: the sequence of sampled tokens. Not covered: the ensemble weights, the mixed "
        "distributions, log-probabilities, the mixing weights, and prompts if they are logged. "
        "The public model is assumed independent of the private data."
    ),
    "dpsgd": (
        "Covered: every intermediate and the final adapter weights. The accountant assumes "
        "Poisson sampling, which the training used (Opacus's Poisson data loader)."
    ),
}


_ROLE = {"evaluation": "evaluation deployment", "served": "served deployment"}


def _num(x: float | None) -> str:
    return "missing" if x is None else f"{x:.3g}"


def statement(name: str, m: dict, unit: dict, audit: dict) -> str:
    """One plain-language paragraph: what is released, covered, not covered, under which
    assumption and accountant, and what the audit found."""
    mech, acc = m["mechanism"], m["accounting"]
    eps, delta = acc["epsilon"], acc["delta"]
    row = audit.get("rows", {}).get(name) if audit.get("attached") else None
    if row is None:
        found = "No audit is attached."
    else:
        pair = (
            ""
            if row["epsilon_pair"] is None
            else (f"exact-pair lower bound {_num(row['epsilon_pair'])}, ")
        )
        lb = (
            "no black-box attack was run against this deployment"
            if row["epsilon_lb"] is None
            else f"empirical lower bound {_num(row['epsilon_lb'])} ({row['epsilon_lb_method']})"
        )
        if row["alarms"]:
            found = (
                f"The audit raised {len(row['alarms'])} alarm(s): a lower bound exceeds the claim."
            )
        elif row.get("inconclusive"):
            found = (
                f"The empirical audit is INCONCLUSIVE: a positive control failed, so it could "
                f"not have seen a leak ({pair}{lb}); this is not evidence for the claim."
            )
        else:
            found = f"An empirical audit found no evidence against the claim: {pair}{lb}."
    if mech["kind"] == "dpsgd":
        return (
            f"This model was trained with DP-SGD (Opacus) and satisfies approximate differential "
            f"privacy with epsilon = {eps:.2f} and delta = {delta:g}, for adding or removing "
            f"{unit['unit']}. The value comes from Renyi DP of the subsampled Gaussian mechanism "
            f"(noise multiplier {mech['noise_multiplier']:.3f}, sampling rate "
            f"{mech['sample_rate']:.4g}, {mech['steps']} steps), converted with {acc['accountant']}. "
            f"{_COVERED['dpsgd']} No user-level claim is made: a user with several blocks is "
            f"protected only by group privacy. {found}"
        )
    if acc.get("status") == "unverified":
        return (
            f"NO CLAIM. The ledger of this {_ROLE[mech['role']]} does not verify "
            f"({mech['ledger_failure']}): what it spent cannot be composed, so no differential "
            f"privacy statement can be made for it until the ledger is restored from a verified "
            f"copy or the deployment is retired."
        )
    if mech.get("role") == "evaluation":
        lead = (
            f"This evaluation deployment scored PMixED (mode {mech['mode']}) on at most "
            f"{mech['query_budget']:,} teacher-forced next-token predictions of held-out text "
            f"(nothing was released to users; the scores are utility metrics) and its ledger "
            f"satisfies approximate differential privacy with epsilon = {eps:.2f} and delta = "
            f"{delta:g}."
        )
    else:
        lead = (
            f"This service releases next-token samples produced by PMixED (mode {mech['mode']})"
            f" and satisfies approximate differential privacy with epsilon = {eps:.2f} and delta "
            f"= {delta:g} over its whole lifetime of at most {mech['query_budget']:,} released "
            f"tokens; its ledger records the traffic it actually answered."
        )
    over = m["budget"].get("overrun") or []
    if over:
        lead = (
            f"BUDGET OVERRUN: the ledger spent more than the budget fixed in its header "
            f"({'; '.join(over)}), so the claim below does not hold. "
        ) + lead
    if row is not None and row.get("audited_as"):
        found += f" (The audit ran on {row['audited_as']}: the same models and calibration.)"
    if not mech["certified"]:
        lead = (
            f"UNCERTIFIED. This deployment uses the paper code's reference accounting, which this "
            f"project shows can be exceeded; its claimed epsilon = {eps:.2f} (delta = {delta:g}) "
            f"over {mech['query_budget']:,} tokens is not a differential privacy guarantee and "
            f"cannot back one."
        )
    relation = (
        "the guarantee holds for adding or removing one whole partition (one ensemble member)"
        if mech["relation"] == "add_remove"
        else "the guarantee holds for replacing all data of one user (its member changes)"
    )
    return (
        f"{lead} The unit of privacy is {unit['unit']}: partitions are assigned by hashing the "
        f"user identifier, so all data of one user sit in one partition, and {relation}. The "
        f"value comes from Renyi DP at integer orders {mech['orders'][0]:g}-{mech['orders'][1]:g}, "
        f"composed under a budget fixed before deployment and converted with {acc['accountant']} "
        f"(optimal order {acc['optimal_order']:g}). {_COVERED['pmixed']} At budget exhaustion "
        f"the service answers from the public model only. {found}"
    )

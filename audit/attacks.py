"""Membership scores from signal arrays: pure functions, higher = "member" (AUDIT.md §5).

Every attack takes per-token log-probabilities ``[..., T]`` of the audited items under the target
(and, where it needs one, a reference) with an optional boolean ``mask [..., T]`` of the positions
that count (the secret's tokens, say), and returns one float64 score per item ``[...]``. Attacks are
registered by name with the inputs they need besides the target's log-probabilities
(:data:`ATTACKS`, :class:`Attack`), so an audit plan names them and the runner resolves them: a new
attack is one ``@register`` here and its name in ``AuditPlan.attacks``.

PMixED's black-box game has its own scores on sampled tokens: :func:`pmixed_count` and the
Neyman–Pearson optimal :func:`pmixed_llr` under the exact released laws of the two worlds.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

__all__ = [
    "ATTACKS",
    "INPUTS",
    "Attack",
    "exposure_rank",
    "lira_offline",
    "loss",
    "min_k",
    "pmixed_count",
    "pmixed_llr",
    "reference_calibrated",
    "register",
    "zlib_ratio",
]

#: The inputs an attack may need besides the target's log-probabilities ``[..., T]``: the same
#: positions under a reference model, or each item's text.
INPUTS = ("reference", "texts")


@dataclass(frozen=True)
class Attack:
    """A registered attack: ``fn(target, *needs, mask=...)`` with ``needs`` drawn from :data:`INPUTS`."""

    name: str
    fn: Callable[..., np.ndarray]
    needs: tuple[str, ...] = ()

    def __call__(self, *args, **kwargs) -> np.ndarray:
        return self.fn(*args, **kwargs)

    def score(self, target: object, inputs: Mapping[str, object], *, mask=None) -> np.ndarray:
        """The scores of ``target`` with the needed inputs taken from ``inputs`` by name."""
        missing = [n for n in self.needs if n not in inputs]
        if missing:
            raise ValueError(f"attack {self.name!r} needs {', '.join(missing)}.")
        return self.fn(target, *(inputs[n] for n in self.needs), mask=mask)


ATTACKS: dict[str, Attack] = {}


def register(name: str, *, needs: tuple[str, ...] = ()):
    """Adds an attack to :data:`ATTACKS` under ``name`` (unique); ``needs`` are its positional
    inputs after the target's log-probabilities, in order, each one of :data:`INPUTS`."""
    unknown = [n for n in needs if n not in INPUTS]
    if unknown:
        raise ValueError(f"needs must be drawn from {INPUTS}. Found {unknown}.")

    def deco(fn):
        if name in ATTACKS:
            raise ValueError(f"attack {name!r} is already registered.")
        ATTACKS[name] = Attack(name, fn, tuple(needs))
        return fn

    return deco


def _logprobs(x: object, mask: object | None, name: str) -> tuple[np.ndarray, np.ndarray]:
    lp = np.asarray(x, np.float64)
    if lp.ndim < 1 or lp.shape[-1] == 0:
        raise ValueError(f"{name} must have shape [..., T] with T >= 1. Found {lp.shape}.")
    m = (
        np.ones(lp.shape, bool)
        if mask is None
        else np.broadcast_to(np.asarray(mask, bool), lp.shape)
    )
    if not m.any(axis=-1).all():
        raise ValueError("mask must select at least one token of every item.")
    bad = m & ~(np.isfinite(lp) | (lp == -np.inf))
    if bad.any() or (m & (lp > 0)).any():
        raise ValueError(f"{name} must be log-probabilities (<= 0, no NaN) where mask is set.")
    return lp, m


def _mean(lp: np.ndarray, m: np.ndarray) -> np.ndarray:
    return np.where(m, lp, 0.0).sum(axis=-1) / m.sum(axis=-1)


@register("loss")
def loss(target: object, *, mask: object | None = None) -> np.ndarray:
    """−(mean NLL) of the masked tokens under the target: members are predicted better."""
    lp, m = _logprobs(target, mask, "target")
    return _mean(lp, m)


@register("reference", needs=("reference",))
def reference_calibrated(
    target: object, reference: object, *, mask: object | None = None
) -> np.ndarray:
    """Mean log-likelihood ratio target/reference (the public model as reference; LiRA-offline spirit)."""
    lp, m = _logprobs(target, mask, "target")
    lr, _ = _logprobs(reference, m, "reference")
    return _mean(lp, m) - _mean(lr, m)


@register("min_k")
def min_k(target: object, *, mask: object | None = None, k: float = 0.2) -> np.ndarray:
    """Mean of the lowest ``k`` fraction of masked token log-probs (Shi et al. 2023's Min-K%)."""
    if not 0.0 < k <= 1.0:
        raise ValueError(f"k must be in (0, 1]. Found {k}.")
    lp, m = _logprobs(target, mask, "target")
    flat_lp, flat_m = lp.reshape(-1, lp.shape[-1]), m.reshape(-1, m.shape[-1])
    out = np.empty(flat_lp.shape[0])
    for i, (row, keep) in enumerate(zip(flat_lp, flat_m)):
        vals = np.sort(row[keep])
        out[i] = vals[: max(1, int(np.ceil(k * vals.size)))].mean()
    return out.reshape(lp.shape[:-1])


@register("zlib", needs=("texts",))
def zlib_ratio(target: object, texts: Sequence[str], *, mask: object | None = None) -> np.ndarray:
    """Summed masked log-prob divided by the zlib-compressed length of each item's text in bytes.

    Carlini et al. (2021): a sequence that is likely under the model but not merely repetitive.
    """
    lp, m = _logprobs(target, mask, "target")
    flat = np.where(m, lp, 0.0).sum(axis=-1).reshape(-1)
    if len(texts) != flat.size:
        raise ValueError(f"texts must have one entry per item ({flat.size}). Found {len(texts)}.")
    sizes = np.array([len(zlib.compress(t.encode("utf-8"))) for t in texts], np.float64)
    return (flat / sizes).reshape(lp.shape[:-1])


def lira_offline(
    target_stat: object, out_stats: object, *, fixed_variance: bool = False
) -> np.ndarray:
    """Offline LiRA (Carlini et al. 2022): one-sided tail of the OUT Gaussian, as in the paper.

    Args:
        target_stat: ``[n]`` the statistic (e.g. sequence log-likelihood) of each item under the
            target model.
        out_stats: ``[n, S]`` the same statistic under S ≥ 2 shadow models trained without the
            item. Location is the median, scale the standard deviation (ddof = 1).
        fixed_variance: one scale for every item (the pooled within-item standard deviation), the
            paper's variant for few shadow models.

    Returns:
        ``log P[Z <= (φ − μ_out)/σ_out]``: large when the target fits the item better than models
        that never saw it.
    """
    phi = np.asarray(target_stat, np.float64)
    outs = np.asarray(out_stats, np.float64)
    if outs.ndim != 2 or outs.shape[0] != phi.size or outs.shape[1] < 2:
        raise ValueError(f"out_stats must have shape [{phi.size}, S >= 2]. Found {outs.shape}.")
    if not (np.isfinite(phi).all() and np.isfinite(outs).all()):
        raise ValueError("LiRA statistics must be finite.")
    mu = np.median(outs, axis=1)
    var = outs.var(axis=1, ddof=1)
    sigma = np.sqrt(np.full_like(var, var.mean()) if fixed_variance else var)
    return stats.norm.logcdf((phi - mu) / np.maximum(sigma, 1e-12))


def pmixed_count(tokens: object, targets: object) -> np.ndarray:
    """#{t : y_t = y*_t} per trial: ``tokens [n, T]`` against the canary tokens ``targets [T]``."""
    y = np.asarray(tokens)
    return (y == np.asarray(targets)[None, :]).sum(axis=1).astype(np.float64)


def pmixed_llr(tokens: object, log_law_in: object, log_law_out: object) -> np.ndarray:
    """Σ_t ln P_D(y_t|x_t) − ln P_D'(y_t|x_t): ``tokens [n, T]``, laws ``[T, V]`` (fixed contexts).

    Neyman–Pearson optimal for this pair of worlds and query plan. A token impossible under one
    world gives ±inf, which is the right answer (it identifies the world).
    """
    y = np.asarray(tokens, np.int64)
    a, b = np.asarray(log_law_in, np.float64), np.asarray(log_law_out, np.float64)
    if a.shape != b.shape or a.ndim != 2 or y.ndim != 2 or y.shape[1] != a.shape[0]:
        raise ValueError(
            f"tokens [n, T] and laws [T, V] disagree: {y.shape}, {a.shape}, {b.shape}."
        )
    t = np.arange(a.shape[0])[None, :]
    with np.errstate(invalid="ignore"):
        terms = a[t, y] - b[t, y]
    if np.isnan(terms).any():
        raise ValueError("a sampled token is impossible under both worlds' laws.")
    return terms.sum(axis=1)


def exposure_rank(secret_score: float, reference_scores: object, rng: np.random.Generator) -> int:
    """Rank (1 = most member-like) of the secret among K references, ties broken at random."""
    refs = np.asarray(reference_scores, np.float64)
    if refs.ndim != 1 or refs.size == 0 or np.isnan(refs).any() or np.isnan(secret_score):
        raise ValueError("reference_scores must be a non-empty 1-D array without NaN.")
    above = int((refs > secret_score).sum())
    ties = int((refs == secret_score).sum())
    return 1 + above + int(rng.integers(0, ties + 1))

"""Hypothesis strategies for the mechanism's property tests (PMIXED_MATH.md §13)."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st


@st.composite
def simplex(draw, v: int | None = None, *, min_v: int = 2, max_v: int = 1000, zeros: bool = True):
    """A probability vector with near-zero and (optionally) exact-zero entries."""
    if v is None:
        v = draw(st.integers(min_v, max_v))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    kind = draw(st.sampled_from(["dirichlet", "spiky", "tiny"]))
    if kind == "dirichlet":
        p = rng.dirichlet(np.full(v, draw(st.sampled_from([0.1, 0.5, 1.0, 5.0]))))
    elif kind == "spiky":
        p = np.exp(rng.standard_normal(v) * draw(st.sampled_from([1.0, 5.0, 15.0])))
    else:
        p = rng.random(v)
        p[rng.random(v) < 0.5] *= 1e-12
    if zeros and draw(st.booleans()):
        p[rng.random(v) < draw(st.sampled_from([0.1, 0.5]))] = 0.0
    if p.sum() == 0 or not np.isfinite(p.sum()):
        p = np.ones(v)
    return p / p.sum()


@st.composite
def simplex_pair(draw, *, min_v: int = 2, max_v: int = 1000, zeros: bool = True):
    v = draw(st.integers(min_v, max_v))
    return draw(simplex(v, zeros=zeros)), draw(simplex(v, zeros=zeros))


@st.composite
def ensemble(draw, *, max_n: int = 5, min_v: int = 2, max_v: int = 6, adversarial=None):
    """(members [N, V], public [V]): random, or the §13 'adversarial rare token' pattern."""
    n = draw(st.integers(1, max_n))
    v = draw(st.integers(min_v, max_v))
    p0 = draw(simplex(v, zeros=False))
    if adversarial is None:
        adversarial = draw(st.booleans())
    if not adversarial:
        return np.stack([draw(simplex(v, zeros=False)) for _ in range(n)]), p0
    rare = int(np.argmin(p0))
    rows = []
    for _ in range(n):
        r = draw(st.floats(10.0, 1e4))
        up = draw(st.booleans())
        p = p0.copy()
        p[rare] *= r if up else 1.0 / r
        rows.append(p / p.sum())
    return np.stack(rows), p0


def log_uniform(lo: float, hi: float):
    return st.floats(np.log(lo), np.log(hi)).map(np.exp)

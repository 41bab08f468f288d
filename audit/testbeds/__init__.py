"""Cheap audit test beds whose privacy claims can be audited to near-tightness (AUDIT.md §15).

* :mod:`audit.testbeds.logreg` — logistic-regression DP-SGD, the corrected algorithm (per-example
  L2 clipping, Gaussian noise σ·C on the sum, Poisson sampling), trained for thousands of runs at
  once as one batched tensor program, with Dirac gradient canaries.
* :mod:`audit.testbeds.seed` — the numpy DP-SGD of the seed the project started from, reproduced
  as written, with its own (wrong) privacy claim.
"""

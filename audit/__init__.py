"""audit: canaries, attacks, bounds and exact audits of PMixED and DP-SGD."""

"""accounting: ledger, dp-accounting composition, budget filter, DP-SGD accounting."""

"""campaign: the application at the top floor: the ``pmixed`` command line and the campaign
behind ``pmixed demo`` (data -> models -> evaluation through ledgers -> audit -> report).

Layers (imports point down only; ``tests/test_layers.py`` runs the contracts in pyproject.toml):
``campaign`` -> ``reports`` -> ``audit`` -> ``pmixed`` -> ``accounting``.
"""

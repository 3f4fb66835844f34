"""The lineage benchmark's parts, by what they hold: :mod:`zoo` (bases and their variants),
:mod:`baselines` (quantile statistics, a random encoder), :mod:`metrics` (retrieval and pair
scores, reconstruction, goals) and :mod:`report` (the table). The run over folds is
:mod:`xsae_cli.sane.evaluate`."""

"""Collection: hooks on a model, factor sums and counts, the EK-FAC corrector and the one batch loop."""

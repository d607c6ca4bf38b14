"""Eigendecompositions of collected sums: per layer, on local threads, across ranks."""

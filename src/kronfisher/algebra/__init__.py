"""Pure tensor algebra: dense and low-rank eigenbases, the Kronecker-eigenbasis apply, Woodbury, damping.

Nothing here knows about ``nn.Module``; see docs/concepts.md for the math.
"""

"""The README's API snippets run as written (the README promises it)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_snippets_run_and_their_assertions_hold() -> None:
    blocks = _python_blocks()
    assert len(blocks) >= 2, "README lost its API examples"
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)  # the snippet's own asserts are the checks
    fisher = namespace["fisher"]
    # The capture snippet rebuilt `fisher` from the user loop: same data, so same factors as kf.fit's (rtol 1e-5,
    # float32 accumulation of the same sums in a different order).
    import torch

    import kronfisher as kf

    ref = kf.fit(namespace["model"], namespace["batches"], namespace["cfg"].replace(ekfac=False))
    for name in ref.layer_names:
        a_ref, g_ref = ref.factors(name)
        a, g = fisher.factors(name)
        torch.testing.assert_close(a, a_ref, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)

"""K-FAC collection of the qwen2 workload with the default token budget and with ``lowrank_max_rank=None``.

Run: ``HF_HUB_OFFLINE=1 PYTHONPATH=src python benchmarks/attr_budget.py`` (process CPU seconds, one process).
"""

import sys
import time

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
import kronfisher as kf
from workloads import get

wl = get("qwen2", False)
model = wl.build()
b = wl.batches


def cpu():
    return time.process_time()


for label, kw in [("default", {}), ("budget None", {"lowrank_max_rank": None}), ("default again", {})]:
    cfg = kf.KFACConfig(**kw)
    t = cpu()
    disc, col, rep = kf.collect(model, [{"input_ids": x["input_ids"]} for x in b], cfg)
    dt = cpu() - t
    g = col.sums["lm_head"].G
    print(
        label,
        f"collect cpu {dt:.2f}s",
        "lm_head G kind",
        g.kind,
        "cols",
        getattr(g, "num_columns", None),
        "max_rank",
        getattr(g, "max_rank", None),
        flush=True,
    )

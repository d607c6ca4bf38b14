"""Distributed collection (docs/distributed.md): each rank collects on its shard; the result is one process on the
union.

Oracle: the single-process fit on the union of the shards (float64, ``rtol 1e-10``). The shards are the union
split in order, so even the low-rank ``U`` matches column by column (rank 0's tokens, then rank 1's, ...).
Every rank runs in its own gloo process (:func:`distributed_helper.distributed_test`, with a timeout).
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch

import kronfisher as kf
from conftest import make_model, random_ids, right_pad
from distributed_helper import (
    DistributedTestError,
    DistributedTimeout,
    distributed_test,
    failing_worker,
    hang_worker,
)
from kronfisher import distributed as kd

# Shards by world size: indices into _all_batches(); "empty" is a batch with no attended token (T = 0).
# World 2: uneven batch counts (rank 1 runs out first). World 3: rank 2 has zero tokens, rank 1 the most batches.
SHARDS: dict[int, list[list[Any]]] = {2: [[0, 1], [2]], 3: [[0], [1, 2, 3], ["empty"]]}
MODELS = {2: "gpt2", 3: "qwen2"}
LOWRANK = ("lm_head",)  # lm_head (out = vocab = 40) low-rank; every other layer dense: both kinds in one model


def _all_batches() -> list[dict[str, torch.Tensor]]:
    """Right-padded batches of different sizes (different T per rank)."""
    shapes = [[5, 3], [4], [6, 2, 3], [3, 5]]  # T per rank: 12 | 11 (world 2); 8 | 23 | 0 (world 3)
    out = []
    for i, lengths in enumerate(shapes):
        ids = random_ids(len(lengths), max(lengths), seed=10 + i)
        out.append(right_pad([ids[j, :n] for j, n in enumerate(lengths)]))
    return out


def _shard(world_size: int, rank: int) -> list[dict[str, torch.Tensor]]:
    batches = _all_batches()
    out = []
    for item in SHARDS[world_size][rank]:
        if item == "empty":
            b = dict(batches[0])
            b["attention_mask"] = torch.zeros_like(b["attention_mask"])
            out.append(b)
        else:
            out.append(batches[item])
    return out


def _mc_batches() -> list[dict[str, torch.Tensor]]:
    """Five batches of 2 × 16 tokens, then one without attended tokens (global index 5).

    160 tokens: more than any factor's dimension (64), so no factor is rank-deficient; in a degenerate null space
    the eigenbasis, and EK-FAC's corrected values in it, would depend on round-off (ill-posed, not comparable).
    """
    batches = [right_pad(list(random_ids(2, 16, seed=40 + i))) for i in range(5)]
    empty = dict(batches[0])
    empty["attention_mask"] = torch.zeros_like(empty["attention_mask"])
    return [*batches, empty]


def _union(world_size: int) -> list[dict[str, torch.Tensor]]:
    return [b for r in range(world_size) for b in _shard(world_size, r)]


def _cfg(**kw: Any) -> kf.KFACConfig:
    kw.setdefault("lowrank_dtype", "float64")
    return kf.KFACConfig(accumulate_dtype="float64", lowrank_layers=LOWRANK, **kw)


def _probe(fisher: kf.KFAC, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Fixed random 'gradients' for every tracked parameter (same on every process)."""
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(123)
    names = sorted(n for info in fisher.infos.values() for n in (info.weight_name, info.bias_name) if n)
    return {n: torch.randn(params[n].shape, generator=g, dtype=torch.float64) for n in names}


def _summary(fisher: kf.KFAC, model: torch.nn.Module) -> dict[str, Any]:
    """What the oracle comparison looks at: factors, U, EK-FAC eigenvalues, natural gradients, counts."""
    out: dict[str, Any] = {"A": {}, "G": {}, "corrected": {}, "corrected_tail": {}, "ekfac": {}, "basis": {}}
    for name in fisher.layer_names:
        a, g = fisher.factors(name)
        out["A"][name], out["G"][name] = a, g
        block = fisher.block(name)
        # The stored eigenbases themselves (a GEMM such as Q diag(λ) Qᵀ need not round the same in two processes:
        # MKL's kernels depend on memory alignment).
        out["basis"][name] = [block.A.vectors, block.A.values, getattr(block.G, "coeffs", None), block.G.values]
        if not getattr(block.G, "implicit", False):
            out["basis"][name][2] = block.G.vectors
        if block.corrected is not None:
            out["corrected"][name] = block.corrected
            # The EK-FAC operator itself: an A seen on fewer tokens than its size is thin in one process (its rows
            # are kept) and square after the ranks' dense reduction, so the values compare as the dense block.
            out["ekfac"][name] = fisher.to_dense(name)
        if block.corrected_tail is not None and block.thin_side == "G":  # a thin A's (zero) tail is in "ekfac"
            out["corrected_tail"][name] = block.corrected_tail
    out["U"] = fisher.sums["lm_head"].G.factor_U(torch.float64)
    out["nat"] = fisher.natural_gradient(_probe(fisher, model))
    r = fisher.report
    out["report"] = [r.tokens, r.loss_terms, r.batches]
    out["never_fired"] = list(r.never_fired)
    out["layers"] = list(fisher.layer_names)
    return out


class _EighCounter:
    """Counts the eigendecompositions done in this process: every dense factor and every low-rank Gram goes through
    ``torch.linalg.eigh`` (the counter replaces it while active; each rank is its own process)."""

    def __init__(self) -> None:
        self.calls = 0
        self._orig = torch.linalg.eigh

    def __enter__(self) -> _EighCounter:
        def counted(*args: Any, **kw: Any) -> Any:
            self.calls += 1
            return self._orig(*args, **kw)

        torch.linalg.eigh = counted
        return self

    def __exit__(self, *exc: object) -> None:
        torch.linalg.eigh = self._orig


def _summed_lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over attended positions with a target (the user's own loss)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = batch["attention_mask"].bool()
    keep = mask[:, 1:] & mask[:, :-1]
    pred = logits[:, :-1][keep]
    target = batch["input_ids"][:, 1:][keep]
    return torch.nn.functional.cross_entropy(pred, target, reduction="sum"), int(keep.sum())


def fit_worker(rank: int, world_size: int) -> dict[str, Any]:
    """One rank: plain fit (EK-FAC), DDP-wrapped fit, user-driven capture, token budget."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = make_model(MODELS[world_size])
    batches = _shard(world_size, rank)
    out: dict[str, Any] = {"main": kd.is_main_process(), "distributed": kd.is_distributed()}
    kd.barrier()
    with _EighCounter() as counter:
        fisher = kf.fit(model, batches, _cfg(ekfac=True))
    out["plain"] = _summary(fisher, model)
    out["eigh_calls"] = counter.calls

    # DDP-wrapped model: same result, and collection triggers no gradient all-reduce.
    ddp = DDP(model)
    calls = [0]

    def counting_hook(state, bucket):  # no annotations: DDP checks them against dist.GradBucket
        calls[0] += 1
        fut: torch.futures.Future = torch.futures.Future()
        fut.set_result(bucket.buffer())
        return fut

    ddp.register_comm_hook(None, counting_hook)
    control = _all_batches()[0]
    _summed_lm_loss(ddp, control)[0].backward()  # positive control: an ordinary backward does all-reduce
    out["ddp_control_calls"] = calls[0]
    model.zero_grad(set_to_none=True)
    calls[0] = 0
    fisher_ddp = kf.fit(ddp, batches, _cfg(ekfac=True))
    out["ddp_fit_calls"] = calls[0]
    out["ddp_grads_untouched"] = all(p.grad is None for p in model.parameters())
    out["ddp"] = _summary(fisher_ddp, model)

    # User-driven loop (kf.capture): finalize merges the ranks' sums.
    with kf.capture(model, _cfg()) as cap:
        for b in batches:
            loss, n = _summed_lm_loss(model, b)
            cap.backward(loss, num_terms=n, reduction="sum", attention_mask=b["attention_mask"])
    fisher_cap = cap.finalize()
    model.zero_grad(set_to_none=True)
    out["capture"] = {n: list(fisher_cap.factors(n)) for n in fisher_cap.layer_names}

    # MC Fisher on a round-robin Shard of all batches plus an empty one: targets are seeded per global batch
    # index, so the ranks draw what one process draws; the empty batch is reported by its global index (5).
    mc = kf.fit(model, kd.Shard(_mc_batches()), _cfg(fisher="mc", mc_samples=2, ekfac=True))
    out["mc"] = _summary(mc, model)
    out["mc_empty"] = list(mc.report.empty_batches)

    # Token budget: every rank compresses locally (basis columns), the merge must keep them. bfloat16 storage
    # also exercises the gather of a 2-byte dtype.
    budget = kf.fit(model, batches, _cfg(lowrank_max_rank=2, lowrank_dtype="bfloat16"))
    g = budget.block("lm_head").G
    out["budget"] = [g.trace(), budget.block("lm_head").tokens["N"], budget.sums["lm_head"].G.num_columns]
    return out


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str, scale: torch.Tensor | None = None) -> None:
    # The one-process oracle: rtol 1e-10; absolute floor 1e-10 · max|expected| for entries that are round-off zeros
    # (clamped null-space eigenvalues, EK-FAC values on the null space of A), or of ``scale`` where every entry is
    # (the EK-FAC tail of a low-rank G on the data it was collected on: its scale is the block's span eigenvalues).
    ref = expected if scale is None else scale
    atol = 1e-10 * float(ref.abs().max()) if ref.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=atol, msg=lambda m: f"{what}: {m}")


def _compare(got: dict[str, Any], ref: dict[str, Any], what: str) -> None:
    assert got["layers"] == ref["layers"], what
    for key in ("A", "G", "corrected", "corrected_tail", "ekfac", "nat"):
        assert sorted(got[key]) == sorted(ref[key]), f"{what}: {key} keys"
        for name in ref[key]:
            if key.startswith("corrected") and got[key][name].shape != ref[key][name].shape:
                continue  # a thin A against a square one (see _summary): compared as "ekfac"
            scale = ref["corrected"][name] if key == "corrected_tail" else None
            _close(got[key][name], ref[key][name], f"{what} {key}[{name}]", scale)
    assert got["U"].shape == ref["U"].shape, f"{what}: U {list(got['U'].shape)} vs {list(ref['U'].shape)}"
    _close(got["U"], ref["U"], f"{what} U")
    assert got["report"] == ref["report"], what
    assert got["never_fired"] == [], what


@pytest.mark.parametrize("world_size", [2, 3])
def test_distributed_fit_equals_one_process_on_union(world_size: int, tmp_path: Any) -> None:
    """Factors, U, EK-FAC eigenvalues, natural gradients (plain and DDP-wrapped, uneven shards, zero-token rank)."""
    results = distributed_test(world_size, fit_worker, tmp_path, timeout=240)

    model = make_model(MODELS[world_size])
    union = _union(world_size)
    with _EighCounter() as counter:
        ref_fisher = kf.fit(model, union, _cfg(ekfac=True))
    ref = _summary(ref_fisher, model)
    assert ref["corrected"] and ref["corrected_tail"], "the oracle must exercise EK-FAC on a low-rank layer"
    assert ref["U"].shape[1] == ref_fisher.report.tokens > 0

    assert [res["main"] for res in results] == [True] + [False] * (world_size - 1)  # only rank 0 writes files
    for rank, res in enumerate(results):
        assert res["distributed"]
        _compare(res["plain"], ref, f"rank {rank} plain")
        _compare(res["ddp"], ref, f"rank {rank} DDP")
        # Every rank holds bit-identical blocks (decompositions broadcast by their owner).
        for name in ref["basis"]:
            for mine, first in zip(res["plain"]["basis"][name], results[0]["plain"]["basis"][name]):
                assert torch.equal(mine, first), (rank, name)
        for name in ref["corrected"]:
            assert torch.equal(res["plain"]["corrected"][name], results[0]["plain"]["corrected"][name]), (rank, name)
        assert res["ddp_control_calls"] > 0, "the comm-hook counter must see an ordinary DDP backward"
        assert res["ddp_fit_calls"] == 0, "collection must not trigger DDP gradient all-reduce"
        assert res["ddp_grads_untouched"]
        for name, (a, g) in res["capture"].items():
            _close(a, ref["A"][name], f"rank {rank} capture A[{name}]")
            _close(g, ref["G"][name], f"rank {rank} capture G[{name}]")
        assert sorted(res["capture"]) == sorted(ref["A"])

    # MC: same draws per global batch index as one process (U compared as U Uᵀ: Shard's round-robin order puts
    # the columns in another order than one process).
    ref_mc = kf.fit(model, _mc_batches(), _cfg(fisher="mc", mc_samples=2, ekfac=True))
    mc = _summary(ref_mc, model)
    assert ref_mc.report.empty_batches == [5]
    for rank, res in enumerate(results):
        got = res["mc"]
        for key in ("A", "G", "corrected", "corrected_tail", "nat"):
            assert sorted(got[key]) == sorted(mc[key])
            for name in mc[key]:
                want, have = mc[key][name], got[key][name]
                if key == "corrected":
                    # The one round-off null direction of A (GPT-2's LayerNorm outputs sum to zero: λ ~ 1e-17 of
                    # the largest) carries summation-order noise, and the Shard's round-robin order is not the
                    # union's: that column is compared with atol 1e-6 · max; the rest at the oracle's rtol 1e-10.
                    a_vals = ref_mc.block(name).A.values
                    null = a_vals < 1e-12 * float(a_vals.max())
                    assert int(null.sum()) <= 1, name
                    torch.testing.assert_close(have[:, null], want[:, null], rtol=0, atol=1e-6 * float(want.max()))
                    have, want = have[:, ~null], want[:, ~null]
                if key == "corrected_tail":
                    # Here (160 tokens > out = 40) the complement of U's span is the round-off null direction of
                    # G (softmax gradients sum to zero): values ~1e-16, compared on the layer's scale.
                    scale = float(mc["corrected"][name].max())
                    torch.testing.assert_close(have, want, rtol=1e-10, atol=1e-10 * scale)
                    continue
                _close(have, want, f"rank {rank} MC {key}[{name}]")
        _close(got["U"] @ got["U"].t(), mc["U"] @ mc["U"].t(), f"rank {rank} MC U Uᵀ")
        assert got["report"] == mc["report"] and res["mc_empty"] == [5], rank

    # The decompositions are spread: together the ranks do exactly the single-process work, none does all of it.
    per_rank = [res["eigh_calls"] for res in results]
    assert sum(per_rank) == counter.calls, (per_rank, counter.calls)
    assert max(per_rank) < counter.calls, per_rank

    # Token budget: the merged G keeps every rank's compressed basis, so tr G = Σ ‖ĝ‖² / N and N stay exact
    # (rel 1e-10: the compressions measure the discarded mass in float64 on the stored bfloat16 values, and the
    # oracle is the uncompressed U stored in bfloat16). Losing a rank's basis would lose a large part of it.
    stored = kf.fit(model, union, _cfg(lowrank_dtype="bfloat16"))
    exact_trace = float(stored.sums["lm_head"].G.factor_U(torch.float64).square().sum())
    for res in results:
        trace, n, columns = res["budget"]
        assert n == ref_fisher.block("lm_head").tokens["N"]
        assert columns <= 2 * 2
        assert trace == pytest.approx(exact_trace, rel=1e-10)


def test_helper_fails_fast_on_hang_and_on_error(tmp_path: Any) -> None:
    """A hang is killed at the timeout; a rank that raises fails at once with its traceback."""
    t0 = time.monotonic()
    with pytest.raises(DistributedTimeout) as hang:
        distributed_test(2, hang_worker, tmp_path, timeout=5)
    assert time.monotonic() - t0 < 5 + 10  # killed promptly, did not wait for the gloo timeout
    assert 0 in hang.value.running

    t0 = time.monotonic()
    with pytest.raises(DistributedTestError) as err:
        distributed_test(2, failing_worker, tmp_path, timeout=120)
    assert not isinstance(err.value, DistributedTimeout)
    assert "rank 1 failed on purpose" in str(err.value)
    assert time.monotonic() - t0 < 60  # reported as soon as rank 1 exits, not at the timeout


def test_single_process_helpers_are_noops() -> None:
    """Without a process group: rank 0 writes, barrier returns, reductions change nothing."""
    assert not kd.is_distributed() and kd.is_main_process() and kd.get_world_size() == 1
    kd.barrier()
    t = torch.ones(3)
    assert kd.all_reduce_tensors([t]) == 0 and torch.equal(t, torch.ones(3))
    model = make_model("gpt2")
    wrapped = torch.nn.DataParallel(model)
    assert kd.unwrap_model(wrapped) is model and kd.unwrap_model(model) is model
    # Round-robin shards: disjoint, cover the data, counts differ by at most one, re-iterable (two EK-FAC passes).
    data = list(range(11))
    shards = [kd.Shard(data, r, 3) for r in range(3)]
    assert sorted(x for sh in shards for x in sh) == data
    assert [len(sh) for sh in shards] == [len(list(sh)) for sh in shards] == [4, 4, 3]
    assert list(shards[1]) == list(shards[1]) == [1, 4, 7, 10]
    assert list(kd.Shard(data)) == data  # no process group: every batch
    with pytest.raises(kf.ConfigError):
        kd.Shard(data, 3, 3)


def save_worker(rank: int, world_size: int, out_dir: str) -> dict[str, Any]:
    """Every rank calls save; only rank 0 writes, and after the barrier every rank reads the complete file."""
    import os

    import kronfisher.io.atomic as io_atomic

    writes = []
    original = io_atomic.write_safetensors  # the atomic writer's one call that writes the file's bytes

    def spy(*args: Any, **kwargs: Any) -> Any:
        writes.append(rank)
        return original(*args, **kwargs)

    io_atomic.write_safetensors = spy  # this rank's own process: nothing to restore
    model = make_model("llama", seed=3)
    fisher = kf.fit(model, [{"input_ids": random_ids(2, 5, seed=rank)}], kf.KFACConfig(accumulate_dtype="float64"))
    path = os.path.join(out_dir, "f.safetensors")
    fisher.save(path)
    loaded = kf.load(path)  # right after save: the barrier guarantees the file is complete
    name = loaded.layer_names[0]
    return {"writes": torch.tensor(len(writes)), "trace": torch.tensor(loaded.block(name).A.trace())}


def test_only_rank_zero_writes_and_others_wait(tmp_path: Any) -> None:
    results = distributed_test(2, save_worker, tmp_path, timeout=120, out_dir=str(tmp_path))
    assert [int(r["writes"]) for r in results] == [1, 0]
    # Both ranks read the same (merged) file: identical traces.
    assert float(results[0]["trace"]) == float(results[1]["trace"])

"""Factor files (docs/files.md): round trips, atomic writes, corruption, fingerprints, merge, lazy loading.

References: the in-memory operator a file was written from (round trip is an invariance: the loaded operator
must be the same operator), one fit over the union of the data (merge, docs/concepts.md), fingerprints built from the
model configs, and the raw sums (traces reported by ``inspect_file``).
"""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import kronfisher as kf
import kronfisher.io.atomic as katomic
import kronfisher.io.files as kio
from conftest import make_model, random_ids
from kronfisher.collection.sums import LowRankSum
from kronfisher.drivers.fit import collect

BATCHES = [{"input_ids": random_ids(2, 6, seed=s)} for s in range(4)]
BASE = {"accumulate_dtype": "float64", "lowrank_layers": ("lm_head",)}


def _fit(name: str, batches: list, **cfg_kw) -> tuple[torch.nn.Module, kf.KFAC]:
    model = make_model(name)
    cfg = kf.KFACConfig(**{**BASE, **cfg_kw})
    return model, kf.fit(model, batches, cfg)


@pytest.fixture(scope="module")
def kfac_qwen() -> tuple[torch.nn.Module, kf.KFAC]:
    return _fit("qwen2", BATCHES[:2])


@pytest.fixture(scope="module")
def ekfac_qwen() -> tuple[torch.nn.Module, kf.KFAC]:
    return _fit("qwen2", BATCHES[:2], ekfac=True)


def _vectors(model: torch.nn.Module, fisher: kf.KFAC, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    out = {}
    for info in fisher.infos.values():
        for pname in (info.weight_name, info.bias_name):
            if pname:
                out[pname] = torch.randn(params[pname].shape, generator=g, dtype=torch.float64)
    return out


def _assert_same_operator(a: kf.KFAC, b: kf.KFAC, model: torch.nn.Module, rtol: float) -> None:
    assert a.layer_names == b.layer_names
    v = _vectors(model, a)
    for p in (1.0, -1.0, -0.5):
        ra, rb = a.power(v, p), b.power(v, p)
        assert ra.keys() == rb.keys() == v.keys()
        for k in ra:
            torch.testing.assert_close(rb[k], ra[k], rtol=rtol, atol=rtol * float(ra[k].abs().max()))
    fa, fb = a.fvp(v), b.fvp(v)  # undamped F v
    for k in fa:
        torch.testing.assert_close(fb[k], fa[k], rtol=rtol, atol=rtol * float(fa[k].abs().max()))
    for name in (a.layer_names[0], "lm_head"):  # dense blocks are slow-ish to build: one dense, one low-rank layer
        da = a.to_dense(name)
        torch.testing.assert_close(b.to_dense(name), da, rtol=rtol, atol=rtol * float(da.abs().max()))


def _assert_same_sum(t, s) -> None:
    """Bit-for-bit equal raw state (sums are stored in their own dtype)."""
    assert type(t) is type(s) and t.count == s.count
    if isinstance(s, LowRankSum):
        assert torch.equal(t.raw_columns(torch.float64), s.raw_columns(torch.float64))
        assert (t.tail_mass, t.discarded_mass, t.tail()) == (s.tail_mass, s.discarded_mass, s.tail())
    else:
        assert torch.equal(t.sum, s.sum)


def _flip(src: Path, dst: Path, pos: int, bit: int = 0) -> None:
    data = bytearray(src.read_bytes())
    data[pos] ^= 1 << bit
    dst.write_bytes(bytes(data))


# Round trips ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["kfac", "ekfac"])
def test_roundtrip_dense_lowrank_ekfac(which, kfac_qwen, ekfac_qwen, tmp_path):
    model, fisher = kfac_qwen if which == "kfac" else ekfac_qwen
    lm = fisher.block("lm_head")
    assert lm.representation == "lowrank" and lm.G.rank < lm.G.dim  # thin P: the tail path is exercised
    assert fisher.is_ekfac == (which == "ekfac")
    path = fisher.save(tmp_path / "f.safetensors", model=model, include_sums=True)
    loaded = kf.load(path, model=model)
    assert loaded.is_ekfac == fisher.is_ekfac
    for name in fisher.layer_names:
        a, b = fisher.block(name), loaded.block(name)
        assert b.representation == a.representation and b.tokens == a.tokens
        for x, y in ((a.A, b.A), (a.G, b.G)):  # stored bit for bit (float64 here)
            assert torch.equal(x.vectors, y.vectors) and torch.equal(x.values, y.values) and x.tail == y.tail
        for attr in ("corrected", "corrected_tail"):
            x, y = getattr(a, attr), getattr(b, attr)
            assert (x is None) == (y is None) and (x is None or torch.equal(x, y))
    if which == "ekfac":
        assert loaded.block("lm_head").corrected_tail is not None
    # Same tensors, so the operators agree to round-off of differently strided BLAS calls (rtol 1e-12).
    _assert_same_operator(fisher, loaded, model, rtol=1e-12)
    assert loaded.report.to_dict() == fisher.report.to_dict()
    assert loaded.cfg == fisher.cfg
    # Each tensor is stored once: q/k/v read the same input, so their identical A sums share one tensor; an implicit
    # low-rank eigenbasis P = W C shares W with the raw low-rank sum.
    meta = kf.read_metadata(path)
    qkv = {meta["sums"][f"model.layers.0.self_attn.{x}_proj"]["A"]["tensors"]["sum"] for x in "qkv"}
    assert len(qkv) == 1
    g_meta = meta["blocks"]["lm_head"]["G"]
    if g_meta["form"] == "implicit":
        assert g_meta["columns"] == meta["sums"]["lm_head"]["G"]["tensors"]["columns"]


def test_roundtrip_gpt2_conv1d_and_natural_gradient(tmp_path):
    model, fisher = _fit("gpt2", BATCHES[:1], lowrank_layers=())
    assert {i.kind for i in fisher.infos.values()} == {"conv1d", "linear"}
    loaded = kf.load(fisher.save(tmp_path / "g.safetensors"), model=model)
    grads = _vectors(model, fisher, seed=3)
    for n, p in model.named_parameters():
        if n in grads:
            p.grad = grads[n].to(p.dtype)
    ng_a, ng_b = fisher.natural_gradient(), loaded.natural_gradient()  # .grad of the attached model
    for k in ng_a:
        torch.testing.assert_close(ng_b[k], ng_a[k], rtol=1e-12, atol=0.0)  # same tensors, same math


@pytest.mark.parametrize("max_rank", [None, 5])
def test_loaded_sums_from_sums_equals_original(max_rank, tmp_path):
    # max_rank=5 < 12 tokens per batch: the low-rank G is compressed (basis + isotropic tail mass).
    model, fisher = _fit("qwen2", BATCHES[:2], lowrank_max_rank=max_rank)
    if max_rank is not None:
        assert fisher.sums["lm_head"].G.tail_mass > 0
    loaded = kf.load_sums(fisher.save(tmp_path / "f.safetensors", include_sums=True))
    for name, s in fisher.sums.items():
        t = loaded.sums[name]
        assert t.batches == s.batches
        _assert_same_sum(t.A, s.A)
        _assert_same_sum(t.G, s.G)
        assert t.A.sum.data_ptr() != s.A.sum.data_ptr()  # fresh tensors: safe to keep accumulating
    rebuilt = kf.KFAC.from_sums(loaded.infos, loaded.sums, loaded.cfg)
    _assert_same_operator(fisher, rebuilt, model, rtol=1e-12)  # same sums -> same decomposition


def test_save_sums_resume_extra_meta_and_sums_file_load(tmp_path):
    model = make_model("qwen2")
    cfg = kf.KFACConfig(**BASE)
    disc, col, report = collect(model, BATCHES[:2], cfg)
    path = kf.save_sums(
        tmp_path / "s.safetensors", disc.infos, col.sums, cfg, report=report, model=model, extra_meta={"next_batch": 2}
    )
    sf = kf.load_sums(path)
    assert sf.meta["extra"] == {"next_batch": 2} and sf.meta["kind"] == "sums"
    assert sf.report.tokens == report.tokens == 24
    # Resume: keep accumulating into the loaded sums; the result equals one pass over all four batches.
    _, col_rest, _ = collect(model, BATCHES[2:], cfg)
    for name, s in sf.sums.items():
        s.merge(col_rest.sums[name])
    union_model, union = _fit("qwen2", BATCHES)
    resumed = kf.KFAC.from_sums(sf.infos, sf.sums, sf.cfg)
    _assert_same_operator(union, resumed, union_model, rtol=1e-10)  # float64 sums, different summation order
    # A sums file loads as an operator too (decomposed on load).
    direct = kf.load(path, model=model)
    _assert_same_operator(kf.KFAC.from_sums(disc.infos, col.sums, cfg), direct, model, rtol=1e-12)
    with pytest.raises(kf.ConfigError, match="JSON"):
        kf.save_sums(tmp_path / "bad.safetensors", disc.infos, col.sums, cfg, extra_meta={"x": object()})
    assert sorted(os.listdir(tmp_path)) == ["s.safetensors"]


# Merge ----------------------------------------------------------------------------------------------------------
def test_merge_halves_equals_union(tmp_path):
    union_model, union = _fit("qwen2", BATCHES)
    model = make_model("qwen2")
    cfg = kf.KFACConfig(**BASE)
    _, first = _fit("qwen2", BATCHES[:2])
    p1 = first.save(tmp_path / "a.safetensors", include_sums=True)  # a "kfac" file with its sums
    disc, col, rep = collect(model, BATCHES[2:], cfg)
    p2 = kf.save_sums(tmp_path / "b.safetensors", disc.infos, col.sums, cfg, report=rep)  # a "sums" file
    out = kf.merge_files([p1, p2], tmp_path / "m.safetensors", model=model)
    merged = kf.load(out, model=model)
    # Adding sums and counts equals one pass over the union (float64, rtol 1e-10).
    _assert_same_operator(union, merged, union_model, rtol=1e-10)
    for name, s in union.sums.items():
        m = merged.sums[name]
        torch.testing.assert_close(m.A.sum, s.A.sum, rtol=1e-10, atol=0.0)
        assert m.A.count == s.A.count and m.G.count == s.G.count
        torch.testing.assert_close(
            m.G.raw_columns(torch.float64), s.G.raw_columns(torch.float64), rtol=1e-10, atol=0.0
        ) if name == "lm_head" else None
    assert merged.report.tokens == union.report.tokens and merged.report.loss_terms == union.report.loss_terms
    assert [d["path"] for d in kf.read_metadata(out)["extra"]["merged_from"]] == [str(p1), str(p2)]


def test_merge_of_runs_whose_plans_chose_different_representations_equals_union(tmp_path):
    """gate/up (out 24 > lowrank_threshold 20) are exact low-rank in a run of 8 tokens and dense in one of 128 (the
    plan chooses by the token count): the merge raised AttributeError. Now the low-rank ``G`` joins the dense one as
    ``W Wᵀ``; reference: one run over the union (float64, relative 1e-12), either input first."""
    model = make_model("qwen2")
    cfg = kf.KFACConfig(accumulate_dtype="float64", lowrank_threshold=20, lowrank_dtype="float64", max_memory="1GiB")
    few, many = [{"input_ids": random_ids(1, 8, seed=1)}], [{"input_ids": random_ids(4, 16, seed=s)} for s in (2, 3)]
    gate = "model.layers.0.mlp.gate_proj"
    small, large = kf.fit(model, few, cfg), kf.fit(model, many, cfg)
    assert (small.block(gate).representation, large.block(gate).representation) == ("lowrank", "dense")
    paths = [f.save(tmp_path / f"{i}.safetensors", include_sums=True) for i, f in enumerate((small, large))]
    union = kf.fit(model, few + many, cfg)
    for k, inputs in enumerate((paths, paths[::-1])):
        merged = kf.load(kf.merge_files(inputs, tmp_path / f"m{k}.safetensors"))
        for name in union.layer_names:
            ref = union.to_dense(name)
            torch.testing.assert_close(merged.to_dense(name), ref, rtol=0, atol=1e-12 * float(ref.abs().max()))


def test_merge_refuses_incompatible_and_drops_ekfac(kfac_qwen, ekfac_qwen, tmp_path):
    _, fisher = kfac_qwen
    p1 = fisher.save(tmp_path / "a.safetensors", include_sums=True)
    sums = {n: s for n, s in fisher.sums.items()}
    p2 = kf.save_sums(tmp_path / "b.safetensors", fisher.infos, sums, fisher.cfg.replace(approx="reduce"))
    with pytest.raises(kf.FileFormatError, match="approx"):
        kf.merge_files([p1, p2], tmp_path / "m.safetensors")
    p3 = fisher.save(tmp_path / "nosums.safetensors", include_sums=False)
    with pytest.raises(kf.FileFormatError, match="no raw sums"):
        kf.merge_files([p1, p3], tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()
    # The same data twice is refused: the same file, a copy, or a merged file together with one of its sources.
    with pytest.raises(kf.FileFormatError, match="counted twice"):
        kf.merge_files([p1, p1], tmp_path / "m.safetensors")
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(p1.read_bytes())
    with pytest.raises(kf.FileFormatError, match="counted twice"):
        kf.merge_files([p1, copy], tmp_path / "m.safetensors")
    # EK-FAC eigenvalues depend on the merged eigenbasis: the merged file is K-FAC, with a warning.
    pe = ekfac_qwen[1].save(tmp_path / "e.safetensors", include_sums=True)  # batches 0-1
    pe2 = _fit("qwen2", BATCHES[2:3], ekfac=True)[1].save(tmp_path / "e2.safetensors", include_sums=True)  # batch 2
    out = kf.merge_files([pe, pe2], tmp_path / "me.safetensors")
    merged = kf.load(out)
    assert not merged.is_ekfac and any("EK-FAC" in w for w in merged.report.warnings)
    assert merged.report.tokens == 36  # 3 batches of 2 x 6 tokens
    with pytest.raises(kf.FileFormatError, match="counted twice"):
        kf.merge_files([out, pe2], tmp_path / "again.safetensors")


# Atomic writes --------------------------------------------------------------------------------------------------
def test_atomic_write_leaves_nothing_partial(kfac_qwen, tmp_path, monkeypatch):
    model, fisher = kfac_qwen
    real = katomic.write_safetensors

    def half_then_fail(tensors, path, metadata):
        real(tensors, path, metadata)
        with open(path, "r+b") as fh:
            fh.truncate(os.path.getsize(path) // 2)
        raise OSError("disk full (simulated)")

    target = tmp_path / "f.safetensors"
    monkeypatch.setattr(katomic, "write_safetensors", half_then_fail)
    with pytest.raises(OSError, match="simulated"):
        fisher.save(target)
    assert os.listdir(tmp_path) == []  # neither the target nor a temporary file
    monkeypatch.setattr(katomic, "write_safetensors", real)
    fisher.save(target)
    before = target.read_bytes()
    monkeypatch.setattr(katomic, "write_safetensors", half_then_fail)
    with pytest.raises(OSError):
        fisher.save(target)
    assert target.read_bytes() == before and os.listdir(tmp_path) == ["f.safetensors"]
    monkeypatch.setattr(katomic, "write_safetensors", real)

    def no_rename(src, dst):
        raise OSError("rename failed (simulated)")

    monkeypatch.setattr(katomic.os, "replace", no_rename)
    with pytest.raises(OSError, match="rename"):
        fisher.save(target)
    monkeypatch.undo()
    assert target.read_bytes() == before and os.listdir(tmp_path) == ["f.safetensors"]
    kf.load(target, model=model, verify=True)


# Corruption -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(kfac_qwen, tmp_path_factory) -> Path:
    return kfac_qwen[1].save(tmp_path_factory.mktemp("io") / "f.safetensors", include_sums=True)


def test_truncated_file_is_refused_on_open(saved, tmp_path):
    data = saved.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    for cut in (0, 5, 8, 40, header_end - 1, header_end, header_end + 3, len(data) // 2, len(data) - 1):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        for reader in (kf.load, kf.load_sums, kf.inspect_file):
            with pytest.raises(kf.FileFormatError, match=str(bad)):
                reader(bad)
    with pytest.raises(FileNotFoundError, match="nope"):
        kf.load(tmp_path / "nope.safetensors")


def test_any_flipped_bit_is_detected(saved, tmp_path):
    size = saved.stat().st_size
    rng = random.Random(0)
    positions = list(range(8)) + rng.sample(range(8, size), 250)
    bad = tmp_path / "bad.safetensors"
    for pos in positions:
        _flip(saved, bad, pos, bit=rng.randrange(8))
        with pytest.raises(kf.FileFormatError, match=str(bad)):
            kf.verify_file(bad)
        bad.unlink()


def test_corrupted_tensor_found_lazily_on_access(saved, tmp_path):
    meta = kf.read_metadata(saved)
    data = saved.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    # Locate the G eigenvectors of one layer in the payload from the safetensors index.
    import json

    index = json.loads(data[8:header_end])
    key = meta["blocks"]["model.layers.1.mlp.down_proj"]["G"]["vectors"]
    start, end = index[key]["data_offsets"]
    bad = tmp_path / "bad.safetensors"
    _flip(saved, bad, header_end + (start + end) // 2, bit=3)
    fisher = kf.load(bad)  # the header is intact: opens fine, lazily
    fisher.block("model.layers.0.mlp.down_proj")  # an intact layer reads fine
    with pytest.raises(kf.FileFormatError, match=f"{bad}.*checksum mismatch in tensor '{key}'"):
        fisher.block("model.layers.1.mlp.down_proj")
    with pytest.raises(kf.FileFormatError, match="checksum"):
        kf.load(bad, verify=True)


def test_file_replaced_after_load_is_not_read_stale(kfac_qwen, ekfac_qwen, tmp_path):
    path = kfac_qwen[1].save(tmp_path / "f.safetensors")
    fisher = kf.load(path)
    ekfac_qwen[1].save(path)  # atomically replaced by other factors
    with pytest.raises(kf.FileFormatError, match="changed on disk"):
        fisher.block("lm_head")


def test_not_a_factor_file_and_newer_format(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(kf.FileFormatError, match="not a kronfisher factor file"):
        kf.load(plain)
    newer = tmp_path / "newer.safetensors"
    katomic.atomic_write(
        newer, {}, {"format": "kronfisher", "format_version": 99, "library_version": "9.0", "tensors": {}}
    )
    with pytest.raises(kf.FileFormatError, match=r"format version 99.*upgrade"):
        kf.load(newer)


def test_no_pickle_anywhere(saved, monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("pickle / torch.load used on a factor file")

    for mod, name in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
        monkeypatch.setattr(mod, name, forbidden)
    fisher = kf.load(saved, verify=True)
    for name in fisher.layer_names:
        fisher.block(name)
    kf.load_sums(saved)
    data = saved.read_bytes()
    n = int.from_bytes(data[:8], "little")
    assert data[8:9] == b"{" and data[8 + n - 1 : 8 + n] in (b"}", b" ")  # a JSON header, then raw tensor bytes


# Fingerprints ---------------------------------------------------------------------------------------------------
def test_fingerprint_mismatch_lists_layers(saved):
    # Reference: the shapes follow from the tiny configs (hidden 16, vocab 40 vs 41, Qwen2 q/k/v biases).
    with pytest.raises(kf.FingerprintError, match="lm_head") as err:
        kf.load(saved, model=make_model("qwen2", vocab=41))
    assert err.value.mismatched == [("lm_head", "[40, 16, 0]", "[41, 16, 0]")]
    with pytest.raises(kf.FingerprintError) as err:
        kf.load(saved, model=make_model("llama"))
    qkv = {f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkv"}
    assert {n for n, _, _ in err.value.mismatched} == qkv
    assert all(found.endswith(", 0]") and exp.endswith(", 1]") for _, exp, found in err.value.mismatched)
    with pytest.raises(kf.FingerprintError) as err:
        kf.merge_files([saved], saved.parent / "x.safetensors", model=make_model("llama"))
    assert {n for n, _, _ in err.value.mismatched} == qkv
    frozen = make_model("qwen2").requires_grad_(False)  # frozen layers still count for the fingerprint
    kf.load(saved, model=frozen)
    assert kf.model_fingerprint(frozen)["model.layers.0.self_attn.q_proj"] == [16, 16, 1]


# Lazy loading and inspection -------------------------------------------------------------------------------------
def test_lazy_loading_defers_reads(saved, kfac_qwen, monkeypatch):
    model, original = kfac_qwen
    reads: list[str] = []
    real = kio.read_tensors

    def counting(header, keys):
        keys = list(keys)
        reads.extend(keys)
        return real(header, keys)

    monkeypatch.setattr(kio, "read_tensors", counting)
    fisher = kf.load(saved, model=model)
    repr(fisher)
    kf.inspect_file(saved)
    assert fisher.layer_names == original.layer_names and reads == []
    q, k = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"
    fisher.block(q)
    assert reads and all(key.startswith(f"block:{q}:") for key in reads)
    reads.clear()
    fisher.block(k)  # k_proj shares q_proj's A (same input): only its own G is read
    assert sorted(reads) == [f"block:{k}:G.values", f"block:{k}:G.vectors"]
    assert fisher.block(k).A is fisher.block(q).A
    reads.clear()
    fisher.power(_vectors(model, original), -1.0)
    assert reads and not any(key.startswith((f"block:{q}:", f"block:{k}:")) for key in reads)
    reads.clear()
    fisher.power(_vectors(model, original), -1.0)
    assert reads == []  # loaded once, kept


def test_inspect_file_matches_sums(kfac_qwen, saved, tmp_path):
    _, fisher = kfac_qwen
    rows = {r["name"]: r for r in kf.inspect_file(saved)}
    disc_infos = fisher.infos
    assert list(rows) == fisher.layer_names
    for name, s in fisher.sums.items():
        r = rows[name]
        info = disc_infos[name]
        assert (r["in"], r["out"], r["T"], r["N"]) == (info.in_features, info.out_features, s.A.count, s.G.count)
        # Traces from the eigenvalues agree with traces of the raw sums (float64 eigh, rtol 1e-10).
        assert r["trace_A"] == pytest.approx(float(s.A.sum.trace()) / s.A.count, rel=1e-10)
        g_tr = float(s.G.raw_columns(torch.float64).square().sum()) if name == "lm_head" else float(s.G.sum.trace())
        assert r["trace_G"] == pytest.approx(g_tr / s.G.count, rel=1e-10)
        assert r["representation"] == ("lowrank" if name == "lm_head" else "dense")
    sums_path = kf.save_sums(tmp_path / "s.safetensors", fisher.infos, fisher.sums, fisher.cfg)
    srows = {r["name"]: r for r in kf.inspect_file(sums_path)}
    for name in rows:
        assert srows[name]["trace_A"] == pytest.approx(rows[name]["trace_A"], rel=1e-10)
        assert srows[name]["trace_G"] == pytest.approx(rows[name]["trace_G"], rel=1e-10)


def test_tensors_are_read_by_byte_range_in_every_stored_dtype(tmp_path) -> None:
    """The reader reads each tensor's byte range (no whole-file mmap, which a host refuses for files larger than its
    memory): every dtype the format stores, and an empty tensor, come back bit for bit."""
    from kronfisher.io.format import Payload, read_header, read_tensors
    from kronfisher.io.sums import write_file

    g = torch.Generator().manual_seed(0)
    tensors = {
        "f64": torch.randn(3, 5, dtype=torch.float64, generator=g),
        "bf16": torch.randn(7, dtype=torch.float32, generator=g).to(torch.bfloat16),
        "i64": torch.arange(4, dtype=torch.int64),
        "empty": torch.empty(0, 3),
    }
    payload = Payload()
    for k, t in tensors.items():
        payload.add(k, t)
    path = write_file(tmp_path / "t.safetensors", payload, {"format": "kronfisher", "format_version": 1})
    back = read_tensors(read_header(path), list(tensors))
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape and torch.equal(back[k], t), k

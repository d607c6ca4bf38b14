"""Factor files written tensor by tensor (docs/files.md#format): the bytes, the atomicity, the memory held.

References: ``safetensors.torch.save_file`` (the same file, byte for byte), ``safetensors.safe_open`` (an
independent reader), numpy's own little-endian byte order, and counts of the bytes each write and copy holds.
"""

from __future__ import annotations

import io
import json
import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import kronfisher as kf
import kronfisher.io.atomic as katomic
import kronfisher.io.format as kformat
import kronfisher.io.stream as kstream
from conftest import make_model, random_ids
from kronfisher.io.format import Payload, Rows, read_header, read_tensors, tensor_digest
from kronfisher.io.sums import write_file


def _tensors() -> dict[str, torch.Tensor]:
    """Every dtype the format stores, empty and 0-d tensors, and strided views (one sharing another's storage)."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 10, generator=g)
    return {
        "f32": torch.randn(4, 5, generator=g),
        "f64": torch.randn(3, 5, dtype=torch.float64, generator=g),
        "bf16": torch.randn(7, generator=g).to(torch.bfloat16),
        "f16": torch.randn(2, 3, generator=g).to(torch.float16),
        "i64": torch.arange(-4, 5, dtype=torch.int64),
        "i32": torch.arange(6, dtype=torch.int32).reshape(2, 3),
        "i16": torch.arange(5, dtype=torch.int16),
        "i8": torch.arange(-3, 3, dtype=torch.int8),
        "u8": torch.arange(250, 256, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "empty": torch.empty(0, 3),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "transposed": base.t(),  # strided
        "every_other": base[:, ::2],  # strided, on base's storage
        "base": base,
    }


def _write(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None, limit: int | None = None) -> bytes:
    buf = io.BytesIO()
    kstream.write_tensors(buf, tensors, metadata, limit)
    return buf.getvalue()


def _reference(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None, path: Path) -> bytes:
    # save_file wants contiguous tensors on their own storages
    save_file({k: t.contiguous().clone() for k, t in tensors.items()}, str(path), metadata=metadata)
    return path.read_bytes()


@pytest.mark.parametrize("limit", [None, 7, 64])
def test_bytes_are_those_of_the_safetensors_writer(limit, tmp_path) -> None:
    """One metadata key (save_file orders several by a hash map): the same file, byte for byte, at any chunk size."""
    tensors = _tensors()
    metadata = {"kronfisher": json.dumps({"quote": '"', "back": "\\", "nl": "\n", "tab": "\t"}) + " é ∑ \x01"}
    assert _write(tensors, metadata, limit) == _reference(tensors, metadata, tmp_path / "ref.safetensors")
    assert _write(tensors, None, limit) == _reference(tensors, None, tmp_path / "ref0.safetensors")


def test_several_metadata_keys_same_header_and_payload(tmp_path) -> None:
    tensors = _tensors()
    metadata = {"kronfisher": '{"a": 1}', "kronfisher_sha256": "0" * 64, "third": "x"}
    ours, ref = _write(tensors, metadata), _reference(tensors, metadata, tmp_path / "ref.safetensors")
    n = int.from_bytes(ours[:8], "little")
    assert len(ours) == len(ref) and ours[:8] == ref[:8] and ours[8 + n :] == ref[8 + n :]
    assert json.loads(ours[8 : 8 + n]) == json.loads(ref[8 : 8 + n])


def test_read_back_by_safe_open_and_by_kronfisher(tmp_path) -> None:
    tensors = _tensors()
    path = tmp_path / "t.safetensors"
    katomic.write_safetensors(tensors, str(path), {"k": "v"})
    assert katomic.payload_bytes(tensors, {"k": "v"}) == path.stat().st_size
    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == sorted(tensors)
        for k, t in tensors.items():
            back = f.get_tensor(k)
            assert back.dtype == t.dtype and back.shape == t.shape and torch.equal(back, t), k
    payload = Payload()
    for k, t in tensors.items():
        assert payload.add(k, t) == k
    meta = {"format": "kronfisher", "format_version": 1}
    path = write_file(tmp_path / "k.safetensors", payload, meta)
    assert kf.verify_file(path)["tensors"]["bf16"]["dtype"] == "bfloat16"
    back = read_tensors(read_header(path), list(tensors))
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape and torch.equal(back[k], t), k


def test_rows_are_the_bytes_and_digest_of_their_concatenation(tmp_path) -> None:
    g = torch.Generator().manual_seed(2)
    chunks = (torch.randn(3, 5, generator=g), torch.randn(1, 5, generator=g), torch.randn(4, 5, generator=g)[::2])
    rows, cat = Rows(chunks), torch.cat(chunks)
    assert rows.shape == cat.shape and rows.numel() == cat.numel() and tensor_digest(rows) == tensor_digest(cat)
    other = {"a": torch.arange(3.0)}
    ref = _reference({**other, "w": cat}, {"k": "v"}, tmp_path / "ref.safetensors")
    assert _write({**other, "w": rows}, {"k": "v"}, 16) == ref
    payload = Payload()
    assert payload.add("w", rows) == "w" and payload.add("same", cat) == "w"  # stored once, by content
    with pytest.raises(ValueError, match="Rows"):
        Rows((torch.zeros(2, 3), torch.zeros(2, 4)))


def test_saved_operator_loads_and_verifies(tmp_path, monkeypatch) -> None:
    """A fitted operator (dense layers; lm_head's implicit low-rank basis in one column chunk per batch) is saved
    without concatenating the chunks, verifies, and loads back to the same tensors."""
    model = make_model("qwen2")
    cfg = kf.KFACConfig(accumulate_dtype="float64", lowrank_layers=("lm_head",))
    fisher = kf.fit(model, [{"input_ids": random_ids(2, 6, seed=s)} for s in range(3)], cfg)
    assert len(fisher.block("lm_head").G.columns.chunks) == 3

    def no_cat(*args, **kwargs):
        raise AssertionError("torch.cat while saving")

    monkeypatch.setattr(torch, "cat", no_cat)
    path = fisher.save(tmp_path / "f.safetensors")
    monkeypatch.undo()
    kf.verify_file(path)
    loaded = kf.load(path, model=model)
    for name in fisher.layer_names:
        a, b = fisher.block(name), loaded.block(name)
        for x, y in ((a.A, b.A), (a.G, b.G)):
            assert x.kind == y.kind and torch.equal(x.values, y.values), name
            if x.kind == "lowrank":
                assert torch.equal(torch.cat(x.columns.chunks), torch.cat(y.columns.chunks)), name
                assert torch.equal(x.coeffs, y.coeffs), name
            else:
                assert torch.equal(x.vectors, y.vectors), name
    kf.verify_file(fisher.save(tmp_path / "s.safetensors", include_sums=True))


def test_failure_mid_write_leaves_no_file(tmp_path, monkeypatch) -> None:
    real = kstream.byte_chunks
    calls = []

    def second_chunk_fails(t, limit=None):
        for chunk in real(t, limit):
            calls.append(len(chunk))
            if len(calls) == 2:
                raise OSError("disk full (simulated)")
            yield chunk

    monkeypatch.setattr(kstream, "byte_chunks", second_chunk_fails)
    target = tmp_path / "f.safetensors"
    with pytest.raises(OSError, match="simulated"):
        katomic.atomic_write(target, _tensors(), {"k": 1})
    assert len(calls) == 2 and os.listdir(tmp_path) == []  # neither the file nor a temporary one
    monkeypatch.undo()
    katomic.atomic_write(target, _tensors(), {"k": 1})
    before = target.read_bytes()
    monkeypatch.setattr(kstream, "byte_chunks", second_chunk_fails)
    calls.clear()
    with pytest.raises(OSError, match="simulated"):
        katomic.atomic_write(target, {"x": torch.zeros(5), "y": torch.ones(3)}, {"k": 2})
    assert target.read_bytes() == before and os.listdir(tmp_path) == ["f.safetensors"]


class _Recorder(io.BytesIO):
    """A file that records the size of every write."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def write(self, b) -> int:  # type: ignore[override]
        self.sizes.append(memoryview(b).nbytes)
        return super().write(b)


def test_no_write_and_no_copy_exceeds_one_chunk(monkeypatch) -> None:
    """With a 1 KiB chunk: every write after the header, and every host copy of a strided tensor, is ≤ 1 KiB."""
    limit = 1024
    g = torch.Generator().manual_seed(1)
    big = torch.randn(64, 100, generator=g)  # 25,600 bytes
    tensors = {"contiguous": big, "transposed": big.t(), "wide_rows": torch.randn(3, 4, 700, generator=g)[:, ::2]}
    copies: list[int] = []
    real_contiguous = torch.Tensor.contiguous

    def counting(self, *args, **kwargs):
        out = real_contiguous(self, *args, **kwargs)
        if out.numel() and out.data_ptr() != self.data_ptr():
            copies.append(out.numel() * out.element_size())
        return out

    monkeypatch.setattr(torch.Tensor, "contiguous", counting)
    fh = _Recorder()
    kstream.write_tensors(fh, tensors, {"k": "v"}, limit)
    monkeypatch.undo()
    head = int.from_bytes(fh.getvalue()[:8], "little") + 8
    assert sum(fh.sizes[1:]) == len(fh.getvalue()) - head
    assert max(fh.sizes[1:]) <= limit and len(fh.sizes) > 60
    assert copies and max(copies) <= limit  # the strided tensors were copied, a slice at a time
    assert fh.getvalue() == _write({k: t.contiguous() for k, t in tensors.items()}, {"k": "v"})


def test_traced_memory_is_one_chunk_not_the_tensor() -> None:
    """tracemalloc sees Python and numpy buffers: writing a 4 MiB tensor allocates well under one 64 KiB chunk."""
    t = torch.randn(1 << 20)
    tracemalloc.start()
    try:
        t.numpy().tobytes()  # what a writer that copies the tensor would allocate: the probe sees it
        copied = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        with open(os.devnull, "wb") as sink:
            kstream.write_tensors(sink, {"t": t}, {"k": "v"}, 64 << 10)
        streamed = tracemalloc.get_traced_memory()[1] - tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert copied >= t.numel() * 4
    assert streamed < 64 << 10


def test_big_endian_host_writes_little_endian(monkeypatch) -> None:
    t = torch.arange(5, dtype=torch.float32) + 0.5
    monkeypatch.setattr(kstream.sys, "byteorder", "big")  # the writer swaps the native (here little) bytes
    swapped = b"".join(bytes(c) for c in kstream.byte_chunks(t, 8))
    monkeypatch.undo()
    assert swapped == t.numpy().astype(">f4").tobytes()
    assert b"".join(bytes(c) for c in kstream.byte_chunks(t, 8)) == t.numpy().astype("<f4").tobytes()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_accelerator_tensor_is_copied_a_slice_at_a_time() -> None:
    t = torch.randn(300, 50, device="cuda")
    chunks = list(kstream.byte_chunks(t, 1000))
    assert max(np.asarray(c).nbytes for c in chunks) <= 1000
    assert b"".join(bytes(c) for c in chunks) == t.cpu().numpy().tobytes()


def test_payload_keeps_a_column_major_basis_uncopied_and_hashes_it_in_slices(tmp_path, monkeypatch) -> None:
    """An eigenbasis is column-major (``torch.linalg.eigh``): the payload registers it without a copy, its digest
    is that of its row-major bytes, computed a few rows at a time, and the file holds those bytes (as
    ``save_file`` writes the contiguous tensor)."""
    basis = torch.randn(96, 96, dtype=torch.float64).mT  # column-major, like an eigh result
    assert not basis.is_contiguous()
    monkeypatch.setattr(kformat, "DIGEST_SLICE_BYTES", 10 * 96 * 8)  # ten rows per slice
    payload = Payload()
    key = payload.add("v", basis)
    held = payload.tensors[key]
    assert held.data_ptr() == basis.data_ptr() and not held.is_contiguous()  # no whole copy is held
    assert payload.entries[key]["sha256"] == tensor_digest(basis.contiguous())
    mine, ref = tmp_path / "mine.safetensors", tmp_path / "ref.safetensors"
    with open(mine, "wb") as fh:
        kstream.write_tensors(fh, payload.prepared()[0], {"k": "v"})
    save_file({"v": basis.contiguous()}, str(ref), metadata={"k": "v"})
    assert mine.read_bytes() == ref.read_bytes()

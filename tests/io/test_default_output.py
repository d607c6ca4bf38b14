"""Factor files sized for a first run: no raw sums unless asked, shared A eigenbases stored once, eigenbases in the
storage dtype, and loading gives the blocks that were saved, bit for bit. Merge asks for files with sums, and the
command's default files still inspect, load and resume.

References: the in-memory operator the file was written from (``torch.equal``), and the tensor index of the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import kronfisher as kf
from conftest import make_model, random_ids
from kronfisher.cli import main
from test_cli_helpers import TEXT_A, build_model, save_model

BATCHES = [{"input_ids": random_ids(2, 8, seed=s)} for s in range(2)]
SHARED = {  # layers of one block that read the same input tensor, so their A is one decomposition
    "qkv": [f"model.layers.0.self_attn.{x}_proj" for x in "qkv"],
    "gate_up": [f"model.layers.0.mlp.{x}_proj" for x in ("gate", "up")],
}


def _nbytes(meta: dict) -> int:
    size = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}
    total = 0
    for e in meta["tensors"].values():
        n = 1
        for d in e["shape"]:
            n *= d
        total += n * size[e["dtype"]]
    return total


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_default_file_has_no_sums_one_shared_A_and_the_storage_dtype(dtype: str, tmp_path: Path) -> None:
    model = make_model("qwen2", dtype=torch.float32)
    fisher = kf.fit(model, BATCHES, kf.KFACConfig(accumulate_dtype=dtype, lowrank_layers=("lm_head",), ekfac=True))
    path = kf.save(fisher, tmp_path / "f.safetensors", model=model)
    meta = kf.read_metadata(path)
    assert "sums" not in meta and not any(k.startswith("sums:") for k in meta["tensors"])
    for layers in SHARED.values():  # one A tensor per distinct input, referenced by every layer reading it
        assert len({meta["blocks"][n]["A"]["vectors"] for n in layers}) == 1
    a_keys = {meta["blocks"][n]["A"]["vectors"] for n in meta["blocks"]}
    assert len(a_keys) == 4 * 2 + 1  # per block: qkv, o, gate/up, down inputs; plus lm_head
    # Eigenbases, eigenvalues and EK-FAC values in the storage dtype; low-rank columns in lowrank_dtype (float32).
    floats = {k: e["dtype"] for k, e in meta["tensors"].items()}
    assert {d for k, d in floats.items() if not k.endswith(".columns")} == {dtype}
    assert {d for k, d in floats.items() if k.endswith(".columns")} == {"float32"}
    # With sums the file holds both, and the sums are what makes it bigger.
    with_sums = kf.read_metadata(kf.save(fisher, tmp_path / "s.safetensors", include_sums=True))
    assert "sums" in with_sums and _nbytes(with_sums) > 1.5 * _nbytes(meta)

    loaded = kf.load(path, model=model)
    for name in fisher.layer_names:  # bit for bit what was saved
        a, b = fisher.block(name), loaded.block(name)
        for x, y in ((a.A, b.A), (a.G, b.G)):
            assert torch.equal(x.values, y.values) and torch.equal(x.vectors, y.vectors) and x.tail == y.tail
        assert torch.equal(a.corrected, b.corrected)
    for layers in SHARED.values():  # read once and shared after loading too
        assert len({id(loaded.block(n).A) for n in layers}) == 1
    assert loaded.sums is None


def test_merge_of_files_without_sums_says_how_to_save_them(tmp_path: Path) -> None:
    model = make_model("llama")
    fisher = kf.fit(model, BATCHES[:1], kf.KFACConfig(accumulate_dtype="float64"))
    with_sums = fisher.save(tmp_path / "a.safetensors", include_sums=True)
    without = fisher.save(tmp_path / "b.safetensors")
    with pytest.raises(kf.FileFormatError) as err:
        kf.merge_files([with_sums, without], tmp_path / "m.safetensors")
    assert "b.safetensors" in str(err.value) and "no raw sums" in str(err.value)
    assert "include_sums=True" in err.value.hint and "--save-sums" in err.value.hint
    assert not (tmp_path / "m.safetensors").exists()


def test_command_default_files_inspect_resume_and_merge_only_with_sums(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    save_model(build_model("llama", seed=1, tie=True), tmp_path / "m")
    (tmp_path / "t.txt").write_text(TEXT_A)
    args = ["analyze", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "t.txt"), "--no-plots", "--quiet"]
    args += ["--seq-len", "16", "--batch-size", "2"]
    assert main([*args, "--output-dir", str(tmp_path / "a")]) == 0
    assert main([*args, "--output-dir", str(tmp_path / "b"), "--save-sums"]) == 0
    name = json.loads((tmp_path / "a" / "report.json").read_text())["models"][0]["factor_file"]
    plain, summed = tmp_path / "a" / name, tmp_path / "b" / name
    assert "sums" not in kf.read_metadata(plain) and "sums" in kf.read_metadata(summed)
    capsys.readouterr()
    assert main(["inspect", str(plain), "--verify"]) == 0
    assert "lm_head" in capsys.readouterr().out
    before = plain.stat().st_mtime_ns
    assert main([*args, "--output-dir", str(tmp_path / "a"), "--resume"]) == 0  # complete: reused, not rewritten
    assert plain.stat().st_mtime_ns == before
    assert main(["merge", str(tmp_path / "m.safetensors"), str(summed), str(plain)]) == 2
    err = capsys.readouterr().err
    assert "holds no raw sums" in err and "--save-sums" in err

"""Factor files know the weights they were computed from, and say what is wrong with a file.

References: two tiny models of one architecture that differ only in their random seed (same shapes, other
weights); a three-layer model carrying the two-layer model's weights (a superset); files with the weight digests
removed (as written before the digests existed); and bytes flipped in a file's header. Every refusal is asserted
by its exception class and by the layer and file it names.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import kronfisher as kf
import kronfisher.io.atomic as katomic
import kronfisher.io.fingerprint as kfp
from conftest import make_model, random_ids, tiny_config
from kronfisher.cli import main
from kronfisher.errors import CorruptedFileError
from test_cli_helpers import TEXT_A, TEXT_B, build_model, save_model

BATCHES = [{"input_ids": random_ids(2, 6, seed=s)} for s in range(4)]
CFG = {"accumulate_dtype": "float64", "lowrank_layers": ("lm_head",)}
Q0 = "model.layers.0.self_attn.q_proj"


def _save(model: torch.nn.Module, path: Path, batches: list = BATCHES[:2], **cfg) -> Path:
    return kf.fit(model, batches, kf.KFACConfig(**{**CFG, **cfg})).save(path, include_sums=True)  # mergeable


def _without_weight_digests(src: Path, dst: Path) -> Path:
    """``src`` as a kronfisher version before the weight digests would have written it (no ``"weights"``)."""
    meta = kf.read_metadata(src)
    del meta["weights"]
    katomic.atomic_write(dst, load_file(str(src)), meta)
    return dst


def _superset(arch: str, small: torch.nn.Module) -> torch.nn.Module:
    """A three-layer model whose first two layers, embeddings and head are ``small``'s."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(arch, layers=3)
    torch.manual_seed(9)
    big = AutoModelForCausalLM.from_config(cfg).to(torch.float64).eval()
    assert not big.load_state_dict(small.state_dict(), strict=False).unexpected_keys
    return big


@pytest.fixture(scope="module")
def qwen_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save(make_model("qwen2", seed=0), tmp_path_factory.mktemp("fp") / "q0.safetensors")


# Other weights ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_name", ["qwen2", "gpt2"])
def test_load_refuses_factors_of_other_weights_naming_the_layers(model_name: str, tmp_path: Path) -> None:
    path = _save(make_model(model_name, seed=0), tmp_path / "f.safetensors")
    layers = list(kf.read_metadata(path)["fingerprint"])  # file order: the message names the first ones
    with pytest.raises(kf.FingerprintError) as err:
        kf.load(path, model=make_model(model_name, seed=1))  # same architecture and shapes, other random weights
    assert str(path) in str(err.value) and "other weights" in str(err.value)
    assert [n for n, _, _ in err.value.mismatched] == layers  # every layer's weights differ
    assert layers[0] in str(err.value)
    kf.load(path, model=make_model(model_name, seed=0))  # the same weights


def test_same_weights_in_float32_match_but_a_bfloat16_cast_does_not(qwen_file: Path) -> None:
    # The file was written from float64 weights; the digest hashes float32 values, so the float32 copy of the
    # same weights matches, while bfloat16 rounds them (other weights, other Fisher) and the dtypes are named.
    kf.load(qwen_file, model=make_model("qwen2", seed=0, dtype=torch.float32))
    with pytest.raises(kf.FingerprintError, match=r"float64 weights, the model is bfloat16") as err:
        kf.load(qwen_file, model=make_model("qwen2", seed=0, dtype=torch.bfloat16))
    assert Q0 in str(err.value)


def test_weight_digest_depends_on_values_not_memory_layout(qwen_file: Path) -> None:
    model = make_model("qwen2", seed=0)
    with torch.no_grad():
        for name in ("lm_head", Q0):  # the same values, stored transposed (non-contiguous)
            mod = model.get_submodule(name)
            mod.weight = torch.nn.Parameter(mod.weight.t().contiguous().t())
    assert not model.get_submodule(Q0).weight.is_contiguous()
    kf.load(qwen_file, model=model)
    with torch.no_grad():
        model.get_submodule(Q0).weight.mul_(1.0 + 1e-6)  # every value of one layer changes a little
    with pytest.raises(kf.FingerprintError) as err:
        kf.load(qwen_file, model=model)
    assert [n for n, _, _ in err.value.mismatched] == [Q0]


def test_save_records_the_weights_of_the_model_fit_attached(qwen_file: Path, tmp_path: Path) -> None:
    meta = kf.read_metadata(qwen_file)
    assert set(meta["weights"]["layers"]) == set(meta["fingerprint"]) and meta["weights"]["dtype"] == "float64"
    loaded = kf.load(qwen_file)  # no model: the file's digests travel with the operator and are saved again
    again = loaded.save(tmp_path / "again.safetensors", include_sums=False)
    assert kf.read_metadata(again)["weights"] == meta["weights"]
    with pytest.raises(kf.FingerprintError, match="being written"):
        loaded.save(tmp_path / "x.safetensors", model=make_model("qwen2", seed=1))
    assert not (tmp_path / "x.safetensors").exists()


# Superset models --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_name", ["qwen2", "gpt2"])
def test_superset_model_is_refused_unless_allow_subset(model_name: str, tmp_path: Path) -> None:
    small = make_model(model_name, seed=0)
    path = _save(small, tmp_path / "f.safetensors")
    big = _superset(model_name, small)
    extra = "model.layers.2.mlp.down_proj" if model_name == "qwen2" else "transformer.h.2.mlp.c_proj"
    with pytest.raises(kf.FingerprintError, match="allow_subset") as err:
        kf.load(path, model=big)
    assert str(path) in str(err.value) and extra in {n for n, _, _ in err.value.mismatched}
    assert "lacks" in str(err.value) and "--allow-subset" in (err.value.hint or "")
    fisher = kf.load(path, model=big, allow_subset=True)
    assert extra not in fisher.layer_names and fisher.layer_names == kf.load(path).layer_names


def test_layers_outside_the_file_selection_or_frozen_are_not_a_superset(tmp_path: Path) -> None:
    model = make_model("qwen2", seed=0)
    mlp = _save(model, tmp_path / "mlp.safetensors", include=("mlp",))
    kf.load(mlp, model=model)  # attention layers and lm_head were never selected
    path = _save(model, tmp_path / "all.safetensors")
    big = _superset("qwen2", model)
    for name, p in big.named_parameters():
        p.requires_grad_(".layers.2." not in name)
    kf.load(path, model=big)  # the extra layer is frozen: no gradient to precondition


# Merge ------------------------------------------------------------------------------------------------------------
def test_merge_refuses_files_of_other_weights_naming_layers_and_files(qwen_file: Path, tmp_path: Path) -> None:
    other = _save(make_model("qwen2", seed=1), tmp_path / "q1.safetensors", BATCHES[2:])
    out = tmp_path / "m.safetensors"
    with pytest.raises(kf.FingerprintError) as err:
        kf.merge_files([qwen_file, other], out)
    msg = str(err.value)
    assert str(qwen_file) in msg and str(other) in msg and Q0 in msg and "different model weights" in msg
    assert {n for n, _, _ in err.value.mismatched} == set(kf.read_metadata(other)["fingerprint"])
    assert not out.exists()


def test_merged_file_keeps_the_weight_digests(qwen_file: Path, tmp_path: Path) -> None:
    second = _save(make_model("qwen2", seed=0), tmp_path / "b.safetensors", BATCHES[2:])
    out = kf.merge_files([qwen_file, second], tmp_path / "m.safetensors")
    assert kf.read_metadata(out)["weights"] == kf.read_metadata(qwen_file)["weights"]
    kf.load(out, model=make_model("qwen2", seed=0))
    with pytest.raises(kf.FingerprintError, match="other weights"):
        kf.load(out, model=make_model("qwen2", seed=1))
    with pytest.raises(kf.FingerprintError, match="other weights"):  # merge_files(model=) checks each input
        kf.merge_files([qwen_file, second], tmp_path / "x.safetensors", model=make_model("qwen2", seed=1))
    big = _superset("qwen2", make_model("qwen2", seed=0))
    with pytest.raises(kf.FingerprintError, match=r"model\.layers\.2\."):
        kf.merge_files([qwen_file, second], tmp_path / "x.safetensors", model=big)
    kf.merge_files([qwen_file, second], tmp_path / "x.safetensors", model=big, allow_subset=True)


def test_files_without_weight_digests_are_checked_on_shapes_only(qwen_file: Path, tmp_path: Path) -> None:
    old = _without_weight_digests(qwen_file, tmp_path / "old.safetensors")
    kf.load(old, model=make_model("qwen2", seed=1))  # cannot be told apart: shapes agree
    with pytest.raises(kf.FingerprintError, match=r"\[out, in, has_bias\]"):
        kf.load(old, model=make_model("llama", seed=0))  # shapes still checked (no q/k/v bias)
    second = _save(make_model("qwen2", seed=0), tmp_path / "b.safetensors", BATCHES[2:])
    out = kf.merge_files([old, second], tmp_path / "m.safetensors")
    merged = kf.load(out)
    assert kf.read_metadata(out)["weights"] is None  # they would vouch for the unchecked file's data
    assert any(str(old) in w and "no weight digests" in w for w in merged.report.warnings)


# EK-FAC inputs ----------------------------------------------------------------------------------------------------
def test_merge_of_ekfac_files_is_kfac_in_the_metadata_and_inspect(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = make_model("qwen2", seed=0)
    a = _save(model, tmp_path / "a.safetensors", BATCHES[:2], ekfac=True)
    b = _save(model, tmp_path / "b.safetensors", BATCHES[2:], ekfac=True)
    assert main(["inspect", str(a)]) == 0 and "ekfac=True;" in capsys.readouterr().out
    assert main(["merge", str(tmp_path / "m.safetensors"), str(a), str(b)]) == 0
    capsys.readouterr()
    meta = kf.read_metadata(tmp_path / "m.safetensors")
    assert meta["config"]["ekfac"] is False and not any(r["ekfac"] for r in meta["layers"].values())
    assert [m["ekfac"] for m in meta["extra"]["merged_from"]] == [True, True]
    assert not kf.load(tmp_path / "m.safetensors").is_ekfac
    assert main(["inspect", str(tmp_path / "m.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "ekfac=False (merged: EK-FAC eigenvalues are not mergeable" in out and "ekfac=True" not in out


# Messages and hints -----------------------------------------------------------------------------------------------
def test_merge_refusals_carry_their_own_hint_not_truncated(
    qwen_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = make_model("qwen2", seed=0)
    reduce = _save(model, tmp_path / "r.safetensors", BATCHES[2:], approx="reduce")
    nosums = kf.fit(model, BATCHES[2:], kf.KFACConfig(**CFG)).save(tmp_path / "n.safetensors", include_sums=False)
    other = _save(make_model("qwen2", seed=1), tmp_path / "q1.safetensors", BATCHES[2:])
    cases = [
        ([qwen_file, reduce], "approx", "same options"),
        ([qwen_file, qwen_file], "counted twice", "once"),
        ([qwen_file, nosums], "no raw sums", "--save-sums"),
        ([qwen_file, other], "different model weights", "same model weights"),
    ]
    for inputs, what, hint in cases:
        assert main(["merge", str(tmp_path / "m.safetensors"), *map(str, inputs)]) == 2
        err = capsys.readouterr().err
        assert what in err and hint in err.split("hint:")[1] and "truncated" not in err, err
        assert str(inputs[-1]) in err and "Traceback" not in err
    assert not (tmp_path / "m.safetensors").exists()


def test_flipped_header_byte_is_reported_as_corrupted_not_foreign(qwen_file: Path, tmp_path: Path) -> None:
    data = qwen_file.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    header = data[8:header_end]
    # The byte the user report flipped (in "__metadata__"), the kronfisher keys, and a sample of the rest.
    targeted = [14] + [8 + header.index(k) + 3 for k in (b'"__metadata__"', b'"kronfisher"', b'"kronfisher_sha256"')]
    positions = targeted + random.Random(0).sample(range(header_end), 150)
    bad = tmp_path / "bad.safetensors"
    for pos in positions:
        flipped = bytearray(data)
        flipped[pos] ^= 0x04
        bad.write_bytes(bytes(flipped))
        with pytest.raises(CorruptedFileError) as err:
            kf.load(bad)
        assert str(bad) in str(err.value) and "not a kronfisher" not in str(err.value), (pos, str(err.value))


def test_foreign_file_is_not_ours_and_a_damaged_one_says_so_in_the_cli(
    qwen_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for i, metadata in enumerate((None, {"format": "pt"})):
        plain = tmp_path / f"plain{i}.safetensors"
        save_file({"w": torch.zeros(2)}, str(plain), metadata=metadata)
        with pytest.raises(kf.FileFormatError, match="not a kronfisher factor file") as err:
            kf.load(plain)
        assert not isinstance(err.value, CorruptedFileError)
    assert main(["inspect", str(plain)]) == 2
    err = capsys.readouterr().err
    assert "not a kronfisher factor file" in err and "written by kronfisher" in err and "truncated" not in err
    damaged = tmp_path / "damaged.safetensors"
    flipped = bytearray(qwen_file.read_bytes())
    flipped[14] ^= 0x04
    damaged.write_bytes(bytes(flipped))
    assert main(["inspect", str(damaged)]) == 2
    err = capsys.readouterr().err
    assert "corrupted" in err and "damaged" in err.split("hint:")[1]


# Command line: inspect --model and --resume ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("fpcli")
    save_model(build_model("qwen2", seed=0), d / "m")
    (d / "t.txt").write_text(TEXT_A + TEXT_B)
    assert main(_analyze(d, str(d / "m"))) == 0
    return d


def _analyze(d: Path, model: str) -> list[str]:
    args = ["analyze", "--model", model, "--data", str(d / "t.txt"), "--output-dir", str(d / "out"), "--no-plots"]
    args += ["--save-sums"]  # the resume test below builds a checkpoint from the file's sums
    return [*args, "--seq-len", "12", "--batch-size", "2", "--max-tokens", "120", "--lowrank-threshold", "64"]


def _factor_file(d: Path) -> Path:
    report = json.loads((d / "out" / "report.json").read_text())
    return d / "out" / report["models"][0]["factor_file"]


def test_inspect_model_with_other_weights_names_the_layers(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = save_model(build_model("qwen2", seed=1), tmp_path / "other")
    assert main(["inspect", str(_factor_file(run_dir)), "--model", str(other)]) == 2
    err = capsys.readouterr().err
    assert "other weights" in err and Q0 in err and str(_factor_file(run_dir)) in err and "Traceback" not in err
    assert main(["inspect", str(_factor_file(run_dir)), "--model", str(run_dir / "m")]) == 0


def test_resume_with_other_weights_is_refused_naming_the_layers(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tmp_path
    save_model(build_model("qwen2", seed=0), d / "m")
    (d / "t.txt").write_text(TEXT_A + TEXT_B)
    # A checkpoint of this run after one batch, as an interrupted run leaves it (same sums file, same identity).
    sf = kf.load_sums(_factor_file(run_dir))
    extra = {"identity": sf.meta["extra"]["identity"], "batches_done": 1, "world_size": 1}
    ckpt = d / "out" / "checkpoints" / f"{_factor_file(run_dir).stem}.sums.safetensors"
    ckpt.parent.mkdir(parents=True)
    kf.save_sums(ckpt, sf.infos, sf.sums, sf.cfg, report=sf.report, model=build_model("qwen2"), extra_meta=extra)
    save_model(build_model("qwen2", seed=1), d / "m")  # the model folder now holds other weights
    assert main([*_analyze(d, str(d / "m")), "--resume", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "other weights" in err and str(ckpt) in err and Q0 in err and "without --resume" in err
    assert ckpt.exists()  # kept: the user may restore the model


def test_weight_digest_is_the_documented_strided_float32_sample() -> None:
    # Reference: the method written out independently: shape, then WEIGHT_SAMPLES values at i * n // k of the
    # row-major flattening, as little-endian float32, weight then bias; SHA-256, first 16 hex digits.
    layer = torch.nn.Linear(300, 7, dtype=torch.float64)  # 2,100 weights: a strided sample; 7 biases: all
    h = hashlib.sha256()
    for t in (layer.weight, layer.bias):
        n = t.numel()
        k = min(n, kfp.WEIGHT_SAMPLES)
        idx = [i * n // k for i in range(k)]
        h.update(f"{list(t.shape)};".encode())
        h.update(t.detach().reshape(-1)[idx].to(torch.float32).numpy().astype("<f4").tobytes())
    assert kfp.weight_digest(layer) == h.hexdigest()[:16]


def test_merge_refuses_an_output_that_is_one_of_its_inputs(qwen_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``kronfisher merge F F`` replaced F by a K-FAC file of itself (EK-FAC dropped); now one line and F unchanged."""
    before = qwen_file.read_bytes()
    assert main(["merge", str(qwen_file), str(qwen_file)]) == 2
    err = capsys.readouterr().err
    assert "also one of its inputs" in err and "hint:" in err and "Traceback" not in err, err
    with pytest.raises(kf.FileFormatError, match="also one of its inputs"):
        kf.merge_files([qwen_file.parent / "." / qwen_file.name], qwen_file)  # the same file, spelled otherwise
    assert qwen_file.read_bytes() == before

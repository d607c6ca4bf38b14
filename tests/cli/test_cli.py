"""End-to-end tests of ``kronfisher analyze`` / ``inspect`` / ``merge`` on tiny saved models (no downloads).

Independent references: the batches are rebuilt by hand (``reference_batches``), the factors by ``kf.fit`` on those
batches, the gradient by autograd on an untied copy of the model, and every spectral number by a dense eigen-
decomposition of the materialised block in float64.
"""

from __future__ import annotations

import base64
import json
import math
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

import kronfisher as kf
from kronfisher.cli import main
from test_cli_helpers import TEXT_A, TEXT_B, build_model, load_saved, reference_batches, save_model

SEQ, BATCH = 16, 3
COMMON = ["--seq-len", str(SEQ), "--batch-size", str(BATCH), "--dtype", "float64", "--accumulate-dtype", "float64"]
COMMON += ["--lowrank-threshold", "64", "--lowrank-rank", "all", "--eigh-max-dim", "8192", "--quiet"]
COMMON += ["--lowrank-layers", "lm_head"]  # low-rank at any token count (the threshold alone lets the plan choose)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cli")
    save_model(build_model("qwen2", seed=0, tie=True), d / "qwen")
    (d / "a.txt").write_text(TEXT_A, encoding="utf-8")
    (d / "b.txt").write_text(TEXT_B, encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def e2e(workdir: Path) -> tuple[Path, dict]:
    out = workdir / "out"
    rc = main(
        [
            "analyze",
            "--model",
            str(workdir / "qwen"),
            "--data",
            str(workdir / "a.txt"),
            "--output-dir",
            str(out),
            *COMMON,
            "--max-tokens",
            "300",
            "--damping",
            "0.01",
        ]
    )
    assert rc == 0
    return out, json.loads((out / "report.json").read_text())


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: dict[str, bytes] = {}
        self.external: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "img":
            src = a.get("src") or ""
            prefix = "data:image/png;base64,"
            assert src.startswith(prefix), src[:40]
            self.images[a["id"] or ""] = base64.b64decode(src[len(prefix) :], validate=True)
        for key in ("href", "src"):
            v = a.get(key)
            if v and not v.startswith(("data:", "#")):
                self.external.append(v)


def test_files_written_and_html_embeds_every_plot(e2e: tuple[Path, dict]) -> None:
    out, report = e2e
    assert (out / "report.md").read_text().startswith("# kronfisher analysis")
    factor = out / report["models"][0]["factor_file"]
    assert factor.is_file() and not (out / "checkpoints").exists()  # checkpoint removed after success
    parser = _Images()
    parser.feed((out / "report.html").read_text(encoding="utf-8"))
    listed = {f"plot-{p['id']}": p for p in report["plots"]}
    assert len(listed) >= 10  # 9 heatmaps + 2 spectra for one model (some may be skipped only if all-NaN)
    assert set(parser.images) == set(listed)
    assert parser.external == []  # self-contained
    for pid, png in parser.images.items():
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        assert (out / listed[pid]["file"]).read_bytes() == png


def _dense_stats(vals: torch.Tensor) -> dict:
    vals = vals.clamp_min(0).sort(descending=True).values
    p = vals / vals.sum()
    p = p[p > 0]
    k = math.ceil(0.01 * vals.numel())
    return {
        "erank": math.exp(-float((p * p.log()).sum())),
        "share": float(vals[:k].sum() / vals.sum()),
        "top": vals[:5].tolist(),
        "cond": float(vals[0] / vals[-1]) if vals[-1] > 0 else math.inf,
    }


def test_report_numbers_equal_library_and_dense_references(workdir: Path, e2e: tuple[Path, dict]) -> None:
    _out, report = e2e
    model = load_saved(workdir / "qwen")
    batches = reference_batches(workdir / "qwen", [TEXT_A], SEQ, BATCH, max_tokens=300)
    cfg = kf.KFACConfig(accumulate_dtype="float64", lowrank_threshold=64, lowrank_layers=("lm_head",), damping=0.01)
    fisher = kf.fit(model, batches, cfg)
    rows = report["models"][0]["layers"]
    assert list(rows) == fisher.layer_names and len(rows) == 15  # 7 per block x 2 + the tied lm_head
    assert rows["lm_head"]["representation"] == "lowrank" and rows["lm_head"]["tied_with"] == [
        "model.embed_tokens.weight"
    ]
    assert report["data"]["tokens"] == sum(int(b["attention_mask"].sum()) for b in batches)

    # Reference gradient of the mean loss by autograd, with the lm_head untied (its own use only, docs/concepts.md).
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    total, n = 0.0, 0
    for b in batches:
        logits = model(**b).logits[:, :-1]
        tgt = b["input_ids"][:, 1:]
        valid = b["attention_mask"][:, 1:].bool()
        total = total + torch.nn.functional.cross_entropy(logits[valid], tgt[valid], reduction="sum")
        n += int(valid.sum())
    (total / n).backward()
    params = dict(model.named_parameters())
    for name in fisher.layer_names:
        r = rows[name]
        b = fisher.block(name)
        # Same library computation: tight (1e-10).
        assert r["trace_A"] == pytest.approx(b.A.trace(), rel=1e-10)
        assert r["trace_G"] == pytest.approx(b.G.trace(), rel=1e-10)
        # Dense references: float64 eigh of the materialised factors; the Kronecker eigenvalues of G ⊗ A are the
        # products λ^G_i λ^A_j (and of (G + δI) ⊗ (A + δI) the damped products). 1e-7 relative.
        a_dense, g_dense = fisher.factors(name)
        ea, eg = torch.linalg.eigvalsh(a_dense).clamp_min(0), torch.linalg.eigvalsh(g_dense).clamp_min(0)
        assert r["top_eigenvalues_A"] == pytest.approx(_dense_stats(ea)["top"], rel=1e-7)
        assert r["effective_rank_G"] == pytest.approx(_dense_stats(eg)["erank"], rel=1e-7)
        f_vals = torch.outer(eg, ea).reshape(-1)
        ref = _dense_stats(f_vals)
        assert r["effective_rank_F"] == pytest.approx(ref["erank"], rel=1e-7)
        assert r["top1pct_trace_share"] == pytest.approx(ref["share"], rel=1e-7)
        assert r["top_eigenvalues_F"] == pytest.approx(ref["top"], rel=1e-7)
        assert r["trace_F"] == pytest.approx(float(f_vals.sum()), rel=1e-7)
        dv = torch.outer(eg + 0.01, ea + 0.01)  # factored damping (docs/concepts.md)
        assert r["condition_number_damped"] == pytest.approx(float(dv.max() / dv.min()), rel=1e-6)
        # Gradient, natural gradient and their cosine against autograd + a dense solve.
        info = fisher.infos[name]
        w = params[info.weight_name].grad
        bias = params[info.bias_name].grad if info.bias_name else None
        g = torch.cat([w, bias[:, None]], 1) if bias is not None else w  # Linear layout [out, in(+1)]
        # 1e-6: Qwen2's RMSNorm runs in float32 even in a float64 model, and the reference backpropagates
        # the mean loss in one backward while the report sums per-batch summed-loss gradients.
        assert r["grad_norm"] == pytest.approx(float(g.norm()), rel=1e-6)
        eye_a = torch.eye(a_dense.shape[0], dtype=a_dense.dtype)
        eye_g = torch.eye(g_dense.shape[0], dtype=a_dense.dtype)
        ng = torch.linalg.solve(g_dense + 0.01 * eye_g, g) @ torch.linalg.inv(
            a_dense + 0.01 * eye_a
        )  # (G+δ)⁻¹ g (A+δ)⁻¹
        assert r["natgrad_norm"] == pytest.approx(float(ng.norm()), rel=1e-6)
        cos = float((g * ng).sum() / (g.norm() * ng.norm()))
        assert r["cosine_grad_natgrad"] == pytest.approx(cos, rel=1e-6)
    assert report["models"][0]["loss"] == pytest.approx(float(total.detach()) / n, rel=1e-10)


def test_factor_file_round_trip_and_inspect(e2e: tuple[Path, dict], capsys: pytest.CaptureFixture[str]) -> None:
    out, report = e2e
    path = out / report["models"][0]["factor_file"]
    loaded = kf.load(path)
    rows = report["models"][0]["layers"]
    for name in loaded.layer_names:
        assert loaded.block(name).A.trace() == pytest.approx(rows[name]["trace_A"], rel=1e-12)
    assert main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    for name, r in rows.items():
        line = next(ln for ln in text.splitlines() if ln.startswith(name + " "))
        assert r["representation"] in line and str(r["out"]) in line.split()


def _run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = main(args)
    err = capsys.readouterr().err
    return rc, err


def test_truncated_and_corrupted_files_give_a_clear_error(
    e2e: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, report = e2e
    data = (out / report["models"][0]["factor_file"]).read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    rc, err = _run_cli(["inspect", str(cut)], capsys)
    assert rc == 2 and "Traceback" not in err and str(cut) in err and "hint:" in err
    bad = tmp_path / "bad.safetensors"
    flipped = bytearray(data)
    flipped[-10] ^= 0xFF  # inside the last tensor: only the checksum can see it
    bad.write_bytes(bytes(flipped))
    rc, err = _run_cli(["inspect", "--verify", str(bad)], capsys)
    assert rc == 2 and "Traceback" not in err and str(bad) in err
    rc, err = _run_cli(["inspect", str(tmp_path / "missing.safetensors")], capsys)
    assert rc == 2 and "does not exist" in err


def test_mismatched_model_lists_the_layers(
    workdir: Path, e2e: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, report = e2e
    other = save_model(build_model("qwen2", seed=1, tie=True, hidden=8), tmp_path / "narrow")
    rc, err = _run_cli(["inspect", str(out / report["models"][0]["factor_file"]), "--model", str(other)], capsys)
    assert rc == 2 and "Traceback" not in err
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "lm_head"):
        assert name in err


def test_user_errors_are_one_message_with_a_hint(
    workdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    base = ["analyze", "--output-dir", str(tmp_path / "o"), "--quiet"]
    rc, err = _run_cli([*base, "--model", str(tmp_path / "no-such-folder"), "--data", str(workdir / "a.txt")], capsys)
    assert rc == 2 and "does not exist" in err and "hint:" in err and "Traceback" not in err
    rc, err = _run_cli([*base, "--model", str(workdir / "qwen"), "--data", str(tmp_path / "none.txt")], capsys)
    assert rc == 2 and "none.txt" in err and "hint:" in err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc, err = _run_cli([*base, "--model", "kronfisher-tests/no-such-model", "--data", str(workdir / "a.txt")], capsys)
    assert rc == 2 and "offline" in err and "kronfisher-tests/no-such-model" in err and "hint:" in err
    assert "config.json" in err and "not in the cache" in err  # names the missing file (docs/files.md)
    assert "Traceback" not in err
    rc, err = _run_cli(
        [*base, "--model", str(workdir / "qwen"), "--data", str(workdir / "a.txt"), "--include", "zz"], capsys
    )
    assert rc == 2 and "No layer" in err and "15 linear layers" in err and len(err) < 800  # short, not a dump
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"text": "abc def"}\n{"body": "x"}\n')
    rc, err = _run_cli([*base, "--model", str(workdir / "qwen"), "--data", str(jsonl)], capsys)
    assert rc == 2 and "line 2" in err and "'text'" in err and "--text-field" in err


def test_identical_models_have_distance_zero_and_overlap_one(workdir: Path, tmp_path: Path) -> None:
    out = tmp_path / "same"
    model = str(workdir / "qwen")
    args = ["analyze", "--model", model, "--model", model, "--data", str(workdir / "a.txt"), "--output-dir", str(out)]
    assert main(args + COMMON + ["--max-tokens", "200", "--no-plots", "--overlap-k", "4"]) == 0
    report = json.loads((out / "report.json").read_text())
    comp = report["comparisons"][0]
    assert len(comp["layers"]) == 15 and comp["skipped"] == []
    assert comp["total_quadratic_form"] == 0.0
    for r in comp["layers"].values():
        assert r["quadratic_form"] == 0.0 and r["relative_change"] == 0.0
        assert r["overlap_A"] == pytest.approx(1.0, abs=1e-10)  # same factors, same eigenvectors
        assert r["overlap_G"] == pytest.approx(1.0, abs=1e-10)


def test_known_perturbation_gives_the_dense_quadratic_form(tmp_path: Path) -> None:
    """GPT-2 (Conv1D, weight stored [in, out], with biases): ½ vec(ΔV)ᵀ (G ⊗ A) vec(ΔV) computed densely."""
    base = build_model("gpt2", seed=3, tie=True)
    save_model(base, tmp_path / "base")
    other = build_model("gpt2", seed=3, tie=True)
    gen = torch.Generator().manual_seed(7)
    deltas = {}
    with torch.no_grad():
        for name in ("transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj"):
            mod = other.get_submodule(name)
            dw = 0.05 * torch.randn(mod.weight.shape, generator=gen)
            db = 0.05 * torch.randn(mod.bias.shape, generator=gen)
            mod.weight += dw
            mod.bias += db
            deltas[name] = torch.cat([dw.t(), db[:, None]], 1).to(torch.float64)  # V = [W | b] with W [out, in]
    save_model(other, tmp_path / "other")
    (tmp_path / "t.txt").write_text(TEXT_A + TEXT_B)
    out = tmp_path / "out"
    args = ["analyze", "--model", str(tmp_path / "base"), "--model", str(tmp_path / "other")]
    args += ["--data", str(tmp_path / "t.txt"), "--output-dir", str(out), "--no-plots", "--max-tokens", "240"]
    assert main(args + COMMON) == 0
    comp = json.loads((out / "report.json").read_text())["comparisons"][0]
    fisher = kf.fit(
        load_saved(tmp_path / "base"),
        reference_batches(tmp_path / "base", [TEXT_A + TEXT_B], SEQ, BATCH, max_tokens=240),
        kf.KFACConfig(accumulate_dtype="float64", lowrank_threshold=64),
    )
    base64_ = load_saved(tmp_path / "base")
    for name, r in comp["layers"].items():
        if name not in deltas:
            assert r["quadratic_form"] == 0.0 and r["relative_change"] == 0.0
            continue
        a, g = fisher.factors(name)
        v = deltas[name].reshape(-1)
        dense = 0.5 * float(v @ torch.kron(g, a) @ v)
        assert dense > 0
        assert r["quadratic_form"] == pytest.approx(dense, rel=1e-6)  # float32 weights saved, float64 algebra
        mod = base64_.get_submodule(name)
        vb = torch.cat([mod.weight.t(), mod.bias[:, None]], 1)
        assert r["relative_change"] == pytest.approx(float(deltas[name].norm() / vb.detach().norm()), rel=1e-6)
        assert 0.0 < r["overlap_A"] <= 1.0 + 1e-12


def test_merge_of_disjoint_runs_equals_the_run_on_the_union(
    workdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = str(workdir / "qwen")
    files = []
    for tag, data in (("a", ["a.txt"]), ("b", ["b.txt"]), ("ab", ["a.txt", "b.txt"])):
        out = tmp_path / tag
        args = ["analyze", "--model", model, "--output-dir", str(out), "--no-plots", "--max-tokens", "all"]
        args += ["--save-sums"]  # mergeable files
        for d in data:
            args += ["--data", str(workdir / d)]
        assert main(args + COMMON) == 0
        files.append(out / json.loads((out / "report.json").read_text())["models"][0]["factor_file"])
    merged = tmp_path / "merged.safetensors"
    assert main(["merge", str(merged), str(files[0]), str(files[1])]) == 0
    capsys.readouterr()
    got, want = kf.load_sums(merged), kf.load_sums(files[2])
    assert got.report.tokens == want.report.tokens and got.report.loss_terms == want.report.loss_terms
    assert set(got.sums) == set(want.sums)
    for name, s in want.sums.items():
        # Float64 sums over the same tokens in another order and batching: 1e-10 relative.
        torch.testing.assert_close(
            got.sums[name].A.sum / got.sums[name].A.count, s.A.sum / s.A.count, rtol=1e-10, atol=1e-14
        )
        if s.G.kind == "dense":
            torch.testing.assert_close(
                got.sums[name].G.sum / got.sums[name].G.count, s.G.sum / s.G.count, rtol=1e-10, atol=1e-14
            )
        else:
            gu, wu = got.sums[name].G.factor_U(torch.float64), s.G.factor_U(torch.float64)
            torch.testing.assert_close(gu @ gu.t(), wu @ wu.t(), rtol=1e-10, atol=1e-14)
    fm, fu = kf.load(merged), kf.load(files[2])
    for name in fu.layer_names:
        torch.testing.assert_close(fm.to_dense(name), fu.to_dense(name), rtol=1e-8, atol=1e-12)


def test_no_factor_file_keeps_the_report_and_writes_no_factors(workdir: Path, e2e: tuple[Path, dict]) -> None:
    """``--no-factor-file`` (what ``make analyze`` runs): the same report numbers, no factor file on disk."""
    out, want = workdir / "report-only", e2e[1]
    args = ["analyze", "--model", str(workdir / "qwen"), "--data", str(workdir / "a.txt"), "--output-dir", str(out)]
    assert main([*args, *COMMON, "--max-tokens", "300", "--damping", "0.01", "--no-factor-file"]) == 0
    got = json.loads((out / "report.json").read_text())
    assert not list(out.rglob("*.safetensors")) and not (out / "checkpoints").exists()
    assert got["models"][0]["factor_file"] is None
    assert got["models"][0]["layers"].keys() == want["models"][0]["layers"].keys()
    for layer, row in got["models"][0]["layers"].items():
        for key, value in row.items():
            ref = want["models"][0]["layers"][layer][key]
            # Same data, same factors: equal up to the rounding of GEMMs run in another order of allocation.
            assert value == (pytest.approx(ref, rel=1e-10, abs=1e-300) if isinstance(value, float) else ref), (
                layer,
                key,
            )

"""Writing the analysis report: ``report.json`` (every number), ``report.md`` and a self-contained ``report.html``.

The JSON document is the source of truth; Markdown and HTML are rendered from it. Non-finite numbers (an infinite
condition number) are ``null`` in JSON and ``∞`` / ``—`` in the tables. Plots are written to ``plots/*.png`` (linked
from Markdown) and embedded as base64 ``<img>`` tags in the HTML, one per entry of ``report["plots"]``.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..io.atomic import atomic_write_bytes
from .plots import Plot

METRIC_HELP: dict[str, str] = {
    "in / out": "input and output dimension of the layer (A is (in+1)² with a bias, G is out²)",
    "repr": "dense: eigendecomposed G; lowrank: G = U Uᵀ kept in low-rank form (huge output layers)",
    "T / N": "attended positions (normalise A) and loss terms (normalise G)",
    "tr A, tr G": "traces of the Kronecker factors; tr F = tr A · tr G for K-FAC",
    "top λ": "largest eigenvalues of A, G and F = G ⊗ A (EK-FAC: corrected eigenvalues)",
    "erank": "effective rank exp(entropy of λ / Σλ) (Roy & Vetterli 2007); erank F = erank A · erank G for K-FAC",
    "κ raw / κ damped": "condition number λ_max / λ_min of F and of F + damping (∞ when λ_min = 0)",
    "top-1% share": "fraction of tr F held by the largest 1% of the Kronecker eigenvalues",
    "‖g‖": "norm of the mean-loss gradient over the analysed data (weight and bias of the layer)",
    "‖F⁻¹g‖": "norm of the natural gradient (F + damping)⁻¹ g",
    "cos": "cosine between g and (F + damping)⁻¹ g (1: the preconditioner only rescales)",
    "½ΔθᵀFΔθ": "K-FAC quadratic form of the weight difference to the base, with the base's Fisher (undamped)",
    "‖ΔV‖/‖V‖": "relative Frobenius norm of the difference of V = [W | b] to the base",
    "overlap A / G": "‖Q_baseᵀ Q_other‖²_F / k for the top-k eigenvectors (1: same subspace)",
}


def _clean(x: Any) -> Any:
    """Recursively replace non-finite floats by None (strict JSON)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, Mapping):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def fmt(x: Any, digits: int = 3) -> str:
    """Compact human formatting of a number (``—`` for missing)."""
    if x is None:
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if math.isinf(x):
            return "∞"
        if math.isnan(x):
            return "—"
        if x == 0:
            return "0"
        if x == int(x) and abs(x) < 1e7:
            return str(int(x))
        if 1e-3 <= abs(x) < 1e5:
            return f"{x:.{digits}g}"
        return f"{x:.{digits - 1}e}"
    if isinstance(x, (list, tuple)):
        return ", ".join(fmt(v, digits) for v in x)
    return str(x)


LAYER_COLUMNS: tuple[tuple[str, str], ...] = (
    ("in", "in"),
    ("out", "out"),
    ("representation", "repr"),
    ("T", "T"),
    ("trace_A", "tr A"),
    ("trace_G", "tr G"),
    ("top_eigenvalues_F", "top λ(F)"),
    ("effective_rank_A", "erank A"),
    ("effective_rank_G", "erank G"),
    ("condition_number_raw", "κ raw"),
    ("condition_number_damped", "κ damped"),
    ("top1pct_trace_share", "top-1% share"),
    ("grad_norm", "‖g‖"),
    ("natgrad_norm", "‖F⁻¹g‖"),
    ("cosine_grad_natgrad", "cos"),
)

COMPARISON_COLUMNS: tuple[tuple[str, str], ...] = (
    ("quadratic_form", "½ΔθᵀFΔθ"),
    ("relative_change", "‖ΔV‖/‖V‖"),
    ("overlap_A", "overlap A"),
    ("overlap_G", "overlap G"),
)


def _layer_cell(row: Mapping[str, Any], key: str) -> str:
    value = row.get(key)
    if key == "top_eigenvalues_F" and isinstance(value, list):
        value = value[:3]
    if key.startswith("condition_number") and value is None and key in row:
        return "∞"
    return fmt(value)


def write_json(report: Mapping[str, Any], path: Path) -> Path:
    """Strict JSON (no NaN / Infinity)."""
    return atomic_write_bytes(path, json.dumps(_clean(report), indent=1, allow_nan=False).encode("utf-8"))


# Markdown -------------------------------------------------------------------------------------------------------
def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return out


def render_markdown(report: Mapping[str, Any]) -> str:
    """The Markdown report: settings, per-model summary and layer table, comparisons, plot links."""
    lines = [f"# kronfisher analysis ({report['created_utc']})", ""]
    lines += [f"- command: `{report['command']}`", f"- kronfisher {report['kronfisher_version']}"]
    data = report["data"]
    lines += [
        f"- data: {data['tokens']} tokens in {data['sequences']} sequences of up to {data['seq_len']} tokens, "
        f"{data['batches']} batches; sources: "
        + ", ".join(f"`{s['path']}` ({s['tokens']} tokens)" for s in data["sources"]),
        f"- Fisher: {report['fisher']['description']}",
        f"- gradient: {report['gradient']}",
        "",
    ]
    for note in report.get("notes", []):
        lines.append(f"> {note}")
    lines.append("")
    plots_by_section: dict[str, list[Mapping[str, Any]]] = {}
    for p in report.get("plots", []):
        plots_by_section.setdefault(p["section"], []).append(p)
    for i, m in enumerate(report["models"]):
        t = m["totals"]
        lines += [f"## Model {i}: {m['name']}", ""]
        lines += [
            f"- source: `{m['source']}`; factor file: `{m['factor_file'] or 'not kept (--no-factor-file)'}`",
            f"- layers: {t['layers']} ({', '.join(f'{k}: {v}' for k, v in t['representations'].items())}), "
            f"parameters covered: {t['params']}",
            f"- mean loss on the data: {fmt(m['loss'], 4)} (perplexity {fmt(m['perplexity'], 4)})",
            f"- ‖g‖ = {fmt(t.get('grad_norm'))}, ‖(F+δ)⁻¹g‖ = {fmt(t.get('natgrad_norm'))}, "
            f"cos = {fmt(t.get('cosine_grad_natgrad'))}; tr F (sum over layers) = {fmt(t['trace_F'])}",
            f"- timings (s): {', '.join(f'{k} {v:.1f}' for k, v in m['timings_s'].items())}",
            "",
        ]
        for h in m.get("highlights", []):
            lines.append(f"- {h['title']}: " + ", ".join(f"`{n}` ({fmt(v)})" for n, v in h["layers"]))
        lines.append("")
        for p in plots_by_section.get(f"model:{i}", []):
            lines.append(f"![{p['title']}]({p['file']})")
        lines += ["", "<details><summary>Per-layer metrics</summary>", ""]
        header = ["layer"] + [h for _, h in LAYER_COLUMNS]
        rows = [[name] + [_layer_cell(r, k) for k, _ in LAYER_COLUMNS] for name, r in m["layers"].items()]
        lines += _md_table(header, rows)
        lines += ["", "</details>", ""]
    for j, c in enumerate(report.get("comparisons", [])):
        lines += [f"## Comparison {j}: {c['other']} against the base {c['base']}", ""]
        lines += [
            f"- total ½ΔθᵀF_base Δθ = {fmt(c['total_quadratic_form'])}; overlaps use the top k = {c['k']} "
            f"eigenvectors; layers compared: {len(c['layers'])}"
            + (f"; not compared (shape mismatch or missing): {c['skipped']}" if c.get("skipped") else ""),
            "",
        ]
        for p in plots_by_section.get(f"comparison:{j}", []):
            lines.append(f"![{p['title']}]({p['file']})")
        lines += [""]
        header = ["layer"] + [h for _, h in COMPARISON_COLUMNS]
        rows = [[name] + [fmt(r.get(k)) for k, _ in COMPARISON_COLUMNS] for name, r in c["layers"].items()]
        lines += _md_table(header, rows)
        lines.append("")
    lines += ["## What the columns mean", ""]
    lines += [f"- **{k}**: {v}" for k, v in METRIC_HELP.items()]
    return "\n".join(lines) + "\n"


# HTML -----------------------------------------------------------------------------------------------------------
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:1.5em auto;max-width:1400px;color:#222;
padding:0 1em}
h1{font-size:1.5em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;font-size:12px;margin:.5em 0}
th,td{border:1px solid #ddd;padding:2px 6px;text-align:right}
th{background:#f3f3f3;position:sticky;top:0}td:first-child,th:first-child{text-align:left;font-family:monospace}
.plots{display:flex;flex-wrap:wrap;gap:12px}.plots figure{margin:0;border:1px solid #eee;padding:4px}
.plots img{max-width:100%;height:auto}figcaption{font-size:12px;color:#555}
.note{background:#fff8e1;border-left:4px solid #f0c000;padding:.4em .8em;margin:.4em 0}
dl{font-size:13px}dt{font-weight:600}dd{margin:0 0 .4em 1.2em}code{background:#f5f5f5;padding:0 3px}
"""


def _h(x: Any) -> str:
    return html.escape(str(x))


def _html_table(header: Sequence[str] | None, rows: Sequence[Sequence[str]]) -> str:
    head = "" if header is None else "<thead><tr>" + "".join(f"<th>{_h(h)}</th>" for h in header) + "</tr></thead>"
    body = "".join("<tr>" + "".join(f"<td>{_h(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table>{head}<tbody>{body}</tbody></table>"


def _figures(plots: Sequence[Mapping[str, Any]], images: Mapping[str, bytes]) -> str:
    out = []
    for p in plots:
        data = base64.b64encode(images[p["id"]]).decode("ascii")
        out.append(
            f'<figure><img id="plot-{_h(p["id"])}" alt="{_h(p["title"])}" src="data:image/png;base64,{data}">'
            f"<figcaption>{_h(p['title'])}</figcaption></figure>"
        )
    return '<div class="plots">' + "".join(out) + "</div>"


def render_html(report: Mapping[str, Any], images: Mapping[str, bytes]) -> str:
    """A self-contained HTML page (inline CSS, plots embedded as base64 PNG, no scripts, no external links)."""
    data = report["data"]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>kronfisher analysis {_h(report['created_utc'])}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>kronfisher analysis</h1><p>{_h(report['created_utc'])} · kronfisher {_h(report['kronfisher_version'])}"
        f" · <code>{_h(report['command'])}</code></p>",
        "<ul>",
        f"<li>data: {data['tokens']} tokens, {data['sequences']} sequences of up to {data['seq_len']} tokens, "
        f"{data['batches']} batches; sources: "
        + ", ".join(f"<code>{_h(s['path'])}</code> ({s['tokens']} tokens)" for s in data["sources"])
        + "</li>",
        f"<li>Fisher: {_h(report['fisher']['description'])}</li>",
        f"<li>gradient: {_h(report['gradient'])}</li>",
        "</ul>",
    ]
    parts += [f'<div class="note">{_h(n)}</div>' for n in report.get("notes", [])]
    by_section: dict[str, list[Mapping[str, Any]]] = {}
    for p in report.get("plots", []):
        by_section.setdefault(p["section"], []).append(p)
    for i, m in enumerate(report["models"]):
        t = m["totals"]
        parts.append(f'<h2 id="model-{i}">Model {i}: {_h(m["name"])}</h2>')
        summary = [
            ["source", m["source"]],
            ["factor file", m["factor_file"] or "not kept (--no-factor-file)"],
            ["layers", f"{t['layers']} ({', '.join(f'{k}: {v}' for k, v in t['representations'].items())})"],
            ["parameters covered", fmt(t["params"])],
            ["mean loss / perplexity", f"{fmt(m['loss'], 4)} / {fmt(m['perplexity'], 4)}"],
            [
                "‖g‖, ‖(F+δ)⁻¹g‖, cos",
                f"{fmt(t.get('grad_norm'))}, {fmt(t.get('natgrad_norm'))}, {fmt(t.get('cosine_grad_natgrad'))}",
            ],
            ["tr F (sum over layers)", fmt(t["trace_F"])],
            ["timings (s)", ", ".join(f"{k} {v:.1f}" for k, v in m["timings_s"].items())],
        ]
        parts.append(_html_table(None, summary))
        if m.get("highlights"):
            items = "".join(
                f"<li>{_h(h['title'])}: "
                + ", ".join(f"<code>{_h(n)}</code> ({_h(fmt(v))})" for n, v in h["layers"])
                + "</li>"
                for h in m["highlights"]
            )
            parts.append(f"<ul>{items}</ul>")
        parts.append(_figures(by_section.get(f"model:{i}", []), images))
        header = ["layer"] + [h for _, h in LAYER_COLUMNS]
        rows = [[name] + [_layer_cell(r, k) for k, _ in LAYER_COLUMNS] for name, r in m["layers"].items()]
        parts.append(f"<details><summary>Per-layer metrics ({len(rows)} layers)</summary>")
        parts.append(_html_table(header, rows) + "</details>")
    for j, c in enumerate(report.get("comparisons", [])):
        parts.append(f'<h2 id="comparison-{j}">Comparison {j}: {_h(c["other"])} against the base {_h(c["base"])}</h2>')
        text = (
            f"Total ½ΔθᵀF_base Δθ = {fmt(c['total_quadratic_form'])}; overlaps use the top k = {c['k']} eigenvectors."
        )
        if c.get("skipped"):
            text += f" Not compared (shape mismatch or missing): {', '.join(c['skipped'])}."
        parts.append(f"<p>{_h(text)}</p>")
        parts.append(_figures(by_section.get(f"comparison:{j}", []), images))
        header = ["layer"] + [h for _, h in COMPARISON_COLUMNS]
        rows = [[name] + [fmt(r.get(k)) for k, _ in COMPARISON_COLUMNS] for name, r in c["layers"].items()]
        parts.append("<details open><summary>Per-layer distances</summary>" + _html_table(header, rows) + "</details>")
    parts.append("<h2>What the columns mean</h2><dl>")
    parts += [f"<dt>{_h(k)}</dt><dd>{_h(v)}</dd>" for k, v in METRIC_HELP.items()]
    parts.append("</dl></body></html>")
    return "\n".join(parts)


def write_report(report: dict[str, Any], plots: Sequence[Plot], out_dir: Path) -> dict[str, Path]:
    """Write ``report.json``, ``report.md``, ``report.html`` and ``plots/*.png`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report["plots"] = [p.to_dict() for p in plots]
    images = {p.id: p.png for p in plots}
    if plots:
        (out_dir / "plots").mkdir(exist_ok=True)
        for p in plots:
            atomic_write_bytes(out_dir / p.file, p.png)
    paths = {
        "json": write_json(report, out_dir / "report.json"),
        "md": out_dir / "report.md",
        "html": out_dir / "report.html",
    }
    clean = _clean(report)
    atomic_write_bytes(paths["md"], render_markdown(clean).encode("utf-8"))
    atomic_write_bytes(paths["html"], render_html(clean, images).encode("utf-8"))
    return paths

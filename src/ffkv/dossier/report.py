"""The dossier as files: ``DIR/dossier.json`` (the dict :func:`ffkv.dossier.build.build_dossier` returns) and
``DIR/dossier.html`` (one self-contained page: a table per section, the claims first), both written atomically."""

from __future__ import annotations

import html
import json
from pathlib import Path

from ..io import write_json, write_text

_STYLE = ("body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;color:#222}"
          "table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;"
          "text-align:left;font-size:14px}th{background:#f3f3f3}.yes{color:#06702a}.no{color:#a30d0d}"
          "code{background:#f5f5f5;padding:0 3px}")


def _fmt(v) -> str:
    if isinstance(v, bool):
        return f'<span class="{"yes" if v else "no"}">{"yes" if v else "no"}</span>'
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, dict)):
        text = json.dumps(v)
        return html.escape(text if len(text) <= 160 else text[:157] + "...")
    return html.escape(str(v))


def _table(rows: list[dict], cols: list[str]) -> str:
    if not rows:
        return "<p>(none)</p>"
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(c))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _pairs(d: dict, skip=()) -> str:
    return _table([{"name": k, "value": v} for k, v in d.items() if k not in skip], ["name", "value"])


def render_html(d: dict) -> str:
    """One HTML page of a dossier dict."""
    f, tr, mem, sub, st, ver, saf = (d[k] for k in ("fact", "tracing", "memories", "subspace", "storage",
                                                   "verdict", "edit_safety"))
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>dossier: {html.escape(f['prompt'])} "
             f"{html.escape(f['answer'])}</title><style>{_STYLE}</style></head><body>",
             f"<h1>Dossier: <code>{html.escape(f['prompt'])}</code> &rarr; <code>{html.escape(f['answer'])}</code>"
             f"</h1><p>subject <code>{html.escape(f['subject'])}</code>; paraphrases: {f['paraphrase_source']}; "
             f"answered on {f['answered_share']:.0%} of {len(f['paraphrases'])} prompts.</p>",
             "<h2>Claims</h2>", _pairs(d["claims"]),
             f"<h2>Tracing</h2><p>MLP causal trace, window {tr['window']}, {tr['samples']} samples: peak layer "
             f"<b>{tr['layer']}</b> (agreement {tr['layer_agreement']:.0%}), token role <b>{tr['token_role']}</b> "
             f"(agreement {tr['token_role_agreement']:.0%}).</p>",
             _table(tr["paraphrases"], ["prompt", "peak_layer", "peak_token_text", "peak_role", "peak_effect",
                                        "total_effect", "p_clean", "p_corrupted"]),
             "<h2>Memories</h2><h3>Knowledge neurons shared across paraphrases</h3>",
             _table(mem["knowledge_neurons"], ["memory", "attribution"]),
             "<h3>Top sub-updates promoting the answer</h3>",
             _table(mem["sub_updates"], ["memory", "coef", "value_norm", "promotion", "answer_in_top_tokens",
                                         "promotes"]),
             f"<h2>Subspace</h2><p>{len(sub['memories'])} memories, value rank {sub['rank']}, answer direction in "
             f"span {sub['answer_in_span']:.3g}. Switched off: removed on {sub['removed_share']:.0%} of paraphrases, "
             f"{sub['control_removed_share']:.0%} of controls, {sub['random_removed_share']:.0%} for random "
             f"layer-matched memories.</p>",
             _table(sub["paraphrases"], ["prompt", "p_before", "p_after", "removed"]),
             _table(sub["controls"], ["prompt", "answer", "p_before", "p_after", "removed"]),
             "<h2>Storage</h2>", _pairs(st, skip=("ks", "curve", "top", "prompt")),
             f"<h2>Recall verdict: {html.escape(ver['verdict'])}</h2>", _pairs(ver["signals"]),
             f"<p>score {ver['score']:.3f} (threshold {ver['threshold']:.3f}), greedy answer "
             f"<code>{html.escape(ver['greedy_answer'])}</code>.</p>",
             f"<h2>Edit safety (rank-one update at layer {saf['layer']})</h2><p>{saf['n_moved']} of "
             f"{saf['n_known']} known keys moved by |s| &ge; {saf['move_threshold']}; ||C<sup>-1</sup>k*|| = "
             f"{saf['c_inv_k_norm']:.4g}; predicted {'safe' if saf['safe'] else 'not safe'}. Measure: "
             f"{html.escape(saf['measure'])}.</p>",
             _table(saf["moved"], ["prompt", "answer", "spill"]),
             "<h2>Timings (s)</h2>", _pairs(d.get("timings_s", {})),
             f"<p><small>ffkv {html.escape(str(d['provenance'].get('ffkv_version')))}, model "
             f"{html.escape(str(d['provenance'].get('model', {}).get('name_or_path')))}, "
             f"{html.escape(str(d['provenance'].get('created')))}</small></p></body></html>"]
    return "\n".join(parts)


def write_dossier(d: dict, out: str | Path) -> dict[str, Path]:
    """Write ``out/dossier.json`` and ``out/dossier.html`` (each atomically); returns their paths."""
    out = Path(out)
    return {"json": write_json(out / "dossier.json", d), "html": write_text(out / "dossier.html", render_html(d))}

"""``DIR/report.html``: the paper's tables and figures for the analysed model, from measured atlas data.

Figures (PNG and SVG, matplotlib, in ``DIR/figures/``): pattern types by layer and the token-removal effect
(Geva 2021, section 3), value agreement vs random, the top-100 ``max p`` histogram and trigger ranks
(section 4), active memories and zero-agreement (section 5.1), refinement cases (section 5.2); then trigger
examples and value top tokens of sampled memories.
"""

from __future__ import annotations

import html
import json

import numpy as np

from ..io import atomic_path, write_text
from .analysis import STEPS, analyze
from .atlas import Atlas

PAPER = {
    "patterns": "shallow patterns dominate layers 1-9 of 16, semantic ones layers 10-16",
    "agreement": "agreement rises in the upper layers, far above the random baseline",
    "active": "10-50% of memories are active per layer",
    "zero": "zero-agreement in at least 68% of prefixes in every layer",
    "refinement": "the residual's top token is often already the final output in upper layers",
}


def _fig(path, draw, layers=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.2), dpi=110)
    draw(ax)
    if layers is not None:
        ax.set_xticks(layers if len(layers) <= 24 else layers[:: max(1, len(layers) // 12)])
    ax.grid(alpha=0.3)
    fig.tight_layout()
    for suffix in ("png", "svg"):
        with atomic_path(path.with_suffix("." + suffix)) as tmp:
            fig.savefig(tmp, format=suffix)
    plt.close(fig)


def _pct(x):
    return "-" if x is None else f"{100 * x:.1f}%"


def _table(rows: list[dict], cols: list[tuple[str, str, object]]) -> str:
    head = "".join(f"<th>{html.escape(t)}</th>" for t, _, _ in cols)
    body = "".join("<tr>" + "".join(f"<td>{fmt(r.get(k)) if fmt else html.escape(str(r.get(k)))}</td>"
                                    for _, k, fmt in cols) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def figures(atlas: Atlas, res: dict) -> dict:
    """Draw every figure from the stored analyses; returns {name: relative path}."""
    out = {}
    fig_dir = atlas.path / "figures"
    L = np.arange(atlas.n_layers)
    pat, val, rem, comp = res.get("patterns"), res.get("values"), res.get("removal"), res.get("composition")
    if pat:
        sh = [l["shallow"] for l in pat["layers"]]
        se = [l["semantic"] for l in pat["layers"]]

        def draw(ax):
            ax.bar(L, sh, label="shallow", color="#4c72b0")
            ax.bar(L, se, bottom=sh, label="semantic", color="#dd8452")
            ax.set_xlabel("layer"); ax.set_ylabel("share of keys"); ax.set_title("Trigger pattern types by layer")
            ax.legend(fontsize=8)
        _fig(fig_dir / "patterns.png", draw, L); out["patterns"] = "figures/patterns.png"
    if rem:
        def draw(ax):
            ax.plot(L, [l["median_change_remove_last"] for l in rem["layers"]], "o-", label="remove last token")
            ax.plot(L, [l["median_change_remove_first"] for l in rem["layers"]], "s-", label="remove first token")
            ax.axhline(0, color="k", lw=0.6)
            ax.set_xlabel("layer"); ax.set_ylabel("median relative change of m"); ax.set_title("Token removal")
            ax.legend(fontsize=8)
        _fig(fig_dir / "removal.png", draw, L); out["removal"] = "figures/removal.png"
    if val:
        lay = val["layers"]

        def draw(ax):
            ax.plot(L, [100 * (l["agreement"] or 0) for l in lay], "o-", label="value top token = trigger next token")
            ax.plot(L, [100 * (l["random"] or 0) for l in lay], "s--", label="random (permuted keys)")
            ax.set_xlabel("layer"); ax.set_ylabel("agreement (%)"); ax.set_title("Value-trigger agreement")
            ax.legend(fontsize=8)
        _fig(fig_dir / "agreement.png", draw, L); out["agreement"] = "figures/agreement.png"

        def draw(ax):
            ax.bar(L, val["top100_max_p_histogram"], color="#55a868")
            ax.set_xlabel("layer"); ax.set_ylabel("count"); ax.set_title("Layers of the 100 values with highest max p")
        _fig(fig_dir / "top100.png", draw, L); out["top100"] = "figures/top100.png"

        def draw(ax):
            ax.plot(L, [l["median_trigger_rank"] for l in lay], "o-")
            ax.set_yscale("symlog"); ax.set_xlabel("layer"); ax.set_ylabel("median rank")
            ax.set_title("Rank of the trigger's next token in the value")
        _fig(fig_dir / "rank.png", draw, L); out["rank"] = "figures/rank.png"
    if comp:
        c = comp["composition"]

        def draw(ax):
            ax.plot(L, [100 * l["active_share"] for l in c], "o-")
            ax.set_ylim(bottom=0); ax.set_xlabel("layer"); ax.set_ylabel("active memories (%)")
            ax.set_title("Active memories per prefix")
        _fig(fig_dir / "active.png", draw, L); out["active"] = "figures/active.png"

        def draw(ax):
            ax.plot(L, [100 * (l["zero_agreement"] or 0) for l in c], "o-", label="all prefixes")
            ax.plot(L, [100 * (l["zero_agreement_stop_word"] or 0) for l in c], "s--", label="last token a stop word")
            ax.plot(L, [100 * (l["zero_agreement_short"] or 0) for l in c], "^--", label="prefix < 5 tokens")
            ax.set_ylim(0, 100); ax.set_xlabel("layer"); ax.set_ylabel("zero-agreement (%)")
            ax.set_title("Layer prediction matches no active memory"); ax.legend(fontsize=8)
        _fig(fig_dir / "zero_agreement.png", draw, L); out["zero_agreement"] = "figures/zero_agreement.png"
        r = comp["refinement"]

        def draw(ax):
            bottom = np.zeros(len(L))
            for name, color in (("residual", "#4c72b0"), ("ffn", "#dd8452"), ("agreement", "#55a868"),
                                ("composition", "#c44e52")):
                v = np.array([l[name] for l in r])
                ax.bar(L, v, bottom=bottom, label=name, color=color)
                bottom += v
            ax.plot(L, [l["residual_is_output"] for l in r], "ko-", label="residual top = final output")
            ax.set_xlabel("layer"); ax.set_ylabel("share of prefixes"); ax.set_title("Refinement across layers")
            ax.legend(fontsize=7)
        _fig(fig_dir / "refinement.png", draw, L); out["refinement"] = "figures/refinement.png"
    return out


def layer_summary(atlas: Atlas) -> list[dict]:
    """One row per layer joining every stored analysis (the numbers behind the report's figures)."""
    stored = {s: atlas.analysis(s) for s in STEPS}
    rows = []
    for l in range(atlas.n_layers):
        r = {"layer": l}
        if stored["patterns"]:
            p = stored["patterns"]["layers"][l]
            r.update(shallow=p["shallow"], semantic=p["semantic"])
        if stored["removal"]:
            p = stored["removal"]["layers"][l]
            r.update(remove_last=p["median_change_remove_last"], remove_first=p["median_change_remove_first"])
        if stored["values"]:
            p = stored["values"]["layers"][l]
            r.update(agreement=p["agreement"], random=p["random"], median_rank=p["median_trigger_rank"],
                     top100=p["top100_max_p_count"])
        if stored["composition"]:
            c, f = stored["composition"]["composition"][l], stored["composition"]["refinement"][l]
            r.update(active=c["active_share"], zero_agreement=c["zero_agreement"],
                     zero_stop=c["zero_agreement_stop_word"], zero_short=c["zero_agreement_short"],
                     residual_is_output=f["residual_is_output"],
                     **{f"case_{k}": f[k] for k in ("residual", "ffn", "agreement", "composition")})
        rows.append(r)
    return rows


def format_summary(rows: list[dict]) -> str:
    """A Markdown table of :func:`layer_summary` (percentages, one decimal)."""
    if not rows:
        return ""
    cols = list(rows[0])
    fmt = {"layer": str, "median_rank": lambda x: "-" if x is None else f"{x:g}", "top100": str,
           "remove_last": lambda x: "-" if x is None else f"{x:+.2f}",
           "remove_first": lambda x: "-" if x is None else f"{x:+.2f}"}
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(fmt.get(c, _pct_md)(r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def _pct_md(x):
    return "-" if x is None else f"{100 * x:.1f}"


def sample_memories(atlas: Atlas, per_layer: int = 2, n_triggers: int = 5, seed: int = 0) -> list[dict]:
    """Seeded sample of memories per layer with their triggers and value top tokens (for the report)."""
    from .values import decode_tokens

    rng = np.random.default_rng(seed)
    tok = atlas.model.tokenizer
    vt = atlas.values_table()
    out = []
    for l in range(atlas.n_layers):
        for i in sorted(rng.choice(atlas.d_ffn, size=min(per_layer, atlas.d_ffn), replace=False).tolist()):
            row = {"memory": f"L{l}.{i}", "triggers": atlas.memory_triggers(l, i, n=n_triggers, tokenizer=tok)}
            if vt is not None:
                r = vt.slice(l * atlas.d_ffn + i, 1).to_pylist()[0]
                row["top_tokens"] = decode_tokens(tok, r["top_ids"][:8])
                row["max_p"] = r["max_p"]
            out.append(row)
    return out


def write_report(atlas: Atlas, analyze_missing: bool = True, progress: bool = True, **analyze_options) -> str:
    """Write ``DIR/report.html`` (+ figures), running any analysis not yet stored; returns its path."""
    stored = {s: atlas.analysis(s) for s in STEPS}
    missing = [s for s, v in stored.items() if v is None]
    if missing and analyze_missing:
        res = analyze(atlas, steps=missing, progress=progress, **analyze_options)
        stored.update({s: res[s] for s in missing})
    figs = figures(atlas, stored)
    meta = atlas.meta
    ident = meta["model"]
    h = meta["hyperparameters"]
    parts = [f"<h1>Key-value atlas of {html.escape(ident.get('name_or_path', '?'))}</h1>",
             f"<p>{ident.get('family')} model, {atlas.n_layers} layers, d_ffn = {atlas.d_ffn}, "
             f"vocab {ident.get('vocab_size')}; corpus <code>{html.escape(str(h['corpus']))}</code> "
             f"({h['split']} units, {meta['units']} units, {meta['tokens']} prefixes), top-k = {atlas.top_k}; "
             f"ffkv {html.escape(meta['ffkv_version'])}, fingerprint {ident.get('fingerprint')}.</p>"]

    def img(name):
        return f'<img src="{figs[name]}" alt="{name}">' if name in figs else ""

    val, pat, rem, comp = (stored.get(s) for s in STEPS)
    if pat:
        parts += ["<h2>1. Trigger patterns (Geva et al. 2021, section 3)</h2>",
                  f"<p>Automatic label: <b>shallow</b> when at least {pat['threshold']:.0%} of a key's top "
                  f"{pat['n_triggers']} prefixes end in the same token, otherwise <b>semantic</b> (topic words: "
                  f"content words in at least {pat['topic_share']:.0%} of them). Paper: {PAPER['patterns']}.</p>",
                  img("patterns"), img("removal"),
                  _table([{**l, **(rem["layers"][l["layer"]] if rem else {})} for l in pat["layers"]],
                         [("layer", "layer", None), ("shallow", "shallow", _pct), ("semantic", "semantic", _pct),
                          ("semantic with topic words", "semantic_with_topic", _pct),
                          ("remove last: median change of m", "median_change_remove_last",
                           lambda x: "-" if x is None else f"{x:+.2f}"),
                          ("remove first", "median_change_remove_first",
                           lambda x: "-" if x is None else f"{x:+.2f}")])]
    if val:
        parts += ["<h2>2. Values (section 4)</h2>",
                  f"<p>Values projected with {'the final norm, ' if val['norm'] else ''}softmax(E v). Agreement: the "
                  f"value's top token equals the next token of its key's top trigger; random: the same with keys "
                  f"permuted within the layer (chance 1/|V| = {val['chance']:.2e}). Paper: {PAPER['agreement']}.</p>",
                  img("agreement"), img("top100"), img("rank"),
                  _table(val["layers"], [("layer", "layer", None), ("agreement", "agreement", _pct),
                                         ("random", "random", _pct), ("keys", "n_keys", None),
                                         ("median rank of next token", "median_trigger_rank", None),
                                         ("next token in value top-10", "trigger_in_top10", _pct),
                                         ("top-100 max p count", "top100_max_p_count", None)])]
    if comp:
        parts += ["<h2>3. Composition (section 5.1)</h2>",
                  f"<p>{comp['n_prefixes']} prefixes from {comp['n_units']} sampled units; active rule per "
                  f"layer in the table. Paper: {PAPER['active']}; {PAPER['zero']}.</p>",
                  img("active"), img("zero_agreement"),
                  _table(comp["composition"], [("layer", "layer", None), ("active rule", "rule", None),
                                               ("active memories", "active_share", _pct),
                                               ("zero-agreement", "zero_agreement", _pct),
                                               ("stop-word prefixes", "zero_agreement_stop_word", _pct),
                                               ("content-word prefixes", "zero_agreement_content_word", _pct),
                                               ("short prefixes", "zero_agreement_short", _pct),
                                               ("long prefixes", "zero_agreement_long", _pct)]),
                  "<h2>4. Refinement across layers (section 5.2)</h2>", f"<p>Paper: {PAPER['refinement']}.</p>",
                  img("refinement"),
                  _table(comp["refinement"], [("layer", "layer", None),
                                              ("residual top = output", "residual_is_output", _pct),
                                              ("residual", "residual", _pct), ("ffn", "ffn", _pct),
                                              ("agreement", "agreement", _pct),
                                              ("composition", "composition", _pct)])]
    parts.append("<h2>5. Sampled memories: trigger examples and value top tokens</h2>")
    for mem in sample_memories(atlas):
        trig = "".join(f"<li><code>{html.escape(t['prefix'][-120:])}</code> &rarr; m = {t['coef']:.3g}"
                       f"{' (next: ' + html.escape(repr(t['next_token'])) + ')' if t['next_token'] else ''}</li>"
                       for t in mem["triggers"])
        toks = ", ".join(html.escape(repr(t)) for t in mem.get("top_tokens", []))
        parts.append(f"<h3>{mem['memory']}</h3><p>value top tokens: {toks}"
                     f"{' (max p %.3g)' % mem['max_p'] if 'max_p' in mem else ''}</p><ol>{trig}</ol>")
    parts.append("<details><summary>raw measurements (JSON)</summary><pre>"
                 + html.escape(json.dumps({k: v for k, v in stored.items() if v}, indent=1)[:200000])
                 + "</pre></details>")
    style = ("body{font-family:sans-serif;max-width:980px;margin:2em auto;color:#222}table{border-collapse:collapse;"
             "margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}img{max-width:48%;margin:4px}")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>ffkv atlas report</title><style>{style}"
            f"</style></head><body>{''.join(parts)}</body></html>")
    path = atlas.path / "report.html"
    write_text(path, page)
    return str(path)

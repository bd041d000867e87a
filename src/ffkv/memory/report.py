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
from ..models.memory_id import MemoryId
from .analysis import STEPS, analyze
from .atlas import Atlas
from .patterns import decode_many
from .values import decode_tokens

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


def _model_name(name_or_path: str) -> str:
    """A readable model name for titles: a hub name as is, a folder by its last parts, never a long absolute path."""
    p = str(name_or_path).rstrip("/")
    if not p.startswith(("/", ".", "~")):
        return p
    parts = [q for q in p.split("/") if q]
    if parts and parts[-1] == "model" and len(parts) > 1:  # testbed and edit folders call their model "model"
        return "/".join(parts[-2:])
    return parts[-1] if parts else p


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
    rng = np.random.default_rng(seed)
    tok = atlas.model.tokenizer
    vt = atlas.values_table()
    out = []
    for l in range(atlas.n_layers):
        for i in sorted(rng.choice(atlas.d_ffn, size=min(per_layer, atlas.d_ffn), replace=False).tolist()):
            mid = MemoryId(l, i)
            row = {"memory": str(mid), "triggers": atlas.memory_triggers(l, i, n=n_triggers, tokenizer=tok)}
            if vt is not None:
                r = vt.slice(mid.flat(atlas.d_ffn), 1).to_pylist()[0]
                row["top_tokens"] = decode_tokens(tok, r["top_ids"][:8])
                row["max_p"] = r["max_p"]
            out.append(row)
    return out


INDEX_TRIGGERS = 3  # trigger examples per memory in the report's searchable index
INDEX_CONTEXT = 10  # tokens of context before the firing token in the index


def memory_index(atlas: Atlas, n_triggers: int = INDEX_TRIGGERS, context: int = INDEX_CONTEXT,
                 n_tokens: int = 8) -> list[list[dict]]:
    """Every memory of every layer, for the report's search: ``[layer][index] -> {m, t, v, p}``.

    ``t``: its top ``n_triggers`` trigger examples as ``[context text, firing token, next token, coef]`` (the
    firing token is the prefix's last token, where the key fired); ``v``: the value's top tokens; ``p``: its
    ``max p``. Built with whole-layer array reads and a few batched decodes per layer (each distinct value
    token once, :func:`~ffkv.memory.patterns.decode_many`), not a loop over keys calling the tokenizer.
    """
    tok = atlas.model.tokenizer if atlas._model is not False else None
    vt = atlas.values_table()
    top_all = maxp_all = None
    if vt is not None:
        col = vt.column("top_ids").combine_chunks()
        width = len(col[0]) if len(col) else 0
        top_all = col.values.to_numpy().reshape(len(col), width)[:, :n_tokens]  # (L * d_ffn, n_tokens)
        maxp_all = vt.column("max_p").to_numpy()
    units = atlas.units

    def dec(ids):
        return decode_many(tok, ids) if tok is not None else [" ".join(map(str, x)) for x in ids]

    out = []
    for l in range(atlas.n_layers):
        tm = atlas.trigger_matrix(l, "top")
        k = min(n_triggers, atlas.top_k)
        U, P, C = tm["unit"][:, :k], tm["position"][:, :k], tm["coef"][:, :k]
        valid = np.cumprod(U >= 0, axis=1).astype(bool)  # a key's triggers up to its first empty rank
        keys, ranks = np.nonzero(valid)  # (key, rank) in key order, ranks ascending
        eu, ep = U[keys, ranks], P[keys, ranks]
        ctx_ids, fire_ids, next_ids = [], [], []
        for u, pos in zip(eu.tolist(), ep.tolist()):  # list slices of each cited prefix (no tokenizer here)
            toks, nxt = units[u]
            ctx_ids.append(toks[max(0, pos - context):pos])
            fire_ids.append(toks[pos: pos + 1])
            nx = toks[pos + 1] if pos + 1 < len(toks) else int(nxt)
            next_ids.append([nx] if nx >= 0 else [])
        ctx, full, nxt = dec(ctx_ids), dec([c + f for c, f in zip(ctx_ids, fire_ids)]), dec(next_ids)
        # the firing token as it reads after its context (word tokenizers join with a space)
        fire = [w[len(c):] if w.startswith(c) else f for w, c, f in zip(full, ctx, dec(fire_ids))]
        layer_rows = [{"m": str(MemoryId(l, i)), "t": []} for i in range(atlas.d_ffn)]
        for i, coef, c, f, n in zip(keys.tolist(), C[keys, ranks].tolist(), ctx, fire, nxt):
            layer_rows[i]["t"].append([c, f, n, round(coef, 4)])
        if top_all is not None:
            base = MemoryId(l, 0).flat(atlas.d_ffn)
            top = top_all[base: base + atlas.d_ffn]
            if tok is not None:
                uniq, inv = np.unique(top, return_inverse=True)
                words = np.array(dec([[int(t)] for t in uniq]), dtype=object)[inv.reshape(top.shape)].tolist()
            else:
                words = top.tolist()
            for i, (w, p) in enumerate(zip(words, maxp_all[base: base + atlas.d_ffn].tolist())):
                layer_rows[i]["v"] = w
                layer_rows[i]["p"] = round(p, 4)
        out.append(layer_rows)
    return out


_SEARCH_JS = """
(function(){
  const box = document.getElementById('q'), res = document.getElementById('results');
  const esc = s => String(s).replace(/[&<>"']/g, c => ({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;',"'":'&#39;'}[c]));
  function card(r){
    const trig = r.t.map(t => '<li><code>' + esc(t[0]) + '<mark>' + esc(t[1]) + '</mark></code>' +
      (t[2] ? ' &rarr; ' + esc(JSON.stringify(t[2])) : '') + ' (m = ' + t[3] + ')</li>').join('');
    const vals = r.v ? '<p>value top tokens: ' + r.v.map(v => esc(JSON.stringify(v))).join(', ') +
      (r.p !== undefined ? ' (max p ' + r.p + ')' : '') + '</p>' : '';
    return '<div class="mem" id="' + r.m + '"><h3><a href="#' + r.m + '">' + r.m + '</a></h3>' + vals +
      '<ol>' + trig + '</ol></div>';
  }
  function all(){ return (window.FFKV_MEMORIES || []).flat(); }
  function search(){
    const q = box.value.trim().toLowerCase();
    if (!q){ res.innerHTML = ''; return; }
    const m = q.match(/^l?(\d+)[.:](\d+)$/);
    let hits;
    if (m){ const L = window.FFKV_MEMORIES[+m[1]]; hits = L && L[+m[2]] ? [L[+m[2]]] : []; }
    else hits = all().filter(r => (r.v || []).some(v => v.toLowerCase().trim() === q.replace(/^"|"$/g,'').trim()) ||
      r.t.some(t => (t[0] + t[1]).toLowerCase().includes(q)));
    res.innerHTML = '<p>' + hits.length + ' memories' + (hits.length > 200 ? ' (first 200 shown)' : '') + '</p>' +
      hits.slice(0, 200).map(card).join('');
  }
  box.addEventListener('input', search);
  function fromHash(){ const h = decodeURIComponent(location.hash.slice(1));
    if (/^L\d+\.\d+$/.test(h) && !document.getElementById(h)){ box.value = h; search();
      const el = document.getElementById(h); if (el) el.scrollIntoView(); } }
  window.addEventListener('hashchange', fromHash); fromHash();
})();
"""


def _write_index(atlas: Atlas, index: list[list[dict]]) -> list[str]:
    """One script per layer under ``report-data/`` (a script tag loads from file:// where fetch() cannot)."""
    names = []
    for l, rows in enumerate(index):
        name = f"report-data/memories-{l:03d}.js"
        write_text(atlas.path / name, f"(window.FFKV_MEMORIES = window.FFKV_MEMORIES || [])[{l}] = "
                   + json.dumps(rows, separators=(",", ":")) + ";\n")
        names.append(name)
    return names


def write_report(atlas: Atlas, analyze_missing: bool = True, progress: bool = False, **analyze_options) -> str:
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
    model_name = _model_name(ident.get("name_or_path", "?"))
    parts = [f"<h1>Key-value atlas of {html.escape(model_name)}</h1>",
             f"<p>{ident.get('family')} model, {atlas.n_layers} layers, d_ffn = {atlas.d_ffn}, "
             f"vocab {ident.get('vocab_size')}; corpus <code>{html.escape(str(h['corpus']))}</code> "
             f"({h['split']} units, {meta['units']} units, {meta['tokens']} prefixes), top-k = {atlas.top_k}; "
             f"ffkv {html.escape(meta['ffkv_version'])}, fingerprint {ident.get('fingerprint')}.</p>"]

    def img(name):
        return f'<img src="{figs[name]}" alt="{name}">' if name in figs else ""

    val, pat, rem, comp = (stored.get(s) for s in STEPS)
    if pat:
        parts += ["<h2 id='patterns'>1. Trigger patterns (Geva et al. 2021, section 3)</h2>",
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
        parts += ["<h2 id='values'>2. Values (section 4)</h2>",
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
        parts += ["<h2 id='composition'>3. Composition (section 5.1)</h2>",
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
                  "<h2 id='refinement'>4. Refinement across layers (section 5.2)</h2>", f"<p>Paper: {PAPER['refinement']}.</p>",
                  img("refinement"),
                  _table(comp["refinement"], [("layer", "layer", None),
                                              ("residual top = output", "residual_is_output", _pct),
                                              ("residual", "residual", _pct), ("ffn", "ffn", _pct),
                                              ("agreement", "agreement", _pct),
                                              ("composition", "composition", _pct)])]
    parts.append("<h2 id='sampled'>5. Sampled memories: trigger examples and value top tokens</h2>"
                 "<p>The firing token (the prefix's last token, where the key fired) is <mark>marked</mark>.</p>")
    for mem in sample_memories(atlas):
        trig = "".join(f"<li><code>{html.escape(t['prefix'][: len(t['prefix']) - len(t['last_token'])][-120:])}"
                       f"<mark>{html.escape(t['last_token'])}</mark></code> &rarr; m = {t['coef']:.3g}"
                       f"{' (next: ' + html.escape(repr(t['next_token'])) + ')' if t['next_token'] else ''}</li>"
                       for t in mem["triggers"])
        toks = ", ".join(html.escape(repr(t)) for t in mem.get("top_tokens", []))
        parts.append(f"<h3 id='{mem['memory']}'><a href='#{mem['memory']}'>{mem['memory']}</a></h3>"
                     f"<p>value top tokens: {toks}"
                     f"{' (max p %.3g)' % mem['max_p'] if 'max_p' in mem else ''}</p><ol>{trig}</ol>")
    index = memory_index(atlas)
    scripts = _write_index(atlas, index)
    n_mem = sum(len(rows) for rows in index)
    parts.append("<h2 id='memories'>6. Every memory</h2>"
                 f"<p>All {n_mem} memories ({atlas.n_layers} layers x {atlas.d_ffn}) are in this report's index. "
                 "Search by name (<code>L3.17</code>), by a token a value promotes (<code>Paris</code>), or by "
                 "trigger text; a link <code>report.html#L3.17</code> opens that memory.</p>"
                 "<input id='q' placeholder='L3.17, a token, or trigger text' size='40'>"
                 "<div id='results'></div>"
                 + "<p>By layer: " + " ".join(f"<a href='#L{l}.0'>L{l}</a>" for l in range(atlas.n_layers))
                 + "</p>")
    parts.append("<details><summary>raw measurements (JSON)</summary><pre>"
                 + html.escape(json.dumps({k: v for k, v in stored.items() if v}, indent=1)[:200000])
                 + "</pre></details>")
    style = ("body{font-family:sans-serif;max-width:980px;margin:2em auto;color:#222}table{border-collapse:collapse;"
             "margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}img{max-width:48%;margin:4px}"
             "mark{background:#ffe08a}nav ol{columns:2}.mem{border-top:1px solid #ddd}")
    toc = [(i, t) for i, t in (("patterns", "Trigger patterns"), ("values", "Values"),
                               ("composition", "Composition"), ("refinement", "Refinement"),
                               ("sampled", "Sampled memories"), ("memories", "Every memory (search)"))
           if f"id='{i}'" in "".join(parts)]
    nav = "<nav><b>Contents</b><ol>" + "".join(f"<li><a href='#{i}'>{t}</a></li>" for i, t in toc) + "</ol></nav>"
    body = parts[:2] + [nav] + parts[2:]
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>ffkv atlas: {html.escape(model_name)}"
            f"</title><style>{style}</style></head><body>{''.join(body)}"
            + "".join(f"<script src='{n}'></script>" for n in scripts)
            + f"<script>{_SEARCH_JS}</script></body></html>")
    path = atlas.path / "report.html"
    write_text(path, page)
    return str(path)

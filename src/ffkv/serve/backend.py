"""Everything the memory debugger asks of ffkv, in one place: each view is one method of :class:`Backend`.

The web layer (:mod:`ffkv.serve.app`) never touches the model; it calls these methods, which validate
their input (an :class:`~ffkv.errors.FfkvError` names the problem and the fix), take the one model lock,
and call ffkv's public API: the same functions the command line runs. Every hook is registered through
:func:`ffkv.models.hooks.intervene`, whose block removes it on exit, also on error, so no request leaves
a hook behind.

Names used below (one memory is ``L{layer}.{index}``, :class:`~ffkv.models.memory_id.MemoryId`):

    coefficient  m_i(x) of memory i at a position            (d_ffn,) per position and layer
    sub-update   m_i v_i, ranked by |m_i| * ||v_i||           (d_model,)
    logit lens   softmax(unembed(h)) of a residual h          (vocab,)
                 before the FFN: h = resid_post - ffn_write; after: h = resid_post

Mixture-of-experts models (:class:`~ffkv.models.moe.MoEModel`): memory i of expert e is ``L{layer}.E{e}.{i}``;
its sub-update at a token routed to e is ``w_e m_i v_i`` (w_e the routing weight), the shared expert's
``sigma(g . x) m_i v_i`` keeps the dense name; tokens not routed to e have no coefficient for it ("not
routed", NaN, never 0). Expert coefficients are read and switched through
:func:`ffkv.models.moe.expert_intervene`, whose block restores the experts' forward on exit, also on error.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import validate
from ..errors import FfkvError
from ..io import read_json
from ..edit import EditRequest, Journal, apply_edits
from ..edit.registry import get_method
from ..locate.neurons import knowledge_neurons
from ..locate.trace import KINDS, causal_traces
from ..memory.atlas import Atlas
from ..memory.queries import describe_memory
from ..memory.subupdates import generate_with_memories, memory_rank, memory_switches, sub_updates, switch_effect
from ..memory.values import nearest_values, promotes, token_id, value_logits, write_values
from ..models.hooks import intervene
from ..models.loading import load_model
from ..models.memory_id import MemoryId, parse_memories
from ..models.moe import MoEModel, expert_intervene

# What the FFN adds to the residual (the adapter's write site: W_out's output, or a post-FFN norm's).
WRITE_SITE = "ffn_write"
EDIT_METHODS = ("rome", "memit")


@dataclass(frozen=True)
class Limits:
    """Bounds on what one request may ask for, so that no request can tie up the model for long."""

    prompt_chars: int = 2000
    prompt_tokens: int = 256
    top_n: int = 50
    value_top: int = 20
    max_new_tokens: int = 64
    switches: int = 64
    search_n: int = 100
    extra_prompts: int = 16


def _tokens(tok, ids) -> list[str]:
    return [tok.decode([int(i)]) for i in ids]


def _dist(tok, probs: torch.Tensor, k: int) -> list[dict]:
    top = probs.topk(min(k, probs.numel()))
    return [{"token": s, "id": int(i), "p": float(p)}
            for s, i, p in zip(_tokens(tok, top.indices), top.indices.tolist(), top.values.tolist())]


def _int(value, name: str, lo: int, hi: int, default: int) -> int:
    """A bounded integer request parameter: :func:`ffkv.validate.integer`, the rule the CLI kit uses."""
    return validate.integer(value, name, lo, hi, default)


class Backend:
    """The served model, its optional atlas and its edit journal, behind one lock.

    model: a :class:`~ffkv.models.model.MemoryModel`. atlas: an atlas folder mined on this model (or None).
    state_dir: where the edit journal (``state_dir/journal``) and the edit statistics (``state_dir/stats``)
    live; a journal found there is replayed onto the model, so a restart loses no edit.
    edit_hparams: overrides of every edit's hyperparameters (e.g. ``{"stats_tokens": 20000}``).
    """

    def __init__(self, model, atlas: str | Path | None = None, state_dir: str | Path | None = None,
                 edit_hparams: dict | None = None, limits: Limits = Limits(), cases: str | Path | None = None):
        self.model = model
        self.cases = self._read_cases(cases) if cases is not None else None
        self.tok = model.require_tokenizer()
        self.limits = limits
        self.lock = threading.Lock()
        self.edit_hparams = dict(edit_hparams or {})
        self.atlas = None
        self._trigger_index = None
        if atlas is not None:
            self.atlas = Atlas(atlas, model=model)
            want = (self.atlas.meta.get("model") or {}).get("fingerprint")
            have = model.identity["fingerprint"]
            if want and want != have:
                raise FfkvError(f"atlas '{atlas}' was mined on another model (fingerprint {want}, served model "
                                f"{have})", "serve the model the atlas was mined on, or mine it again")
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.journal = Journal()
        if self.journal_path is not None and (self.journal_path / "journal.json").exists():
            self.journal = Journal.load(self.journal_path).replay(model)

    @classmethod
    def open(cls, model_path: str, atlas=None, state_dir=None, edit_hparams=None, limits: Limits = Limits(),
             cases=None, **load_options) -> "Backend":
        """Load the model (``ffkv.load_model``) and open the rest."""
        return cls(load_model(model_path, **load_options), atlas, state_dir, edit_hparams, limits, cases)

    @staticmethod
    def _read_cases(path) -> list[dict]:
        """CounterFact records (ROME's layout) to fill the edit form from: the rewrite, its paraphrases and
        its neighbourhood prompts."""
        data = read_json(path)
        if not isinstance(data, list) or not data:
            raise FfkvError(f"{path} holds no CounterFact records", "give a JSON list of CounterFact records")
        out = []
        for rec in data:
            req = EditRequest.from_counterfact(rec)
            out.append({"case_id": rec.get("case_id", len(out)), "prompt": req.text, "subject": req.subject,
                        "target": req.target.strip(), "target_true": (req.target_true or "").strip(),
                        "paraphrases": "\n".join(rec.get("paraphrase_prompts", [])),
                        "neighbours": "\n".join(rec.get("neighborhood_prompts", [])[:5])})
        return out

    def case(self, n) -> dict:
        """The edit form's fields for the n-th CounterFact record of ``--cases``."""
        if self.cases is None:
            raise FfkvError("no CounterFact cases were given", "start the server with --cases FILE")
        return self.cases[_int(n, "case", 0, len(self.cases) - 1, 0)]

    # --------------------------------------------------------------------------------------------- info
    @property
    def journal_path(self) -> Path | None:
        return None if self.state_dir is None else self.state_dir / "journal"

    def info(self) -> dict:
        m = self.model
        out = {"model": str(m.name_or_path), "family": m.family, "n_layers": m.n_layers, "d_model": m.d_model,
               "d_ffn": m.d_ffn, "vocab_size": m.vocab_size, "atlas": str(self.atlas.path) if self.atlas else None,
               "edits": len(self.journal), "journal": str(self.journal_path) if self.journal_path else None,
               "cases": len(self.cases) if self.cases else 0, "moe": None}
        if self.is_moe:
            out["moe"] = {"experts": [m.n_experts(l) for l in range(m.n_layers)], "top_k": m.top_k,
                          "shared_expert": [m.has_shared_expert(l) for l in range(m.n_layers)]}
        return out

    @property
    def is_moe(self) -> bool:
        return isinstance(self.model, MoEModel)

    # --------------------------------------------------------------------------------------------- validation
    def check_prompt(self, prompt, what: str = "prompt") -> str:
        if prompt is None or not str(prompt).strip():
            raise FfkvError(f"the {what} is empty", "type a prompt, e.g. 'The Eiffel Tower is located in'")
        prompt = str(prompt)
        if len(prompt) > self.limits.prompt_chars:
            raise FfkvError(f"the {what} has {len(prompt)} characters", f"use at most {self.limits.prompt_chars}")
        n = len(self.model.token_ids(prompt))
        most = min(self.limits.prompt_tokens, self.model.context_length - self.limits.max_new_tokens)
        if n > most:
            raise FfkvError(f"the {what} has {n} tokens", f"use at most {most}")
        if n == 0:
            raise FfkvError(f"the {what} tokenizes to nothing", "type a prompt with words in it")
        return prompt

    def memory(self, name) -> MemoryId:
        mid = MemoryId.parse(str(name).strip() if isinstance(name, str) else name)
        if self.is_moe:  # the width depends on the layer and expert; dense names on MoE layers: the shared expert
            return self.model.check_memory(mid)
        if mid.expert is not None:
            raise FfkvError(f"memory {mid} names an expert, and this {self.model.family} model has none",
                            "use L<layer>.<index>")
        return mid.check(self.model.n_layers, self.model.d_ffn)

    def switches(self, off=(), on=(), positions=None, prompt_tokens: int | None = None) -> dict:
        """Parse ``off=["L3.17", ...]``, ``on=["L3.17=2.5", ...]`` and ``positions="all" | "0,3"``."""
        off = [self.memory(m) for m in parse_memories([s for s in off if s and s.strip()])]
        forced = []
        for item in on:
            if not item or not item.strip():
                continue
            name, sep, value = item.partition("=")
            if not sep:
                raise FfkvError(f"memory switch {item!r} has no value", "write it as L3.17=2.5")
            try:
                v = float(value)
            except ValueError:
                raise FfkvError(f"the value of {name.strip()} is {value!r}, not a number",
                                "write it as L3.17=2.5") from None
            if not np.isfinite(v):
                raise FfkvError(f"the value of {name.strip()} is not finite", "give a finite number")
            forced.append((self.memory(name), v))
        if len(off) + len(forced) > self.limits.switches:
            raise FfkvError(f"{len(off) + len(forced)} memory switches", f"use at most {self.limits.switches}")
        pos = None
        text = (positions or "all").strip().lower()
        if text not in ("all", ""):
            try:
                pos = sorted({int(p) for p in re.split(r"[,\s]+", text) if p})
            except ValueError:
                raise FfkvError(f"positions {positions!r} are not token positions",
                                "write 'all' or comma-separated positions, e.g. 0,3") from None
            if prompt_tokens is not None:
                bad = [p for p in pos if not 0 <= p < prompt_tokens]
                if bad:
                    raise FfkvError(f"positions {bad} are outside the {prompt_tokens}-token prompt",
                                    f"use 0..{prompt_tokens - 1}")
        return {"off": off, "on": forced, "positions": pos}

    # --------------------------------------------------------------------------------------------- prompt view
    @torch.no_grad()
    def prompt_view(self, prompt, top_n=10, value_top=5, off=(), on=(), positions=None, max_new_tokens=20) -> dict:
        """Next-token distribution, per-layer logit lens and top sub-updates; with switches, the
        distribution after them, KL(before || after), the most changed tokens and both continuations."""
        prompt = self.check_prompt(prompt)
        top_n = _int(top_n, "top-n", 1, self.limits.top_n, 10)
        value_top = _int(value_top, "tokens per sub-update", 1, self.limits.value_top, 5)
        max_new = _int(max_new_tokens, "generation length", 0, self.limits.max_new_tokens, 20)
        ids = self.model.token_ids(prompt)
        sw = self.switches(off, on, positions, len(self.model.encode(prompt)["input_ids"][0]))
        m, tok = self.model, self.tok
        with self.lock:
            t0 = time.perf_counter()
            su = sub_updates(m, prompt, top_n=top_n, value_top=value_top)
            batch = m.encode(prompt)
            last = int(batch["attention_mask"].sum()) - 1
            reads = [(s, l) for l in range(m.n_layers) for s in ("resid_post", WRITE_SITE)]
            with intervene(m, reads=reads) as rec:
                logits = m.hf(**batch).logits[0, last]
            probs = torch.softmax(logits.float(), -1)
            lens = []
            for l in range(m.n_layers):
                post = rec["resid_post", l][0, last]
                pre = post - rec[WRITE_SITE, l][0, last]
                lens.append({"layer": l,
                             "before": _dist(tok, torch.softmax(m.unembed(pre).float(), -1), value_top),
                             "after": _dist(tok, torch.softmax(m.unembed(post).float(), -1), value_top)})
            out = {"prompt": prompt, "tokens": [{"position": i, "token": s} for i, s in
                                                 enumerate(_tokens(tok, batch["input_ids"][0]))],
                   "distribution": _dist(tok, probs, top_n), "lens": lens, "layers": su["layers"],
                   "top_n": top_n, "value_top": value_top, "max_new_tokens": max_new, "switch": None}
            if sw["off"] or sw["on"]:
                out["switch"] = self._switch(prompt, sw, top_n, max_new)
            out["seconds"] = time.perf_counter() - t0
        out["n_tokens"] = len(ids)
        return out

    def _switch(self, prompt: str, sw: dict, top_n: int, max_new: int) -> dict:
        m = self.model
        off = list(sw["off"])
        on = [(x, v) for x, v in sw["on"]]
        eff = switch_effect(m, prompt, off=off, on=on, positions=sw["positions"], top=top_n)
        res = {"off": [str(x) for x in sw["off"]], "on": [f"{x}={v:g}" for x, v in sw["on"]],
               "positions": "all" if sw["positions"] is None else ",".join(map(str, sw["positions"])),
               "before": eff["before"], "after": eff["after"], "kl": eff["kl"],
               "increased": eff["increased"], "decreased": eff["decreased"],
               "generation": None}
        if max_new > 0:
            if sw["positions"] is None:
                res["generation"] = generate_with_memories(m, prompt, off=off, on=on, max_new_tokens=max_new)
            else:
                res["generation"] = self._generate_at(prompt, off, on, sw["positions"], max_new)
        return res

    def _generate_at(self, prompt, off, on, positions, max_new) -> dict:
        """Greedy continuations with the switches at chosen prompt positions only: without a key-value cache
        every step re-reads the whole sequence, so a position names the same token at every step."""
        m, tok = self.model, self.tok
        batch = m.encode(prompt)
        kw = dict(max_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id, use_cache=False)
        base = m.hf.generate(**batch, **kw)
        with memory_switches(m, off, on, positions):
            edited = m.hf.generate(**batch, **kw)
        n = batch["input_ids"].shape[1]
        return {"prompt": prompt, "before": tok.decode(base[0, n:]), "after": tok.decode(edited[0, n:])}

    # --------------------------------------------------------------------------------------------- memory page
    @torch.no_grad()
    def memory_page(self, name, prompt=None, n=10, value_top=10) -> dict:
        """One memory: its value's top and bottom tokens, nearest values, and with an atlas its top and
        bottom triggers and pattern label; with a prompt, its coefficient and sub-update rank there."""
        mid = self.memory(name)
        n = _int(n, "triggers", 1, self.limits.search_n, 10)
        value_top = _int(value_top, "value tokens", 1, self.limits.value_top, 10)
        prompt = self.check_prompt(prompt) if prompt else None
        m, tok = self.model, self.tok
        e = mid.expert
        with self.lock:
            lg = value_logits(m, mid.layer, [mid.index], expert=e)[0].float()
            p = torch.softmax(lg, -1)
            hi, lo = lg.topk(value_top).indices, (-lg).topk(value_top).indices
            value = m.values(mid.layer, e)[:, mid.index] if e is not None else m.values(mid.layer)[:, mid.index]
            out = {"memory": str(mid), "layer": mid.layer, "index": mid.index, "expert": e, "prompt": prompt,
                   "value_norm": float(value.float().norm()), "moe": self._moe_note(mid),
                   "value_top": [{"token": s, "id": int(i), "p": float(p[i]), "logit": float(lg[i])}
                                 for s, i in zip(_tokens(tok, hi), hi.tolist())],
                   "value_bottom": [{"token": s, "id": int(i), "p": float(p[i]), "logit": float(lg[i])}
                                    for s, i in zip(_tokens(tok, lo), lo.tolist())],
                   "nearest": self._nearest(mid, n),
                   "atlas": None, "rank": None}
            if self.atlas is not None and e is None:
                d = describe_memory(self.atlas, mid.layer, mid.index, n=n, top_tokens=value_top)
                out["atlas"] = {"pattern": d["pattern"], "agrees": d["agrees"],
                                "top_trigger_next_token": d["top_trigger_next_token"],
                                "triggers": [self._mark(r) for r in d["triggers"]],
                                "bottom_triggers": [self._mark(r) for r in d["bottom_triggers"]]}
            if prompt is not None:
                out["rank"] = memory_rank(m, prompt, mid) if self.is_moe else self._rank(prompt, mid)
        return out

    def _moe_note(self, mid: MemoryId) -> dict | None:
        """Where an MoE model's memory lives: its expert and the layer's routing, or its shared expert."""
        m = self.model
        if not self.is_moe or not m.is_moe_layer(mid.layer):
            return None
        return {"n_experts": m.n_experts(mid.layer), "top_k": m.top_k, "shared": mid.expert is None,
                "d_expert": m.d_expert(mid.layer, mid.expert)}

    def _nearest(self, mid: MemoryId, n: int) -> list[dict]:
        """Values nearest (cosine) to ``mid``'s; an expert memory's within its own expert (same layer)."""
        m = self.model
        if mid.expert is None:
            rows = nearest_values(m, m.values(mid.layer)[:, mid.index], n=n + 1)
        else:
            rows = nearest_values(m, write_values(m, mid.layer, mid.expert)[:, mid.index], n=n + 1,
                                  layers=[mid.layer], expert=mid.expert)
        return [r for r in rows if r["memory"] != str(mid)][:n]

    def _mark(self, row: dict) -> dict:
        """Split a trigger's prefix into the text before the firing token and the firing token itself."""
        ids = self.atlas.prefix(row["unit"], row["position"])
        return {**row, "before": self.tok.decode(ids[:-1]), "firing": self.tok.decode(ids[-1:])}

    def _rank(self, prompt: str, mid: MemoryId) -> dict:
        m = self.model
        batch = m.encode(prompt)
        last = int(batch["attention_mask"].sum()) - 1
        with intervene(m, reads=[("coef", mid.layer)]) as rec:
            m.hf(**batch)
        coef = rec["coef", mid.layer][0].float()  # (T, d_ffn)
        score = coef.abs() * m.values(mid.layer).float().norm(dim=0)
        s = score[last]
        return {"coef": float(coef[last, mid.index]), "score": float(s[mid.index]),
                "rank": int((s > s[mid.index]).sum()) + 1, "of": int(s.numel()),
                "per_position": [{"position": t, "token": self.tok.decode(batch["input_ids"][0, t:t + 1]),
                                  "coef": float(coef[t, mid.index]),
                                  "rank": int((score[t] > score[t, mid.index]).sum()) + 1}
                                 for t in range(last + 1)]}

    # --------------------------------------------------------------------------------------------- search
    @torch.no_grad()
    def search_promotes(self, token, n=20) -> dict:
        """Memories whose values give ``token`` the highest probability (``ffkv atlas promotes``)."""
        if token is None or not str(token).strip():
            raise FfkvError("no token given", "type a token, e.g. Paris")
        n = _int(n, "n", 1, self.limits.search_n, 20)
        with self.lock:
            t = token_id(self.model, str(token))
            rows = promotes(self.model, t, n=n)
        return {"token": str(token), "token_id": t, "token_text": self.tok.decode([t]), "rows": rows}

    @torch.no_grad()
    def search_nearest(self, name, n=20) -> dict:
        """Values nearest (cosine) to memory ``name``'s value (``ffkv atlas nearest``)."""
        mid = self.memory(name)
        n = _int(n, "n", 1, self.limits.search_n, 20)
        with self.lock:
            rows = self._nearest(mid, n)
        return {"memory": str(mid), "rows": rows}

    def search_text(self, query, n=20) -> dict:
        """Memories with a top trigger whose prefix contains ``query`` (case-insensitive), best coefficient
        first, one row per memory."""
        if self.atlas is None:
            raise FfkvError("searching trigger prefixes needs an atlas", "start the server with --atlas DIR")
        if query is None or not str(query).strip():
            raise FfkvError("the search text is empty", "type a word that occurs in the corpus")
        q = str(query).lower()
        if len(q) > 200:
            raise FfkvError(f"the search text has {len(q)} characters", "use at most 200")
        n = _int(n, "n", 1, self.limits.search_n, 20)
        with self.lock:
            idx = self._index()
        best: dict[tuple[int, int], dict] = {}
        for u, (text, ends) in idx["units"].items():
            start = text.find(q)
            if start < 0:
                continue
            # A prefix unit[:p + 1] contains the match when it reaches past the match's end.
            first_end = start + len(q)
            for layer, index, p, coef in idx["by_unit"].get(u, ()):
                if ends[p] >= first_end and ((layer, index) not in best or coef > best[layer, index]["coef"]):
                    best[layer, index] = {"memory": str(MemoryId(layer, index)), "layer": layer, "index": index,
                                          "coef": coef, "unit": u, "position": p}
        rows = sorted(best.values(), key=lambda r: -r["coef"])[:n]
        for r in rows:
            ids = self.atlas.prefix(r["unit"], r["position"])
            r["before"], r["firing"] = self.tok.decode(ids[:-1]), self.tok.decode(ids[-1:])
        return {"query": str(query), "rows": rows, "matched": len(best)}

    def _index(self) -> dict:
        """Per unit: its lower-cased text and the end offset of each token; per unit, its top triggers."""
        if self._trigger_index is None:
            units = {}
            for u, (toks, _) in self.atlas.units.items():
                pieces = _tokens(self.tok, toks)
                units[u] = ("".join(pieces).lower(), np.cumsum([len(s) for s in pieces]).tolist())
            by_unit: dict[int, list] = {}
            for layer in range(self.atlas.n_layers):
                tm = self.atlas.trigger_matrix(layer, "top")
                for index, r in zip(*np.nonzero(tm["unit"] >= 0)):
                    by_unit.setdefault(int(tm["unit"][index, r]), []).append(
                        (layer, int(index), int(tm["position"][index, r]), float(tm["coef"][index, r])))
            self._trigger_index = {"units": units, "by_unit": by_unit}
        return self._trigger_index

    # --------------------------------------------------------------------------------------------- trace, locate
    def trace(self, prompt, subject, answer=None, paraphrases=(), samples=10, neurons=True) -> dict:
        """The three causal traces of ``prompt`` (ROME: restored P(answer) per token and layer) and the fact's
        knowledge neurons over the prompt and its paraphrases."""
        prompt = self.check_prompt(prompt)
        if not subject or not str(subject).strip():
            raise FfkvError("no subject given", "type the subject as it is written in the prompt")
        subject = str(subject)
        if subject not in prompt:
            raise FfkvError(f"subject {subject!r} does not occur in prompt {prompt!r}",
                            "type the subject exactly as it is written in the prompt")
        samples = _int(samples, "samples", 1, 50, 10)
        paraphrases = [self.check_prompt(p, "paraphrase") for p in paraphrases if p and p.strip()]
        if len(paraphrases) > self.limits.extra_prompts:
            raise FfkvError(f"{len(paraphrases)} paraphrases", f"use at most {self.limits.extra_prompts}")
        answer = str(answer).strip() if answer and str(answer).strip() else None
        with self.lock:
            t0 = time.perf_counter()
            a = self.model.answer_id(answer) if answer else None
            # one clean and one corrupted run shared by the three kinds
            traces = {k: t.to_json() for k, t in
                      causal_traces(self.model, prompt, subject, KINDS, answer=a, samples=samples).items()}
            answer_text = traces["hidden"]["answer"] if answer is None else answer
            kn, kn_note = None, None
            m = self.model
            experts = None
            if neurons and self.is_moe and any(not m.has_shared_expert(l) for l in m.moe_layers):
                # Routed experts: the neurons of the heaviest expert the prompt's last token is routed to, per
                # MoE layer (knowledge_neurons(experts=...)); paraphrases route their last tokens elsewhere.
                batch = m.encode(prompt)
                with expert_intervene(m, reads=list(m.moe_layers)) as rec:
                    m.hf(**batch)
                experts = {l: int(rec.routing[l][0][0, -1, int(rec.routing[l][1][0, -1].argmax())])
                           for l in m.moe_layers if l in rec.routing}
                kn_note = ("knowledge neurons of the heaviest routed expert per MoE layer, for the prompt alone: "
                           + ", ".join(f"L{l}.E{e}" for l, e in experts.items()))
            elif neurons and self.is_moe and m.moe_layers:
                kn_note = "knowledge neurons over the shared experts' memories only (routed experts are not searched)"
            if neurons:
                if experts:
                    res = knowledge_neurons(self.model, [prompt], answer_text, experts=experts,
                                            layers=sorted(experts))
                else:
                    res = knowledge_neurons(self.model, [prompt, *paraphrases], answer_text)
                kn = [{"memory": str(n.memory), "layer": n.layer, "index": n.index, "attribution": float(n.attribution)}
                      for n in res.neurons]
            seconds = time.perf_counter() - t0
        for t in traces.values():
            t["max"] = max(t["high_score"], float(np.max(t["scores"])))
        return {"prompt": prompt, "subject": subject, "answer": answer_text, "paraphrases": paraphrases,
                "traces": traces, "neurons": kn, "neurons_note": kn_note, "samples": samples,
                "seconds": seconds}

    # --------------------------------------------------------------------------------------------- edit
    def request(self, prompt, subject, target, target_true=None) -> EditRequest:
        prompt = self.check_prompt(prompt, "edit prompt")
        if not subject or not str(subject).strip():
            raise FfkvError("the edit has no subject", "type the subject as it is written in the prompt")
        if not target or not str(target).strip():
            raise FfkvError("the edit has no target", "type the new object, e.g. Rome")
        req = EditRequest(prompt, str(subject), self._continuation(target),
                          self._continuation(target_true) if target_true and str(target_true).strip() else None)
        return req.validate()

    @staticmethod
    def _continuation(obj: str) -> str:
        # An object follows its prompt as a new word: the answer rule's leading space.
        obj = str(obj)
        return obj if obj[:1].isspace() else " " + obj

    @torch.no_grad()
    def _scores(self, prompts: list[str], target: str, target_true: str | None) -> list[dict]:
        m = self.model
        probs = m.next_token_probs(prompts)
        t = m.answer_id(target)
        tt = m.answer_id(target_true) if target_true else None
        rows = []
        for p, row in zip(prompts, probs):
            top = int(row.argmax())
            rows.append({"prompt": p, "top": self.tok.decode([top]), "top_p": float(row[top]),
                         "p_new": float(row[t]), "p_true": float(row[tt]) if tt is not None else None})
        return rows

    def edit(self, prompt, subject, target, target_true=None, method="rome", paraphrases=(), neighbours=()) -> dict:
        """Apply one ROME or MEMIT edit (``ffkv edit``), journal it on disk, and score the edit prompt, its
        paraphrases and its neighbours before and after."""
        if method not in EDIT_METHODS:
            raise FfkvError(f"unknown edit method {method!r}", f"use one of {', '.join(EDIT_METHODS)}")
        req = self.request(prompt, subject, target, target_true)
        hparams = self._check_edit_layers(method)
        groups = {"edit prompt": [req.text],
                  "paraphrases": [self.check_prompt(p, "paraphrase") for p in paraphrases if p and p.strip()],
                  "neighbours": [self.check_prompt(p, "neighbour") for p in neighbours if p and p.strip()]}
        if len(groups["paraphrases"]) + len(groups["neighbours"]) > self.limits.extra_prompts:
            raise FfkvError("too many paraphrases and neighbours", f"use at most {self.limits.extra_prompts}")
        with self.lock:
            t0 = time.perf_counter()
            if req.target_true is None:
                req.target_true = self._continuation(self._scores([req.text], req.target, None)[0]["top"].strip()
                                                     or "?")
                if req.target_true.strip() == req.target.strip():
                    raise FfkvError(f"the model already continues '{req.text}' with{req.target}",
                                    "pass a different target")
            before = {g: self._scores(ps, req.target, req.target_true) for g, ps in groups.items() if ps}
            stats = None if self.state_dir is None else self.state_dir / "stats"
            apply_edits(self.model, [req], method=method, hparams=hparams or None, stats_dir=stats,
                        journal=self.journal, progress=False)
            self._save_journal()
            after = {g: self._scores(ps, req.target, req.target_true) for g, ps in groups.items() if ps}
            seconds = time.perf_counter() - t0
        return {"request": req.to_json(), "text": req.text, "method": method, "seconds": seconds,
                "groups": [{"name": g, "rows": [{"before": b, "after": a} for b, a in zip(before[g], after[g])]}
                           for g in before]}

    def _check_edit_layers(self, method: str) -> dict:
        """The hyperparameters an edit of this model needs: on an MoE layer whose FFN is only routed experts,
        ROME edits the heaviest routed expert's W_out (``expert="top"``, statistics over the tokens routed to
        it); MEMIT, which needs its experts named, is refused there in one line. Dense layers and shared
        experts are edited as usual."""
        m = self.model
        hp = dict(self.edit_hparams or {})
        if not self.is_moe:
            return hp
        full = {**get_method(method).defaults(m), **hp}
        routed = [l for l in get_method(method).layers(full) if m.is_moe_layer(l) and not m.has_shared_expert(l)]
        if routed and method == "rome" and full.get("expert") is None:
            hp["expert"] = "top"
        elif routed and method != "rome" and full.get("expert") is None:
            raise FfkvError(f"{method} would edit layer{'s' if len(routed) > 1 else ''} {', '.join(map(str, routed))}, "
                            "whose FFN is only routed experts",
                            "edit with ROME (it picks the routed expert), or name the experts with ffkv edit --set expert=E")
        return hp

    def edit_groups(self) -> list[list[int]]:
        """Journal entries grouped by the edit that made them: a ROME edit is one entry, a MEMIT edit one
        entry per layer of its ``layers`` (recorded in order, the same requests)."""
        groups: list[list[int]] = []
        for i, e in enumerate(self.journal.entries):
            prev = self.journal.entries[i - 1] if groups else None
            cont = (prev is not None and e.method == prev.method == "memit" and e.requests == prev.requests
                    and e.hparams == prev.hparams and list(e.hparams.get("layers") or [])[:1] != [e.layer])
            if cont:
                groups[-1].append(i)
            else:
                groups.append([i])
        return groups

    def undo(self, n=1) -> int:
        """Undo the last ``n`` edits (each with all its journal entries), bit for bit, and save the journal.
        Returns the number of journal entries undone."""
        groups = self.edit_groups()
        if not groups:
            raise FfkvError("the journal is empty: there is no edit to undo", "apply an edit first")
        n = _int(n, "edits to undo", 1, len(groups), 1)
        with self.lock:
            done = self.journal.undo(self.model, sum(len(g) for g in groups[-n:]))
            self._save_journal()
        return done

    def journal_rows(self) -> list[dict]:
        rows = []
        for k, g in enumerate(self.edit_groups()):
            e = self.journal.entries[g[0]]
            rows.append({"n": k + 1, "method": e.method, "layers": [self.journal.entries[i].layer for i in g],
                         "created": e.created,
                         "requests": [f"{EditRequest.from_json(r).text} ->{r.get('target', '')}"
                                      for r in e.requests]})
        return rows

    def _save_journal(self):
        if self.journal_path is not None:
            self.journal.save(self.journal_path, self.model)

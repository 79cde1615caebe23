"""Tables and plots from the JSON-lines rows of the few-step benchmarks (style, guidance, negation).

    python -m benchmarks.fewstep_tables --style S.jsonl [--guidance G.jsonl] [--negation N.jsonl] \
        [--figures benchmarks/figures --prefix fewstep] > tables.md
"""

from __future__ import annotations

import argparse
import collections
import math
from pathlib import Path
from typing import Any

from benchmarks import fewstep_common as C


def _f(v: Any, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def table(rows: list[list[Any]], header: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_f(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def _index(rows: list[dict]) -> dict:
    return {(r["style"], r["method"], r["sites"], float(r["strength"])): r for r in rows}


def style_tables(rows: list[dict]) -> str:
    """Per site set: rows = fit, columns = presence at each strength (content kept at 1 and 2), per style."""
    out = []
    styles = list(dict.fromkeys(r["style"] for r in rows))
    idx = _index(rows)
    strengths = sorted({float(r["strength"]) for r in rows if r["method"] not in ("unsteered", "prompt", "itic")})
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m not in ("unsteered", "prompt")]
    sites = [s for s in dict.fromkeys(r["sites"] for r in rows) if s != "-"]
    for style in styles:
        p, u = idx.get((style, "prompt", "-", 1.0)), idx.get((style, "unsteered", "-", 0.0))
        out.append(f"**{style}**: prompt presence {_f(p and p['style_presence'])}, content kept "
                   f"{_f(p and p['content_kept'])}, feature sim. {_f(p and p['feature_sim'])}; unsteered presence "
                   f"{_f(u and u['style_presence'])}.\n")
        body = []
        for site in sites:
            for method in methods:
                ss = [s for s in sorted({k[3] for k in idx if k[:3] == (style, method, site)})]
                if not ss:
                    continue
                cells = [idx[(style, method, site, s)] for s in ss]
                pres = " / ".join(_f(c["style_presence"]) for c in cells)
                kept = " / ".join(_f(c["content_kept"]) for c in cells)
                fsim = " / ".join(_f(c["feature_sim"]) for c in cells)
                body.append([site, method, " ".join(f"{s:g}" for s in ss), pres, kept, fsim])
        out.append(table(body, ["sites", "fit", "strengths", "presence", "content kept", "feature sim."]) + "\n")
    _ = strengths
    return "\n".join(out)


def style_summary(rows: list[dict], strength: float = 1.0) -> str:
    """Rows = (sites, fit), columns = styles: presence (content kept) at ``strength``; the prompt first."""
    styles = list(dict.fromkeys(r["style"] for r in rows))
    idx = _index(rows)
    body = [["-", "prompt", *[f"{_f(idx[(s, 'prompt', '-', 1.0)]['style_presence'])} "
                              f"({_f(idx[(s, 'prompt', '-', 1.0)]['content_kept'])})" for s in styles]]]
    keys = list(dict.fromkeys((r["sites"], r["method"]) for r in rows if r["sites"] != "-"))
    for site, method in keys:
        cells = []
        for s in styles:
            r = idx.get((s, method, site, strength))
            cells.append(f"{_f(r['style_presence'])} ({_f(r['content_kept'])})" if r else "")
        body.append([site, method, *cells])
    return table(body, ["sites", "fit", *styles])


def guidance_table(rows: list[dict], strength: float = 1.0) -> str:
    """Per (model, fit, placement): presence at each guidance, keep-ratio vs no guidance; prompt rows too."""
    out = []
    by = collections.defaultdict(dict)
    for r in rows:
        if r["method"] == "unsteered":
            continue
        if r["method"] != "prompt" and float(r["strength"]) != strength:
            continue
        by[(r["method"], r.get("sites", "-"), r.get("placement", "-"))].setdefault(r["style"], {})[
            float(r["guidance"])] = r
    guidances = sorted({float(r["guidance"]) for r in rows})
    styles = list(dict.fromkeys(r["style"] for r in rows))
    body = []
    for (method, site, placement), per_style in by.items():
        if placement == "-" and method != "prompt":
            continue
        for style in styles:
            cells = per_style.get(style, {})
            base = by.get((method, site, "-"), {}).get(style, {}) if method != "prompt" else cells
            g0 = base.get(guidances[0])
            pres = []
            for g in guidances:
                r = cells.get(g) or (g0 if g == guidances[0] else None)
                pres.append(f"{_f(r['style_presence'])} ({_f(r['content_kept'])})" if r else "")
            ratios = [cells[g]["style_presence"] / g0["style_presence"] for g in guidances
                      if g >= 3 and g in cells and g0 and g0["style_presence"] > 0]
            body.append([method, site, placement, style, *pres, _f(min(ratios)) if ratios else ""])
    out.append(table(body, ["fit", "sites", "placement", "style", *[f"g={g:g}" for g in guidances],
                            "min keep-ratio g>=3"]))
    return "\n".join(out)


def negation_table(rows: list[dict]) -> str:
    body = []
    for r in rows:
        body.append([r["style"], r["method"], r["sites"], r["strength"], r.get("guidance", ""), r["style_presence"],
                     r["plain"], r["content_kept"], r["feature_sim"]])
    return table(body, ["style", "method", "sites", "strength", "guidance", "left", "plain", "content kept",
                        "feature sim."])


def plot_style(rows: list[dict], path: Path, key: str = "style_presence", title: str = "presence") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = list(dict.fromkeys(r["style"] for r in rows))
    sites = [s for s in dict.fromkeys(r["sites"] for r in rows) if s != "-"]
    idx = _index(rows)
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m not in ("unsteered", "prompt", "itic")]
    fig, axes = plt.subplots(len(sites), len(styles), figsize=(2.3 * len(styles), 2.1 * len(sites)), squeeze=False,
                             sharex=True, sharey=True)
    for i, site in enumerate(sites):
        for j, style in enumerate(styles):
            ax = axes[i][j]
            u = idx.get((style, "unsteered", "-", 0.0))
            for n, method in enumerate(methods):
                ss = sorted(k[3] for k in idx if k[:3] == (style, method, site))
                if not ss:
                    continue
                xs, ys = [0.0, *ss], [u[key] if u else float("nan"), *[idx[(style, method, site, s)][key] for s in ss]]
                ax.plot(xs, ys, marker=".", ms=3, lw=1, label=method, color=f"C{n % 10}")  # one colour per fit
            p = idx.get((style, "prompt", "-", 1.0))
            if p:
                ax.axhline(p[key], color="grey", lw=1, ls="--")
            ax.axvline(1.0, color="lightgrey", lw=0.8, ls=":")
            ax.set_ylim(-0.02, 1.02)
            if i == 0:
                ax.set_title(style, fontsize=9)
            if j == 0:
                ax.set_ylabel(f"{site}\n{title}", fontsize=8)
            ax.tick_params(labelsize=7)
    handles = {h.get_label(): h for ax in axes.flat for h in ax.get_lines() if not h.get_label().startswith("_")}
    fig.legend(list(handles.values()), list(handles), fontsize=6, loc="lower right", ncol=len(handles))
    fig.supxlabel("strength (dashed: the prompt)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--style", type=Path, default=None)
    parser.add_argument("--guidance", type=Path, default=None)
    parser.add_argument("--negation", type=Path, default=None)
    parser.add_argument("--figures", type=Path, default=None)
    parser.add_argument("--prefix", default="fewstep")
    args = parser.parse_args(argv)
    if args.style:
        rows = C.read_rows(args.style)
        print("### Style induction, strength 1: presence (content kept)\n")
        print(style_summary(rows))
        print("\n### Style induction, every strength\n")
        print(style_tables(rows))
        if args.figures:
            plot_style(rows, args.figures / f"{args.prefix}_style_presence.png")
            plot_style(rows, args.figures / f"{args.prefix}_style_kept.png", "content_kept", "content kept")
    if args.guidance:
        print("\n### Guidance: presence (content kept) at strength 1\n")
        print(guidance_table(C.read_rows(args.guidance)))
    if args.negation:
        print("\n### Negation\n")
        print(negation_table(C.read_rows(args.negation)))


if __name__ == "__main__":
    main()

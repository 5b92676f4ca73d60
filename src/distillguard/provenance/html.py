"""An HTML page and a PNG bar chart summarising a provenance report."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any


def write_png(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["accounts"][:30]
    fig, ax = plt.subplots(figsize=(8, 0.35 * max(len(rows), 3) + 1.2))
    ax.barh([r["account_id"] for r in rows][::-1], [r["share"] * 100 for r in rows][::-1])
    ax.set_xlabel("share of the suspect set attributed (%)")
    ax.set_title(f"{report['suspect']['matched']} of {report['suspect']['items']} items matched")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_html(report: dict[str, Any], path: Path) -> None:
    png = path.with_suffix(".png")
    write_png(report, png)
    rows = []
    for a in report["accounts"]:
        fp = a.get("fingerprint")
        fp_text = f"{fp['matches']}/{fp['slots']} (p={fp['p_value']:.2g})" if fp else "-"
        rows.append(f"<tr><td>{html.escape(a['account_id'])}</td><td>{a['items']}</td>"
                    f"<td>{a['share']:.1%}</td><td>{a['exchanges']}</td>"
                    f"<td>{html.escape(a['first_ts'])}</td><td>{html.escape(a['last_ts'])}</td>"
                    f"<td>{fp_text}</td></tr>")
    s = report["suspect"]
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>Provenance report</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:4px 10px;border-bottom:1px solid #ddd}}</style>
</head><body><h1>Provenance report</h1>
<p>{s['matched']} of {s['items']} suspect items matched ({s['matched_share']:.1%});
{report['source']['exchanges_scanned']} exchanges scanned;
{len(report['incidental'])} accounts with incidental matches not named.</p>
<img src="{html.escape(png.name)}" alt="share per account">
<table><tr><th>account</th><th>items</th><th>share</th><th>exchanges</th><th>first</th>
<th>last</th><th>fingerprint</th></tr>{''.join(rows)}</table></body></html>"""
    path.write_text(page, encoding="utf-8")

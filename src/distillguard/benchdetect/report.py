"""The metrics table (text) and the PNG report of ``bench detect``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distillguard.benchdetect.metrics import Scores


def _f(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(scores: Scores) -> str:
    head = (f"{'campaign type':<16} {'accts':>6} {'flagged':>7} {'prec':>5} {'recall':>6} "
            f"{'camps':>7} {'ARI':>5} {'ex<flag':>8} {'h<flag':>7} {'camp h':>7}")
    lines = [head, "-" * len(head)]

    def row(name: str, r: dict[str, Any]) -> str:
        camps = f"{r['campaigns_detected']}/{r['campaigns']}"
        return (f"{name:<16} {r['accounts']:>6} {r['flagged']:>7} {_f(r['precision']):>5} "
                f"{_f(r['recall']):>6} {camps:>7} {_f(r['ari']):>5} "
                f"{_f(r['exchanges_before_flag_median'], 0):>8} "
                f"{_f(r['hours_to_flag_median'], 1):>7} "
                f"{_f(r['campaign_hours_to_first_flag_median'], 1):>7}")

    for kind, r in scores.rows.items():
        lines.append(row(kind, r))
    lines.append("-" * len(head))
    lines.append(row("overall", scores.overall))
    o = scores.overall
    lines.append("")
    lines.append(f"{'benign population':<18} {'accts':>6} {'flagged':>7} {'FPR':>6}")
    for name, b in scores.benign.items():
        tag = " (hard negative)" if b["hard_negative"] else ""
        lines.append(f"{name:<18} {b['accounts']:>6} {b['flagged']:>7} {_f(b['fpr'], 3):>6}{tag}")
    lines.append(f"{'all benign':<18} {o['benign_accounts']:>6} {o['benign_flagged']:>7} "
                 f"{_f(o['benign_fpr'], 3):>6}")
    lines.append(f"{'hard negatives':<18} {o['hard_negative_accounts']:>6} {'':>7} "
                 f"{_f(o['hard_negative_fpr'], 3):>6}")
    lines.append("")
    d = scores.detector
    lines.append(f"F1 {_f(o['f1'])}; {o['trace_exchanges']} exchanges; "
                 f"{o['verdicts_missing']} accounts without a verdict; detector "
                 + (f"{d['exchanges_per_second']:,.0f} exchanges/s "
                    f"({d['elapsed_seconds']:.1f} s)" if d["exchanges_per_second"]
                    else "throughput unknown (pass --elapsed or elapsed_seconds in verdicts)"))
    lines.append("ex<flag: median exchanges of a caught account before its flag; h<flag: "
                 "median hours from its first exchange; camp h: median hours from a "
                 "campaign's first exchange to its first flag")
    return "\n".join(lines)


def write_png(scores: Scores, path: str | Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(scores.rows)
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 5.5), layout="constrained",
                                        gridspec_kw={"width_ratios": [3, 1.4, 3]})
    x = range(len(kinds))
    width = 0.4
    prec = [scores.rows[k]["precision"] or 0.0 for k in kinds]
    rec = [scores.rows[k]["recall"] or 0.0 for k in kinds]
    ax1.bar([i - width / 2 for i in x], prec, width, label="precision", color="#4c72b0")
    ax1.bar([i + width / 2 for i in x], rec, width, label="recall", color="#dd8452")
    ax1.set_xticks(list(x), kinds, rotation=35, ha="right")
    ax1.set_ylim(0, 1.05)
    ax1.set_title("accounts: precision and recall per campaign type")
    ax1.legend(loc="lower right")
    pops = list(scores.benign)
    ax2.bar(pops, [scores.benign[p]["fpr"] or 0.0 for p in pops],
            color=["#c44e52" if scores.benign[p]["hard_negative"] else "#8172b2" for p in pops])
    ax2.set_title("benign false-positive rate\n(red: hard negatives)")
    ax2.tick_params(axis="x", rotation=35)
    caught = [i for i, k in enumerate(kinds, 1) if scores.hours_to_flag.get(k)]
    if caught:
        ax3.boxplot([scores.hours_to_flag[kinds[i - 1]] for i in caught], positions=caught,
                    showfliers=True)
    for i, _ in enumerate(kinds, 1):
        if i not in caught:
            ax3.text(i, 0.02, "none\ncaught", ha="center", va="bottom", fontsize=8,
                     color="gray", transform=ax3.get_xaxis_transform())
    ax3.set_ylim(bottom=0)
    ax3.set_xlim(0.5, len(kinds) + 0.5)
    ax3.set_xticks(range(1, len(kinds) + 1), kinds, rotation=35, ha="right")
    ax3.set_ylabel("hours from first exchange to flag")
    ax3.set_title("time to detect (flagged attack accounts)")
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)

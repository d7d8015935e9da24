"""The markdown and HTML that more than one part of timm_dgate writes: profiles, preprocessing, curves, pages.

Only formatting lives here; the numbers come from the objects passed in, so the same table reads
the same wherever it appears (terminal, results.md, a Hub model card, docs/). The tables of
``evaluate`` and ``throughput`` live with their results (``evaluation.results``), the recipe's
results.md with the recipe (``cli.outputs``): this module imports nothing of timm_dgate above ``core``.
"""

from __future__ import annotations

import base64
import html
import itertools
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .core.profiles import Profile


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.2%}"


def data_config_summary(config: Mapping[str, Any]) -> str:
    """A timm data config (or ``pretrained_cfg``) in one line: what ``create_transform`` does to an image."""

    def values(key: str) -> str:
        return ", ".join(f"{v:.4g}" for v in config[key])

    size = "x".join(str(v) for v in config["input_size"])
    return (
        f"input {size}, mean {values('mean')}, std {values('std')}, interpolation {config.get('interpolation')}, "
        f"crop_pct {config.get('crop_pct')} (crop_mode {config.get('crop_mode') or 'center'})"
    )


def profiles_table(profiles: Sequence[Profile]) -> str:
    """Markdown section listing each profile with what it was measured at (model card, recipe results)."""
    if not profiles:
        return (
            "## Threshold profiles\n\nNone yet: every gate is closed, so the model answers exactly like the "
            "plain backbone until thresholds are calibrated.\n"
        )
    rows = [
        "## Threshold profiles\n",
        "Chosen on the split named, never on test data. GFLOPs are the average per image at that "
        "split's exits; exit fractions are per gate, then the backbone's head.\n",
        "| profile | exit score | thresholds | split | accuracy | plain accuracy | GFLOPs | exit fractions | test |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in profiles:
        cells = [
            f"`{p.name}`",
            p.exit_score,
            ", ".join(_fmt(t) for t in p.thresholds),
            p.split,
            _pct(p.val_accuracy),
            _pct(p.val_plain_accuracy),
            "—" if p.val_gflops is None else f"{p.val_gflops:.4g}",
            ", ".join(f"{f:.1%}" for f in p.exit_fractions) or "—",
            ", ".join(f"{k}: {_fmt(v)}" for k, v in p.test.items()) or "—",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def accuracy_at(points: Sequence[tuple[float, float]], gflops: float) -> float | None:
    """Accuracy of a trade-off curve ``(accuracy, GFLOPs)`` at ``gflops``, linearly interpolated; None outside it."""
    for (acc_a, g_a), (acc_b, g_b) in itertools.pairwise(points):
        if g_a <= gflops <= g_b:
            return acc_a if g_b == g_a else acc_a + (acc_b - acc_a) * (gflops - g_a) / (g_b - g_a)
    return None


def equal_flops_table(curves: Mapping[str, Sequence[tuple[float, float]]], plain: tuple[float, float]) -> str:
    """Markdown: every curve's accuracy at the same average compute (shares of the plain model's)."""
    shares = (0.35, 0.4, 0.45, 0.5, 0.55, 0.6)
    header = "| gates | " + " | ".join(f"{100 * s:.0f}% FLOPs" for s in shares) + " |"
    lines = [header, "|---" * (len(shares) + 1) + "|"]
    for label, points in curves.items():
        cells = [accuracy_at(points, s * plain[1]) for s in shares]
        lines.append(f"| {label} | " + " | ".join("-" if a is None else f"{100 * a:.2f}%" for a in cells) + " |")
    return "\n".join(lines) + f"\n\n(plain model: {100 * plain[0]:.2f}% at {plain[1]:.4f} GFLOPs)"


def html_report(title: str, sections: Sequence[tuple[str, str]], images: Sequence[tuple[str, bytes]]) -> str:
    """One self-contained HTML page: each section's markdown tables and text, then the PNG images inlined.

    No server and no side files: the page opens from disk in any browser.
    """
    body = [f"<h1>{html.escape(title)}</h1>"]
    for heading, markdown in sections:
        body.append(f"<h2>{html.escape(heading)}</h2>")
        body.append(_markdown_block_html(markdown))
    for caption, png in images:
        data = base64.b64encode(png).decode()
        body.append(f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
                    f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    style = ("body{font-family:sans-serif;max-width:72em;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.25em .6em}"
             "th{background:#f3f3f3}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _markdown_block_html(markdown: str) -> str:
    """Markdown pipe tables become <table>; other non-empty lines become paragraphs."""
    out: list[str] = []
    rows: list[list[str]] = []

    def flush() -> None:
        if rows:
            head, *rest = rows
            out.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rest)
                       + "</table>")
            rows.clear()

    for line in markdown.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= set("-: ") for c in cells):  # skip the |---| rule
                rows.append(cells)
            continue
        flush()
        if line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
    flush()
    return "\n".join(out)

"""Token-reward heat maps: the terminal (rich), HTML for MLflow, and a matplotlib PNG.

Tokens are shown as the tokenizer decodes them. Colour is the sign and size of the reward on a scale shared by
every row of one source in a pair, so chosen and rejected compare directly: green > 0, red < 0, white 0.
"""

from __future__ import annotations

import html
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from rich.console import Group
from rich.panel import Panel
from rich.text import Text

from creditflow.tasks.plots import finish, new_figure

_POSITIVE = np.array([46, 160, 67])
_NEGATIVE = np.array([215, 48, 39])
_WHITE = np.array([255, 255, 255])


def token_pieces(tokenizer, ids: list[int]) -> list[str]:
    """The text each token adds to the decoded sequence. A token that ends inside a multi-byte character (byte-level
    BPE on emoji) adds nothing; the token completing the character shows it."""
    pieces, shown = [], ""
    for end in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:end], skip_special_tokens=False)
        if text.endswith("\ufffd") and end < len(ids):
            pieces.append("")
            continue
        common = len(os.path.commonprefix([shown, text]))
        pieces.append(text[common:])
        shown = text
    return pieces


def reward_rgb(value: float, scale: float) -> tuple[int, int, int]:
    strength = min(abs(value) / scale, 1.0) if scale > 0 else 0.0
    target = _POSITIVE if value >= 0 else _NEGATIVE
    return tuple(int(c) for c in np.round(_WHITE + strength * (target - _WHITE)))


def _scales(rows: list[dict[str, Any]]) -> dict[str, float]:
    scales: dict[str, float] = {}
    for row in rows:
        peak = float(np.max(np.abs(row["rewards"]))) if len(row["rewards"]) else 0.0
        scales[row["source"]] = max(scales.get(row["source"], 0.0), peak)
    return scales


def _tokenizer_for(tokenizer, source: str):
    return tokenizer[source] if isinstance(tokenizer, Mapping) else tokenizer


def _title(row: dict[str, Any]) -> str:
    return f"{row['side']} · {row['source']} · {row['n_tokens']} tokens · sum {float(np.sum(row['rewards'])):+.4f}"


def render_pair(pair_id: str, rows: list[dict[str, Any]], tokenizer):
    """A rich renderable of one pair's token rewards (``creditflow rewards show PAIR_ID``).

    ``rows`` are ``token_rewards`` rows (any pairs; this pair's are picked); ``tokenizer`` decodes their token ids,
    or maps source -> tokenizer when sources were tokenized differently (ABC rows hold reward-model tokens).
    """

    mine = [r for r in rows if r["pair_id"] == pair_id]
    if not mine:
        raise KeyError(f"no token rewards for pair {pair_id}")
    scales = _scales(mine)
    panels = [Text(f"pair {pair_id}: green > 0 > red, full colour at |r| = max of the pair per source", style="dim")]
    for row in mine:
        text = Text()
        pieces = token_pieces(_tokenizer_for(tokenizer, row["source"]), list(row["token_ids"]))
        for piece, value in zip(pieces, row["rewards"]):
            r, g, b = reward_rgb(float(value), scales[row["source"]])
            text.append(piece.replace("\n", "↵\n"), style=f"black on rgb({r},{g},{b})")
        panels.append(Panel(text, title=_title(row), title_align="left"))
    return Group(*panels)


def heatmap_html(rows: list[dict[str, Any]], tokenizer) -> str:
    """Self-contained HTML: one block per row, each token a coloured span with its reward as tooltip."""
    scales = _scales(rows)
    blocks = []
    for row in rows:
        pieces = token_pieces(_tokenizer_for(tokenizer, row["source"]), list(row["token_ids"]))
        spans = []
        for piece, value in zip(pieces, row["rewards"]):
            r, g, b = reward_rgb(float(value), scales[row["source"]])
            text = html.escape(piece).replace("\n", "↵<br>")
            spans.append(f'<span title="{float(value):+.4f}" style="background:rgb({r},{g},{b})">{text}</span>')
        blocks.append(f"<h4>{html.escape(row['pair_id'])} · {html.escape(_title(row))}</h4><pre>{''.join(spans)}</pre>")
    style = "body{font-family:sans-serif} pre{white-space:pre-wrap;font-size:14px;line-height:1.6}"
    return f"<!doctype html><meta charset='utf-8'><style>{style}</style><body>{''.join(blocks)}</body>"


def heatmap_figure(rows: list[dict[str, Any]]):
    """One strip per row (token position on x), colour = reward on a symmetric scale."""
    width = max(len(r["rewards"]) for r in rows)
    grid = np.full((len(rows), width), np.nan)
    for i, row in enumerate(rows):
        grid[i, : len(row["rewards"])] = row["rewards"]
    scale = float(np.nanmax(np.abs(grid))) or 1.0
    fig, (ax,) = new_figure(1, (min(4 + width / 12, 24), 1 + 0.45 * len(rows)))
    image = ax.imshow(grid, aspect="auto", cmap="RdYlGn", vmin=-scale, vmax=scale, interpolation="nearest")
    ax.set_yticks(range(len(rows)), [f"{r['pair_id'][:8]} {r['side']} {r['source']}" for r in rows])
    ax.set_xlabel("completion token")
    fig.colorbar(image, ax=ax, label="token reward")
    return finish(fig)

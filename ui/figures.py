"""Plotly figures built from the engine's data (the engine never plots; STYLE habit 7).

Every user-supplied string (class names, file names) goes through :func:`safe_label` first: Plotly
renders a small HTML subset in labels (``<a href>``, ``<b>``, ...), so a class called
``<a href=...>`` must show as text, not become a link.
"""

from __future__ import annotations

import html
import math
import textwrap
from collections.abc import Sequence

from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

BLUE = "#2563eb"
LIGHT_BLUE = "#93c5fd"
GREEN = "#16a34a"
ORANGE = "#ea580c"
GREY = "#94a3b8"
DARK = "#0f172a"
SPLIT_COLOURS = {"train": BLUE, "val": ORANGE, "test": GREEN}
SPLIT_NAMES = {"train": "training", "val": "validation", "test": "test"}


def safe_label(text: object, limit: int = 40) -> str:
    """``text`` shortened to ``limit`` characters and escaped so Plotly shows it literally."""
    s = str(text)
    if len(s) > limit:
        s = s[: limit - 1] + "…"
    return html.escape(s, quote=False)


def _base(fig: go.Figure, *, height: int, title: str | None = None) -> go.Figure:
    fig.update_layout(
        height=height,
        margin=dict(l=10, r=10, t=40 if title else 10, b=10),
        title=dict(text=title, x=0, font=dict(size=15)) if title else None,
        legend=dict(orientation="h", yanchor="bottom", y=1.02, xanchor="right", x=1),
        font=dict(size=13),
    )
    return fig


def human_count(n: float) -> str:
    """1234567 -> ``1.2M``."""
    n = float(n)
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.1f}{unit}"
    return f"{n:.0f}"


# --------------------------------------------------------------------------------------------------
# Data


def class_counts(counts: dict[str, int], split_counts: dict[str, dict[str, int]] | None = None) -> go.Figure:
    """Images per class, stacked by split when the data has split folders."""
    classes = list(counts)
    # Long names wrap onto lines instead of Plotly turning every label sideways.
    labels = ["<br>".join(textwrap.wrap(safe_label(c), 14, break_long_words=False)) or safe_label(c) for c in classes]
    fig = go.Figure()
    if split_counts:
        for split, per_class in split_counts.items():
            fig.add_bar(
                x=labels,
                y=[per_class.get(c, 0) for c in classes],
                name=SPLIT_NAMES.get(split, split),
                marker_color=SPLIT_COLOURS.get(split, GREY),
            )
        fig.update_layout(barmode="stack", legend_traceorder="normal")
    else:
        fig.add_bar(x=labels, y=[counts[c] for c in classes], marker_color=BLUE, name="images",
                    text=[counts[c] for c in classes], textposition="auto", textangle=0)  # never rotated
    fig.update_yaxes(title="images")
    fig.update_xaxes(type="category", tickangle=0, automargin=True)
    return _base(fig, height=300)


# --------------------------------------------------------------------------------------------------
# Training


def training_curves(history: Sequence[dict], epochs: int | None = None, kept: int | None = None) -> go.Figure:
    """Training and validation loss, and validation accuracy, per epoch; ``kept``: the epoch the run keeps."""
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.1)
    df = pd.DataFrame(list(history))
    if len(df):
        fig.add_scatter(x=df["epoch"], y=df["train_loss"], name="training loss", mode="lines+markers",
                        line=dict(color=BLUE), row=1, col=1)
        fig.add_scatter(x=df["epoch"], y=df["val_loss"], name="validation loss", mode="lines+markers",
                        line=dict(color=ORANGE), row=1, col=1)
        fig.add_scatter(x=df["epoch"], y=df["val_accuracy"], name="validation accuracy", mode="lines+markers",
                        line=dict(color=GREEN), row=1, col=2, showlegend=True)
        row = df[df["epoch"] == kept]
        if kept is not None and len(row):
            # The one figure shown everywhere else: the kept epoch's, marked where it sits on the curve.
            fig.add_scatter(x=row["epoch"], y=row["val_accuracy"], name="kept model", mode="markers+text",
                            marker=dict(color=DARK, size=13, symbol="star"), text=["kept"], textposition="bottom center",
                            row=1, col=2, showlegend=True)
    xmax = max(epochs or 1, int(df["epoch"].max()) if len(df) else 1)
    xmin = min(1, int(df["epoch"].min())) if len(df) else 1  # fine-tuning records a head warm-up as epoch 0
    fig.update_xaxes(title="epoch", range=[xmin - 0.5, xmax + 0.5])
    fig.update_yaxes(rangemode="tozero", title="loss (lower is better)", row=1, col=1)
    fig.update_yaxes(range=[0, 1.02], tickformat=".0%", title="validation accuracy", row=1, col=2)
    return _base(fig, height=320)


# --------------------------------------------------------------------------------------------------
# Evaluation


def confusion_matrix(
    cm: np.ndarray, class_names: Sequence[str], *, normalised: bool = False, selected: tuple[int, int] | None = None
) -> go.Figure:
    """Confusion matrix heat map: rows are true classes, columns predicted ones.

    A transparent marker sits on every cell so a click selects it (Plotly heat maps themselves
    send no selection events); each marker's ``customdata`` is ``[true index, predicted index]``.
    """
    cm = np.asarray(cm, dtype=float)
    n = len(class_names)
    labels = [safe_label(c, 24) for c in class_names]
    text = [[(f"{v:.0%}" if normalised else f"{int(v)}") for v in row] for row in cm]
    zmax = 1.0 if normalised else max(float(cm.max()), 1.0)
    fig = go.Figure(
        go.Heatmap(
            z=cm,
            x=list(range(n)),
            y=list(range(n)),
            text=text,
            texttemplate="%{text}",
            textfont=dict(size=16 if n <= 6 else 11),
            colorscale="Blues",
            zmin=0,
            zmax=zmax,
            showscale=False,
            hoverinfo="skip",
        )
    )
    xs, ys, custom, hover = [], [], [], []
    for i in range(n):
        for j in range(n):
            xs.append(j)
            ys.append(i)
            custom.append([i, j])
            verdict = "correct" if i == j else "mistake"
            hover.append(f"true: {labels[i]}<br>predicted: {labels[j]}<br>{text[i][j]} ({verdict})<br>click to see the images")
    size = max(12, min(90, int(420 / max(n, 1))))
    fig.add_scatter(
        x=xs,
        y=ys,
        mode="markers",
        marker=dict(symbol="square", size=size, opacity=0, color=DARK),
        customdata=custom,
        hovertext=hover,
        hoverinfo="text",
        showlegend=False,
    )
    fig.update_xaxes(title="predicted class", tickmode="array", tickvals=list(range(n)), ticktext=labels,
                     side="bottom", showgrid=False, zeroline=False, range=[-0.5, n - 0.5])
    fig.update_yaxes(title="true class", tickmode="array", tickvals=list(range(n)), ticktext=labels,
                     autorange="reversed", showgrid=False, zeroline=False)
    if selected is not None:
        i, j = selected
        fig.add_shape(type="rect", x0=j - 0.48, x1=j + 0.48, y0=i - 0.48, y1=i + 0.48,
                      line=dict(color=ORANGE, width=3))
    fig.update_layout(dragmode=False, clickmode="event+select")
    return _base(fig, height=max(320, min(720, 90 + 60 * n)))


def embedding_map(table: pd.DataFrame) -> go.Figure:
    """Images as points, coloured by true class; mistakes drawn as crosses. ``customdata`` is the row."""
    fig = go.Figure()
    for cls, part in table.groupby("true", sort=True):
        for correct, symbol in ((True, "circle"), (False, "x")):
            sub = part[part["correct"] == correct]
            if sub.empty:
                continue
            fig.add_trace(
                go.Scatter(
                    x=sub["x"], y=sub["y"], mode="markers",
                    name=f"{safe_label(cls, 24)}" + ("" if correct else " (mistake)"),
                    marker={"symbol": symbol, "size": 9 if correct else 12, "line": {"width": 1}},
                    customdata=np.stack([sub.index.to_numpy()], axis=1),
                    text=[safe_label(Path(p).name, 40) for p in sub["path"]],
                    hovertemplate="%{text}<extra>" + safe_label(cls, 24) + "</extra>",
                )
            )
    fig.update_layout(xaxis={"visible": False}, yaxis={"visible": False}, legend={"orientation": "h", "y": -0.05})
    return _base(fig, height=460)


def top_k(pairs: Sequence[tuple[str, float]], *, height: int | None = None) -> go.Figure:
    """Horizontal bars of the most likely classes, most likely on top."""
    labels = [safe_label(name, 32) for name, _ in pairs][::-1]
    probs = [p for _, p in pairs][::-1]
    colours = [GREY] * (len(probs) - 1) + [BLUE] if probs else []
    fig = go.Figure(
        go.Bar(x=probs, y=labels, orientation="h", marker_color=colours, text=[f"{p:.0%}" for p in probs],
               textposition="auto", hovertemplate="%{y}: %{x:.1%}<extra></extra>")
    )
    fig.update_xaxes(range=[0, 1], tickformat=".0%", title=None)
    fig.update_yaxes(type="category")
    return _base(fig, height=height or (60 + 34 * len(pairs)))


def metric_bars(table: pd.DataFrame, metrics: Sequence[str]) -> go.Figure:
    """Grouped bars of a few metrics per run (``table`` has a ``name`` column), side by side, never stacked.

    Runs are placed by position, not by name, so two runs whose (shortened) names are alike still get
    a group each.
    """
    fig = go.Figure()
    palette = [BLUE, ORANGE, GREEN, "#7c3aed"]
    positions = list(range(len(table)))
    for k, metric in enumerate(metrics):
        fig.add_bar(x=positions, y=table[metric], name=metric.replace("_", " "),
                    marker_color=palette[k % len(palette)], text=[f"{v:.0%}" if pd.notna(v) else "" for v in table[metric]],
                    textposition="auto", textangle=0, hovertext=[safe_label(n, 80) for n in table["name"]],
                    hovertemplate="%{hovertext}: %{y:.1%}<extra></extra>")
    fig.update_yaxes(range=[0, 1.05], tickformat=".0%")
    fig.update_xaxes(tickmode="array", tickvals=positions, ticktext=[safe_label(n, 30) for n in table["name"]],
                     range=[-0.5, len(table) - 0.5])
    fig.update_layout(barmode="group")
    return _base(fig, height=300)


# --------------------------------------------------------------------------------------------------
# Model


_STATUS_COLOURS = {"frozen": GREY, "trains": BLUE, "partly trains": LIGHT_BLUE, "trains (new)": GREEN}


def stage_diagram(summary: pd.DataFrame) -> go.Figure:
    """The network as a row of blocks, input to output: grey blocks are frozen, blue ones train.

    Block heights grow with the square root of the parameter count, so big stages look big without
    hiding the small ones.
    """
    rows = summary.to_dict("records")
    n = len(rows)
    totals = [r["trainable"] + r["frozen"] for r in rows]
    biggest = max(totals) if totals else 1
    fig = go.Figure()
    width, gap = 1.0, 0.35
    xs, ys, hover = [], [], []
    for i, (r, total) in enumerate(zip(rows, totals)):
        x0 = i * (width + gap)
        h = 0.35 + 0.65 * math.sqrt(total / biggest)
        colour = _STATUS_COLOURS.get(r["status"], GREY)
        fig.add_shape(type="rect", x0=x0, x1=x0 + width, y0=-h / 2, y1=h / 2, line=dict(color="white", width=1),
                      fillcolor=colour, layer="below")
        if i < n - 1:
            fig.add_annotation(x=x0 + width + gap - 0.04, y=0, ax=x0 + width + 0.04, ay=0, xref="x", yref="y",
                               axref="x", ayref="y", showarrow=True, arrowhead=2, arrowsize=1, arrowwidth=1.5,
                               arrowcolor=GREY, text="")
        icon = "🔒" if r["status"] == "frozen" else ("✏️" if "trains" in r["status"] else "")
        fig.add_annotation(x=x0 + width / 2, y=-0.62, text=f"<b>{safe_label(r['stage'], 14)}</b>", showarrow=False,
                           font=dict(size=12, color=DARK), textangle=0)
        fig.add_annotation(x=x0 + width / 2, y=0, text=f"{icon}<br>{human_count(total)}", showarrow=False,
                           font=dict(size=11, color="white" if r["status"] != "partly trains" else DARK))
        xs.append(x0 + width / 2)
        ys.append(0)
        hover.append(
            f"<b>{safe_label(r['stage'])}</b><br>{r['status']}<br>trainable: {r['trainable']:,}<br>frozen: {r['frozen']:,}"
        )
    fig.add_scatter(x=xs, y=ys, mode="markers", marker=dict(size=30, opacity=0), hovertext=hover, hoverinfo="text",
                    showlegend=False)
    for status, colour in _STATUS_COLOURS.items():
        fig.add_scatter(x=[None], y=[None], mode="markers", marker=dict(size=12, color=colour, symbol="square"),
                        name=status, showlegend=True)
    fig.update_xaxes(visible=False, range=[-0.2, n * (width + gap) - gap + 0.2])
    fig.update_yaxes(visible=False, range=[-0.8, 0.6])
    fig.update_layout(plot_bgcolor="white", dragmode=False)
    return _base(fig, height=230)


def transfer_diagram_dot() -> str:
    """Graphviz DOT source of the transfer-learning picture on the Home page."""
    return """
digraph G {
  rankdir=LR; bgcolor="transparent"; nodesep=0.3; ranksep=0.45; fontname="Helvetica"; size="11,2.6";
  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=13, color="#cbd5e1", penwidth=1.2,
        margin="0.16,0.1"];
  edge [color="#64748b", arrowsize=0.7];
  img [label="Your\nphoto", fillcolor="#f8fafc"];
  subgraph cluster_bb {
    label="Pretrained backbone (learnt from 1.2 million ImageNet photos)"; fontsize=13; fontcolor="#334155";
    style="rounded,dashed"; color="#94a3b8"; margin=10;
    early [label="early layers\nedges, colours\n\nfrozen", fillcolor="#e2e8f0"];
    mid   [label="middle layers\ntextures, parts\n\nfrozen", fillcolor="#e2e8f0"];
    late  [label="late layers\nwhole objects\n\nfrozen or\nfine-tuned", fillcolor="#dbeafe", color="#93c5fd"];
  }
  head [label="new head\nyour classes\n\nalways learns", fillcolor="#dcfce7", color="#16a34a"];
  out  [label="ant  93%\nbee   7%", shape=note, fillcolor="#ffffff"];
  img -> early -> mid -> late -> head -> out;
}
"""


# --------------------------------------------------------------------------------------------------
# Experiments

METHOD_COLOURS = {"scratch": ORANGE, "frozen": BLUE, "finetuned": GREEN}
METHOD_NAMES = {"scratch": "from scratch", "frozen": "pretrained, frozen", "finetuned": "pretrained, fine-tuned"}


def strategy_curves(history: pd.DataFrame, chance: float | None = None) -> go.Figure:
    """Validation accuracy of each method against wall-clock seconds and against epochs."""
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.08, shared_yaxes=True)
    for method, rows in history.groupby("method", sort=False):
        colour = METHOD_COLOURS.get(method, GREY)
        name = METHOD_NAMES.get(method, method)
        fig.add_scatter(x=rows["elapsed_seconds"], y=rows["val_accuracy"], mode="lines+markers", name=name,
                        line=dict(color=colour), row=1, col=1, legendgroup=method)
        fig.add_scatter(x=rows["epoch"], y=rows["val_accuracy"], mode="lines+markers", name=name,
                        line=dict(color=colour), row=1, col=2, legendgroup=method, showlegend=False)
    if chance is not None:
        fig.add_hline(y=chance, line=dict(color=GREY, dash="dot"), row=1, col=1, annotation_text="guessing",
                      annotation_position="bottom right")
        fig.add_hline(y=chance, line=dict(color=GREY, dash="dot"), row=1, col=2)
    fig.update_xaxes(title="seconds of training", row=1, col=1)
    fig.update_xaxes(title="epoch", row=1, col=2)
    fig.update_yaxes(range=[0, 1.02], tickformat=".0%", title="validation accuracy", row=1, col=1)
    return _base(fig, height=340)


def learning_curve(table: pd.DataFrame, chance: float | None = None) -> go.Figure:
    """Mean validation accuracy (band: min to max over seeds) against training images per class."""
    fig = go.Figure()
    for method, rows in table.groupby("method", sort=False):
        rows = rows.sort_values("images_per_class")
        colour = METHOD_COLOURS.get(method, GREY)
        x = list(rows["images_per_class"])
        fig.add_scatter(x=x + x[::-1], y=list(rows["max"]) + list(rows["min"])[::-1], fill="toself",
                        fillcolor=colour, opacity=0.15, line=dict(width=0), hoverinfo="skip", showlegend=False)
        fig.add_scatter(x=x, y=rows["mean"], mode="lines+markers", name=METHOD_NAMES.get(method, method),
                        line=dict(color=colour))
    if chance is not None:
        fig.add_hline(y=chance, line=dict(color=GREY, dash="dot"), annotation_text="guessing")
    fig.update_xaxes(type="log", title="training images per class")
    fig.update_yaxes(range=[0, 1.02], tickformat=".0%", title="validation accuracy")
    return _base(fig, height=340)

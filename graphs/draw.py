"""Drawing: an fx graph as Graphviz DOT text, rendered to SVG when ``dot`` is installed.

The DOT is written in plain Python (no graphviz package). Each node shows its name, its
op (:func:`hant.graphs.networkx_view.readable_target`) and output shape; with ``shares``
(node name -> fraction of latency) nodes are filled from white (no share) to red (the
largest share) and show their percentage.
"""

from __future__ import annotations

import shutil
import subprocess
import warnings
from pathlib import Path
from typing import Mapping

from torch.fx import GraphModule

from hant.graphs.networkx_view import to_networkx

__all__ = ["to_dot", "draw", "share_colour", "RENDERED_FORMATS"]

RENDERED_FORMATS = ("svg", "png", "pdf")
_SHAPES = {"placeholder": "invhouse", "output": "house", "get_attr": "note"}


def _quote(text: str) -> str:
    """A DOT double-quoted string; newlines become centred line breaks."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + escaped.replace("\n", "\\n") + '"'


def share_colour(share: float, largest: float) -> str:
    """``#rrggbb`` from white (share 0) to pure red (share == largest), linear in between."""
    level = 0.0 if largest <= 0 else min(max(share / largest, 0.0), 1.0)
    fade = round(255 * (1.0 - level))
    return f"#ff{fade:02x}{fade:02x}"


def _shape_text(shape) -> str:
    return "×".join(str(s) for s in shape) if shape is not None else ""


def to_dot(gm: GraphModule, *, shares: Mapping[str, float] | None = None, include_get_attr: bool = False) -> str:
    """The graph of ``gm`` as DOT text (a ``digraph``, top to bottom, one box per fx node).

    ``shares`` maps node names to fractions of total latency; named nodes are coloured by
    :func:`share_colour` relative to the largest share and labelled with the percentage.
    Names in ``shares`` that are not nodes of the graph are ignored. ``include_get_attr``
    also draws weight and constant nodes.
    """
    graph = to_networkx(gm, include_get_attr=include_get_attr)
    shares = {name: float(share) for name, share in (shares or {}).items() if name in graph}
    largest = max(shares.values(), default=0.0)
    lines = [f"digraph {_quote(graph.graph['name'])} {{",
             "  rankdir=TB;",
             '  node [shape=box, style="rounded,filled", fillcolor="#ffffff", fontname="Helvetica", fontsize=10];',
             '  edge [color="#555555"];']
    for name, attrs in graph.nodes(data=True):
        label = [name]
        if attrs["op"] not in ("placeholder", "output"):
            label.append(attrs["target"])
        if attrs["shape"] is not None:
            label.append(_shape_text(attrs["shape"]))
        style = [f"shape={_SHAPES[attrs['op']]}"] if attrs["op"] in _SHAPES else []
        if name in shares:
            label.append(f"{100.0 * shares[name]:.1f}%")
            style.append(f'fillcolor="{share_colour(shares[name], largest)}"')
        style.insert(0, f"label={_quote(chr(10).join(label))}")
        lines.append(f"  {_quote(name)} [{', '.join(style)}];")
    for source, user in graph.edges:
        lines.append(f"  {_quote(source)} -> {_quote(user)};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def draw(gm: GraphModule, path: str | Path, *, shares: Mapping[str, float] | None = None,
         include_get_attr: bool = False) -> Path:
    """Write the graph to ``path`` and return the path written.

    The suffix picks the format: ``.svg``, ``.png`` or ``.pdf`` are rendered by the Graphviz
    ``dot`` executable; any other suffix (``.dot``, ``.gv``) gets the DOT text. When ``dot``
    is not installed, a rendered format falls back to DOT text at the same path with the
    suffix ``.dot`` (with a warning), and that path is returned. ``shares`` and
    ``include_get_attr`` are as in :func:`to_dot`.
    """
    path = Path(path)
    text = to_dot(gm, shares=shares, include_get_attr=include_get_attr)
    fmt = path.suffix.lstrip(".").lower()
    if fmt in RENDERED_FORMATS:
        executable = shutil.which("dot")
        if executable is not None:
            done = subprocess.run([executable, f"-T{fmt}", "-o", str(path)], input=text.encode(), capture_output=True)
            if done.returncode != 0:
                raise RuntimeError(f"Graphviz dot could not render {path}: {done.stderr.decode(errors='replace')}")
            return path
        warnings.warn(f"Graphviz 'dot' is not installed, so {path} cannot be rendered; writing DOT text to "
                      f"{path.with_suffix('.dot')} instead (install graphviz to get {fmt.upper()}).", stacklevel=2)
        path = path.with_suffix(".dot")
    path.write_text(text, encoding="utf-8")
    return path

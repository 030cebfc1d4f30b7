"""The stream/operation graph as Mermaid or Graphviz DOT text."""

from __future__ import annotations

from .model import Operation, Stream


def _node(name: str) -> str:
    return "s_" + "".join(c if c.isalnum() else "_" for c in name)


def render_graph(streams: list[Stream], operations: list[Operation], fmt: str) -> str:
    """Streams are nodes, operations are edges labelled with their names."""
    if fmt == "dot":
        lines = ["digraph streamboss {", "  rankdir=LR;", "  node [shape=box];"]
        lines += [f'  {_node(s.name)} [label="{s.name}"];' for s in streams]
        lines += [f'  {_node(o.input)} -> {_node(o.output)} [label="{o.name}"];'
                  for o in operations]
        lines.append("}")
    else:
        lines = ["flowchart LR"]
        lines += [f'  {_node(s.name)}["{s.name}"]' for s in streams]
        lines += [f'  {_node(o.input)} -->|"{o.name}"| {_node(o.output)}' for o in operations]
    return "\n".join(lines) + "\n"

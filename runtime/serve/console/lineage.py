"""Where versions came from, as a graph the console draws: data and training config into a
trained version, versions into the versions compressed or merged from them.

    g = lineage_graph(versions, lookup)       # lookup("acme/a:v2") -> AdapterVersion | None
    drawing = layout(g)                       # boxes and curves in pixels, for the template

The graph is read from each version's `lineage` as the trainer and `registry/derive.py`
write it: `dataset` (digest, path, examples) and `hyperparameters` for a trained version,
`inputs` (ref, digest, weight) with `operation` for a derived one. A config reads the
values the trainer's automatic recipe chose (`recipe.values`) over the ones it was given. A version with neither
was uploaded as it is and stands alone. Nodes are keyed by content (a version's digest, the
data's digest, a hash of the config), so two versions trained on the same data share one
data node.

`layout` is a layered drawing of the DAG, left to right: a node's column is the longest
path to it from a source, and within a column nodes are ordered by the mean row of their
parents (one sweep), which keeps most edges short and uncrossed for the small graphs
lineage makes. Everything is plain data; the SVG itself is written by the template, so
every label passes through its autoescaping.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

MAX_NODES = 80  # a drawing larger than this is cut to the newest versions' ancestry
NODE_W, NODE_H, GAP_X, GAP_Y, PAD = 200, 46, 70, 18, 12


@dataclass
class Node:
    id: str
    kind: str  # "version" (of the adapter shown), "input" (another adapter's), "data", "config"
    title: str
    sub: str = ""
    href: str | None = None
    current: bool = False  # the version the page is about


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    label: str = ""


@dataclass
class Graph:
    nodes: dict[str, Node] = field(default_factory=dict)
    edges: list[Edge] = field(default_factory=list)
    cut: int = 0  # versions left out to stay within MAX_NODES

    def add(self, node: Node) -> Node:
        return self.nodes.setdefault(node.id, node)

    def parents(self, node_id: str) -> list[str]:
        return [e.src for e in self.edges if e.dst == node_id]


def version_href(tenant: str, name: str, version: int) -> str:
    return f"/console/adapters/{tenant}/{name}/v/{version}"


def _short(digest: str | None) -> str:
    return (digest or "?").removeprefix("sha256:")[:12]


def config_summary(hp: dict[str, Any]) -> str:
    """A one-line reading of training hyper-parameters (the keys most runs set)."""
    parts: list[str] = []
    for key, label in (("r", "r"), ("rank", "r"), ("lora_alpha", "α"), ("alpha", "α"),
                       ("learning_rate", "lr"), ("lr", "lr"), ("epochs", "epochs"),
                       ("max_steps", "steps")):
        value = hp.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            continue  # unset (None: chosen by the recipe) or off (max_steps -1)
        if not any(p.startswith(f"{label}=") for p in parts):
            parts.append(f"{label}={value:g}" if isinstance(value, float) else f"{label}={value}")
    return " ".join(parts[:4])


def _add_parents(g: Graph, v: Any, lookup: Callable[[str], Any], queue: list[Any]) -> None:
    """The edges into version `v`'s node, from what its lineage names."""
    lin = v.lineage or {}
    inputs = lin.get("inputs")
    if isinstance(inputs, list) and inputs:
        op = str(lin.get("operation") or lin.get("method") or "derived")
        for inp in inputs[:16]:
            if not isinstance(inp, dict):
                continue
            ref, digest = str(inp.get("ref") or "?"), str(inp.get("digest") or inp.get("ref"))
            if digest not in g.nodes:
                found = lookup(ref)
                if found is not None:
                    queue.append(found)
                    same = (found.tenant, found.name) == (v.tenant, v.name)
                    g.add(Node(digest, "version" if same else "input", found.ref,
                               _short(found.digest),
                               version_href(found.tenant, found.name, found.version)))
                else:
                    g.add(Node(digest, "input", ref, "no longer in the registry"))
            weight = inp.get("weight")
            g.edges.append(Edge(digest, v.digest, op if weight is None else f"{op} ×{weight:g}"))
        return
    ds = lin.get("dataset")
    if isinstance(ds, dict) and ds.get("digest"):
        did = f"data:{ds['digest']}"
        path = str(ds.get("path") or "").rsplit("/", 1)[-1]
        count = f", {ds['examples']} ex." if ds.get("examples") is not None else ""
        g.add(Node(did, "data", f"data {_short(ds['digest'])}", f"{path}{count}"))
        g.edges.append(Edge(did, v.digest))  # the node's colour says "data": no label
    hp = lin.get("hyperparameters")
    chosen = (lin.get("recipe") or {}).get("values") if isinstance(lin.get("recipe"), dict) \
        else None
    if isinstance(hp, dict) and isinstance(chosen, dict):  # what `auto` settled on
        hp = {**hp, **{k: v for k, v in chosen.items() if v is not None}}
    if isinstance(hp, dict) and hp:
        cid = "config:" + hashlib.sha256(json.dumps(hp, sort_keys=True, default=str)
                                         .encode()).hexdigest()[:16]
        g.add(Node(cid, "config", "config", config_summary(hp)))
        g.edges.append(Edge(cid, v.digest))


def lineage_graph(versions: list[Any], lookup: Callable[[str], Any], *,
                  current: int | None = None) -> Graph:
    """The graph of `versions` (one adapter's, oldest first) and their ancestors.
    `lookup(ref)` resolves an input version for the caller (None: gone or not visible);
    `current` marks the version a page is about."""
    g = Graph()
    keep = versions[-(MAX_NODES // 3):] if len(versions) > MAX_NODES // 3 else versions
    g.cut = len(versions) - len(keep)
    queue = list(keep)
    for v in keep:
        g.add(Node(v.digest, "version", v.ref, _short(v.digest),
                   version_href(v.tenant, v.name, v.version), current == v.version))
    seen: set[str] = set()
    while queue and len(g.nodes) < MAX_NODES:
        v = queue.pop(0)
        if v.digest in seen:
            continue
        seen.add(v.digest)
        _add_parents(g, v, lookup, queue)
    return g


@dataclass(frozen=True)
class Box:
    node: Node
    x: int
    y: int
    w: int = NODE_W
    h: int = NODE_H


@dataclass(frozen=True)
class Curve:
    d: str  # SVG path data
    label: str
    lx: int
    ly: int


@dataclass(frozen=True)
class Drawing:
    boxes: list[Box]
    curves: list[Curve]
    width: int
    height: int
    cut: int


def layers(g: Graph) -> dict[str, int]:
    """Each node's column: the longest path to it from a node without parents."""
    col: dict[str, int] = {}
    parents = {n: g.parents(n) for n in g.nodes}

    def depth(n: str, trail: frozenset[str]) -> int:
        if n in col:
            return col[n]
        ps = [p for p in parents[n] if p in g.nodes and p not in trail]  # a cycle is a bug
        col[n] = 0 if not ps else 1 + max(depth(p, trail | {n}) for p in ps)
        return col[n]

    for n in g.nodes:
        depth(n, frozenset())
    return col


def _children(g: Graph) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {n: [] for n in g.nodes}
    for e in g.edges:
        if e.src in out and e.dst in g.nodes:
            out[e.src].append(e.dst)
    return out


def _place(order: list[str], want: dict[str, float]) -> dict[str, float]:
    """Rows for one column in `order`: each as near its wanted row as the ones above
    it allow (never two on one row)."""
    rows, last = {}, -1.0
    for n in order:
        rows[n] = max(last + 1, round(want.get(n, last + 1)))
        last = rows[n]
    return rows


def _sweep(g: Graph, columns: dict[int, list[str]], row: dict[str, float]) -> dict[str, float]:
    """Rows of every column after the first, each node wanting its parents' mean row."""
    for c in sorted(columns)[1:]:
        want = {}
        for n in columns[c]:
            ps = [row[p] for p in g.parents(n) if p in row]
            want[n] = sum(ps) / len(ps) if ps else float(len(columns[c]))
        columns[c].sort(key=lambda n: want[n])
        row.update(_place(columns[c], want))
    return row


def layout(g: Graph) -> Drawing:
    """Boxes in columns by `layers`. Rows: the first column in the order nodes came, every
    later one by its parents' mean row; then the first column again by its children's mean
    row (data and config beside the version they made) and the later ones once more."""
    col = layers(g)
    columns: dict[int, list[str]] = {}
    for n in g.nodes:  # insertion order: the adapter's versions oldest first, then ancestors
        columns.setdefault(col[n], []).append(n)
    if not columns:
        return Drawing([], [], 0, 0, g.cut)
    row = _sweep(g, columns, {n: float(i) for i, n in enumerate(columns[min(columns)])})
    kids = _children(g)
    first = columns[min(columns)]
    want = {n: (sum(row[k] for k in kids[n]) / len(kids[n]) if kids[n] else row[n])
            for n in first}
    first.sort(key=lambda n: want[n])
    row = _sweep(g, columns, {n: float(i) for i, n in enumerate(first)})
    boxes = {n: Box(g.nodes[n], PAD + col[n] * (NODE_W + GAP_X),
                    PAD + int(row[n]) * (NODE_H + GAP_Y)) for n in g.nodes}
    curves = []
    for e in g.edges:
        a, b = boxes.get(e.src), boxes.get(e.dst)
        if a is None or b is None:
            continue
        x1, y1 = a.x + a.w, a.y + a.h // 2
        x2, y2 = b.x, b.y + b.h // 2
        mid = (x1 + x2) // 2
        curves.append(Curve(f"M{x1},{y1} C{mid},{y1} {mid},{y2} {x2 - 6},{y2}", e.label,
                            mid, (y1 + y2) // 2 - 4))
    width = max((bx.x + bx.w for bx in boxes.values()), default=0) + PAD
    height = max((bx.y + bx.h for bx in boxes.values()), default=0) + PAD
    return Drawing(list(boxes.values()), curves, width, height, g.cut)

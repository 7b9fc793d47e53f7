"""Lineage as a graph and its drawing: what a version came from (data and config, or the
versions it was compressed or merged from), in columns that follow the edges, with no two
boxes on top of each other."""

from __future__ import annotations

from types import SimpleNamespace

from loraplex.runtime.serve.console.lineage import layers, layout, lineage_graph


def _v(n: int, lineage: dict, name: str = "support") -> SimpleNamespace:
    return SimpleNamespace(tenant="acme", name=name, version=n, digest=f"sha256:{name}{n}",
                           ref=f"acme/{name}:v{n}", lineage=lineage)


TRAIN = {"dataset": {"digest": "sha256:" + "d" * 64, "path": "x/train.jsonl", "examples": 9},
         "hyperparameters": {"r": 8, "learning_rate": 2e-4}}
FAQ = _v(1, TRAIN, "faq")
VERSIONS = [
    _v(1, TRAIN),
    _v(2, {**TRAIN, "hyperparameters": {"r": 8, "learning_rate": 3e-4}}),
    _v(3, {"operation": "compress", "inputs": [{"ref": "acme/support:v2",
                                                "digest": "sha256:support2"}]}),
    _v(4, {"operation": "merge", "inputs": [
        {"ref": "acme/support:v2", "digest": "sha256:support2", "weight": 0.7},
        {"ref": "acme/faq:v1", "digest": "sha256:faq1", "weight": 0.3}]}),
    _v(5, {"operation": "merge", "inputs": [{"ref": "acme/gone:v1", "digest": "sha256:x"}]}),
    _v(6, {}),
]


def _lookup(ref: str):
    return FAQ if ref == "acme/faq:v1" else None


def test_the_graph_says_where_each_version_came_from():
    g = lineage_graph(VERSIONS, _lookup, current=4)
    edges = {(e.src, e.dst, e.label) for e in g.edges}
    data = "data:sha256:" + "d" * 64
    assert (data, "sha256:support1", "") in edges and (data, "sha256:support2", "") in edges
    assert ("sha256:support2", "sha256:support3", "compress") in edges
    assert ("sha256:support2", "sha256:support4", "merge ×0.7") in edges
    assert ("sha256:faq1", "sha256:support4", "merge ×0.3") in edges
    assert (data, "sha256:faq1", "") in edges  # the other adapter's own ancestry too
    configs = [n for n in g.nodes.values() if n.kind == "config"]
    assert len(configs) == 2 and {c.sub for c in configs} == {"r=8 lr=0.0002", "r=8 lr=0.0003"}
    assert g.nodes["sha256:x"].sub == "no longer in the registry"
    assert g.nodes["sha256:support6"].kind == "version" and not g.parents("sha256:support6")
    assert [n.id for n in g.nodes.values() if n.current] == ["sha256:support4"]
    assert g.nodes["sha256:faq1"].href == "/console/adapters/acme/faq/v/1"


def test_columns_follow_the_edges_and_boxes_never_overlap():
    g = lineage_graph(VERSIONS, _lookup)
    col = layers(g)
    for e in g.edges:
        assert col[e.src] < col[e.dst]
    assert col["sha256:support4"] == 2 and col["sha256:support1"] == 1
    d = layout(g)
    spots = [(b.x, b.y) for b in d.boxes]
    assert len(spots) == len(set(spots)) == len(g.nodes)
    assert all(b.x + b.w <= d.width and b.y + b.h <= d.height for b in d.boxes)
    assert len(d.curves) == len(g.edges)


def test_a_version_page_draws_its_ancestry_only():
    g = lineage_graph([VERSIONS[2]], lambda ref: VERSIONS[1] if ref == "acme/support:v2" else None,
                      current=3)
    assert {n.title for n in g.nodes.values() if n.kind != "config"} == {
        "acme/support:v3", "acme/support:v2", "data dddddddddddd"}
    assert g.nodes["sha256:support2"].kind == "version"  # the same adapter's, not an input

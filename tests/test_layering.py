"""The house has no circles: no module of the package imports, directly or through others, a
module that imports it back, counting imports inside functions and under TYPE_CHECKING (a
layering inversion is a circle even when Python would not notice it at import time)."""

import ast
import pathlib

import gguf_gpu_lab

ROOT = pathlib.Path(gguf_gpu_lab.__file__).parent


def _modules() -> dict[str, pathlib.Path]:
    mods = {}
    for p in ROOT.rglob("*.py"):
        parts = ["gguf_gpu_lab", *p.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = p
    return mods


def _edges(mods) -> dict[str, set[str]]:
    def known(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    edges = {m: set() for m in mods}
    for m, p in mods.items():
        package = m.split(".") if p.name == "__init__.py" else m.split(".")[:-1]
        for node in ast.walk(ast.parse(p.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom):
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                    if node.level else (node.module or "")
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for n in names:
                t = known(n)
                if t is not None and t != m:
                    edges[m].add(t)
    return edges


def _cycles(edges) -> list[list[str]]:
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_no_import_circles():
    edges = _edges(_modules())
    assert "gguf_gpu_lab.source" in edges["gguf_gpu_lab.model"]  # the graph sees real edges
    assert _cycles(edges) == []


def test_the_graph_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_model_imports_nothing_that_loads():
    edges = _edges(_modules())
    assert not edges["gguf_gpu_lab.model"] & {"gguf_gpu_lab.cache", "gguf_gpu_lab.loader", "gguf_gpu_lab.device"}

"""The import graph of mars/ and mars_kernels/ (read from the source with ast, nothing
imported): no import circle (KNOWN_CIRCLES lists those still to be removed: none now; never
add to it), mars_kernels (the Triton package) imports nothing from mars, and the trainer's
imports run one way: loop imports the phase modules, no phase module imports loop, and
distributed (collectives, wrapping, per-rank RNG) imports none of the phases;
mars/ops imports nothing from mars outside itself, and mars.<op> only aliases mars.ops.<op>.
An import of a submodule (``from . import faults``) counts as an import of that module only,
not of its package; the compiled mars._C and the generated mars._build_info are not nodes."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KNOWN_CIRCLES: list[set] = []  # none left; a new circle fails the test


def _modules():
    mods = {}
    for pkg in ("mars", "mars_kernels"):
        for dp, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                if f.endswith(".py") and f != "_build_info.py":
                    p = os.path.join(dp, f)
                    name = os.path.relpath(p, ROOT)[:-3].replace(os.sep, ".")
                    mods[name[:-9] if name.endswith(".__init__") else name] = p
    return mods


def _graph(mods):
    graph = {m: set() for m in mods}
    for m, path in mods.items():
        base = m if path.endswith("__init__.py") else m.rsplit(".", 1)[0]
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = base.split(".")
                    mod = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                names = [a.name for a in node.names if a.name not in ("_C", "_build_info")]
                subs = [f"{mod}.{n}" for n in names if f"{mod}.{n}" in mods]
                targets = subs + ([mod] if len(subs) < len(names) else [])
            else:
                continue
            for t in targets:
                while t and t not in mods:
                    t = t.rsplit(".", 1)[0] if "." in t else ""
                if t and t != m:
                    graph[m].add(t)
    return graph


def _circles(graph):
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]; counter[0] += 1; stack.append(root); on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]; counter[0] += 1; stack.append(w); on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = set()
                while True:
                    w = stack.pop(); on.discard(w); comp.add(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(comp)
    return out


def test_no_import_circle_beyond_the_known_ones():
    circles = _circles(_graph(_modules()))
    new = [sorted(c) for c in circles if c not in KNOWN_CIRCLES]
    assert not new, f"import circles: {new}"
    gone = [sorted(c) for c in KNOWN_CIRCLES if c not in circles]
    assert not gone, f"circles removed: take them off KNOWN_CIRCLES: {gone}"


def test_the_triton_package_imports_nothing_from_mars():
    graph = _graph(_modules())
    up = {m: sorted(t for t in ts if t == "mars" or t.startswith("mars.")) for m, ts in graph.items()
          if m.startswith("mars_kernels")}
    assert not any(up.values()), {m: t for m, t in up.items() if t}


def test_the_scan_finds_a_circle():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
    assert _circles({"a": {"b"}, "b": set()}) == []


def test_the_trainer_imports_run_one_way():
    graph = _graph(_modules())
    callers_of_loop = sorted(m for m, ts in graph.items() if "mars.train.loop" in ts)
    assert callers_of_loop == ["mars.train", "mars.train.command", "mars.train.compare"], callers_of_loop
    below = {"mars.train.batch", "mars.train.checkpoint"}  # the tensors of a row; the RNG state's format
    up = sorted(t for t in graph["mars.train.distributed"] if t.startswith("mars.train.") and t not in below)
    assert not up, up


OPS = ("_ext", "groups", "reference", "backends", "policy_loss", "advantage", "fused_linear", "loss")


def test_the_ops_import_nothing_above_them():
    """mars/ops (docs/layers.md) imports only its own modules and the Triton package; the
    public mars.<op> modules are one-line aliases of mars.ops.<op> and import nothing else."""
    graph = _graph(_modules())
    up = {m: sorted(t for t in ts if not t.startswith(("mars.ops.", "mars_kernels")))
          for m, ts in graph.items() if m == "mars.ops" or m.startswith("mars.ops.")}
    assert not any(up.values()), {m: t for m, t in up.items() if t}
    assert {f"mars.ops.{m}" for m in OPS} <= set(graph)
    for m in OPS:
        assert graph[f"mars.{m}"] == {f"mars.ops.{m}"}, (m, graph[f"mars.{m}"])

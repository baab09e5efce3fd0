"""The import graph of kdlab's own modules reads one way (DESIGN.md "Layout", docs/architecture.md "Layers").

Every .py file in kdlab/, eval/, distill/, train/, search/ and scripts/ is parsed (never imported) and
named as installed (eval/latency.py is kdlab.eval.latency, distill/__init__.py is kdlab.distill). The
graph fails on

(a) a cycle between modules, through top-level or function-level imports alike;
(b) an upward import: eval imports nothing of ours; distill only eval; train only distill and eval; search
    only train, distill and eval; tasks (kdlab/tasks: one module per task, reached by the stages only through
    the registry kdlab.distill.task) the four below; scripts and the top (kdlab/: the API, `python -m kdlab`)
    anything. The
    package root `kdlab` (kdlab/__init__.py, which loads nothing at import) is the namespace every module
    lives in, not a layer;
(c) a private name (`_x`, not `__x__`) imported from, or read as an attribute of, another of our modules;
(d) an import of the old top-level names train, distill, search, eval, scripts (only kdlab.* exists);
(e) an import of our own modules inside a function, except in the modules of LAZY_IMPORTS.

    .venv/bin/python -m pytest tests/test_structure.py -q
"""
from __future__ import annotations

import ast
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# folder -> (installed package, layer rank): a module may import ranks <= its own.
LAYERS = {"eval": ("kdlab.eval", 0), "distill": ("kdlab.distill", 1), "train": ("kdlab.train", 2),
          "search": ("kdlab.search", 3), "tasks": ("kdlab.tasks", 4), "scripts": ("kdlab.scripts", 5),
          "kdlab": ("kdlab", 5)}
OLD_NAMES = ("train", "distill", "search", "eval", "scripts")
# Modules that may import our own modules inside functions, and why.
LAZY_IMPORTS = {
    "kdlab": "the lazy public API: `import kdlab` and `kdlab --version` load no layer",
    "kdlab.scripts.cli": "the CLI boundary: each command imports its stage when it runs, so `kdlab --help` stays "
                         "fast and a bad config is one line before torch loads",
    "kdlab.tasks.classification": "a task: the registry loads it while a config is checked, before torch may load "
                                  "(kdlab.distill.task); its methods import the layers that do the work",
    "kdlab.tasks.seq2seq": "a task: as kdlab.tasks.classification",
}


@dataclass
class Import:
    target: str  # the module imported (kdlab.search.gate), or the top-level name for a non-kdlab import
    names: tuple  # the names a `from ... import` takes from it
    line: int
    in_function: bool


@dataclass
class Module:
    name: str
    path: Path
    rank: int
    imports: list = field(default_factory=list)
    private_reads: list = field(default_factory=list)  # (line, alias, attribute) of `alias._x` on our modules


def module_name(path: Path, root: Path) -> str:
    """eval/latency.py -> kdlab.eval.latency; distill/__init__.py -> kdlab.distill; kdlab/api.py -> kdlab.api."""
    package = LAYERS[path.relative_to(root).parts[0]][0]
    return package if path.stem == "__init__" else f"{package}.{path.stem}"


def _resolve(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def parse_module(path: Path, root: Path, known: set[str]) -> Module:
    name = module_name(path, root)
    module = Module(name, path, LAYERS[path.relative_to(root).parts[0]][1])
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    aliases: dict[str, str] = {}  # local name -> our module it is bound to

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for a in child.names:
                    module.imports.append(Import(a.name, (), child.lineno, inside))
                    if a.name in known:
                        aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
            elif isinstance(child, ast.ImportFrom):
                source = _resolve(child, name, path.stem == "__init__")
                plain = [a for a in child.names if f"{source}.{a.name}" not in known]
                for a in child.names:  # `from kdlab.search import gate` imports the module kdlab.search.gate
                    if f"{source}.{a.name}" in known:
                        module.imports.append(Import(f"{source}.{a.name}", (), child.lineno, inside))
                        aliases[a.asname or a.name] = f"{source}.{a.name}"
                if plain or not child.names:
                    module.imports.append(Import(source, tuple(a.name for a in plain), child.lineno, inside))
            elif (isinstance(child, ast.Attribute) and isinstance(child.value, ast.Name)
                  and child.value.id in aliases and _private(child.attr)):
                module.private_reads.append((child.lineno, child.value.id, child.attr))
            visit(child, inside)

    visit(tree, False)
    return module


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def import_graph(root: Path = ROOT) -> dict[str, Module]:
    """Every module of the layer folders under `root`, by installed name, with what it imports."""
    paths = sorted(p for folder in LAYERS if (root / folder).is_dir() for p in (root / folder).glob("*.py"))
    known = {module_name(p, root) for p in paths}
    return {m.name: m for m in (parse_module(p, root, known) for p in paths)}


def _ours(target: str, graph: dict) -> str | None:
    """The module of ours an import target names (kdlab.x.y, or the package kdlab.x it is in), else None."""
    parts = target.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in graph:
            return ".".join(parts[:n])
    return None


def edges(graph: dict) -> dict[str, set[str]]:
    """module -> the other modules of ours it imports (the package root `kdlab` left out: it is the namespace)."""
    out = {}
    for m in graph.values():
        out[m.name] = {t for i in m.imports if (t := _ours(i.target, graph)) and t not in (m.name, "kdlab")}
    return out


def cycles(graph: dict) -> list[list[str]]:
    """Each strongly connected group of two or more modules (or a module importing itself), as a sorted list."""
    adjacent, index, low, stack, on_stack, found = edges(graph), {}, {}, [], set(), []

    def strong(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(adjacent.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(adjacent):
        if v not in index:
            strong(v)
    return found


def violations(graph: dict, lazy_allowed: dict = LAZY_IMPORTS) -> list[str]:
    """Every broken rule, one line each: '<rule>: <module>:<line> ...'."""
    out = [f"cycle: {' <-> '.join(group)}" for group in cycles(graph)]
    for m in graph.values():
        where = f"{m.name} ({m.path.name})"
        for i in m.imports:
            top = i.target.split(".")[0]
            if top in OLD_NAMES:
                out.append(f"old name: {where}:{i.line} imports '{i.target}'; valid: kdlab.{i.target}")
                continue
            target = _ours(i.target, graph)
            if target is None or target == m.name:
                continue
            if target != "kdlab" and graph[target].rank > m.rank:
                out.append(f"upward: {where}:{i.line} imports {target} (a higher layer)")
            for name in i.names:
                if _private(name):
                    out.append(f"private: {where}:{i.line} imports {name} from {target}")
            if i.in_function and m.name not in lazy_allowed:
                out.append(f"function-level: {where}:{i.line} imports {target} inside a function")
        for line, alias, attribute in m.private_reads:
            out.append(f"private: {where}:{line} reads {alias}.{attribute} of another module")
    return out


# ---------------------------------------------------------------- the package


def test_the_graph_covers_every_module_of_the_layers():
    graph = import_graph()
    files = [p for folder in LAYERS for p in (ROOT / folder).glob("*.py")]
    assert len(graph) == len(files) > 40
    assert {"kdlab", "kdlab.__main__", "kdlab.eval.latency", "kdlab.distill.config", "kdlab.train.loop",
            "kdlab.search.gate", "kdlab.scripts.cli"} <= set(graph)
    assert "kdlab.distill.config" in edges(graph)["kdlab.search.gate"]


def test_kdlab_imports_one_way_with_no_cycle_and_no_private_name():
    assert violations(import_graph()) == []


def test_every_lazy_import_exemption_is_still_needed():
    graph = import_graph()
    for name in LAZY_IMPORTS:
        lazy = [i for i in graph[name].imports if i.in_function and _ours(i.target, graph)]
        assert name == "kdlab" or lazy, f"{name} imports nothing of ours lazily any more: drop it from LAZY_IMPORTS"


# ---------------------------------------------------------------- each rule fires (synthetic trees)


def tree(tmp_path: Path, files: dict[str, str]) -> dict[str, Module]:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return import_graph(tmp_path)


def test_a_clean_synthetic_tree_passes(tmp_path):
    graph = tree(tmp_path, {
        "eval/metrics.py": "import math\n",
        "distill/losses.py": "from kdlab.eval.metrics import accuracy\n",
        "train/loop.py": "from kdlab.distill import losses\nfrom kdlab.eval import metrics\n",
        "search/study.py": "import kdlab\nfrom kdlab.train.loop import fit\n",
        "scripts/cli.py": "def main():\n    from kdlab.search.study import run\n",
        "kdlab/__init__.py": "from importlib import import_module\n",
    })
    assert violations(graph) == []
    assert edges(graph)["kdlab.train.loop"] == {"kdlab.distill.losses", "kdlab.eval.metrics"}


def test_a_cycle_fires_even_through_a_function_level_import(tmp_path):
    graph = tree(tmp_path, {
        "search/gate.py": "def run():\n    from kdlab.search.seq2seq_gate import run_seq2seq\n",
        "search/seq2seq_gate.py": "from kdlab.search.gate import GateRow\n",
    })
    found = violations(graph, lazy_allowed={"kdlab.search.gate": "test"})
    assert found == ["cycle: kdlab.search.gate <-> kdlab.search.seq2seq_gate"]
    three = tree(tmp_path / "three", {"train/a.py": "from kdlab.train import b\n",
                                      "train/b.py": "import kdlab.train.c\n",
                                      "train/c.py": "from kdlab.train.a import x\n"})
    assert violations(three) == ["cycle: kdlab.train.a <-> kdlab.train.b <-> kdlab.train.c"]


@pytest.mark.parametrize("importer,statement", [
    ("eval/latency.py", "from kdlab.distill.export import load_served"),
    ("eval/latency.py", "import kdlab.scripts.cli"),
    ("distill/export.py", "from kdlab.train.loop import fit"),
    ("train/loop.py", "from kdlab.search import gate"),
    ("search/gate.py", "from kdlab.scripts.predict import main"),
])
def test_an_upward_import_fires(tmp_path, importer, statement):
    files = dict.fromkeys(("eval/__init__.py", "distill/export.py", "train/loop.py", "search/gate.py",
                           "scripts/cli.py", "scripts/predict.py"), "")
    graph = tree(tmp_path, {**files, importer: statement + "\n"})
    found = violations(graph)
    assert len(found) == 1 and found[0].startswith(f"upward: {module_name(tmp_path / importer, tmp_path)} (")


def test_a_private_name_imported_or_read_across_modules_fires(tmp_path):
    graph = tree(tmp_path, {
        "search/gate.py": "def _cycling(): pass\ndef __version__(): pass\n",
        "search/capacity.py": "from kdlab.search.gate import _cycling, __version__, timing_batches\n",
        "search/export.py": "from kdlab.search import gate\nx = gate._cycling\ny = gate.__name__\n",
        "search/space.py": "import kdlab.search.gate as g\nz = g._cycling()\n",
    })
    assert violations(graph) == [
        "private: kdlab.search.capacity (capacity.py):1 imports _cycling from kdlab.search.gate",
        "private: kdlab.search.export (export.py):2 reads gate._cycling of another module",
        "private: kdlab.search.space (space.py):2 reads g._cycling of another module",
    ]


@pytest.mark.parametrize("statement,name", [("import train.loop", "train.loop"), ("from distill.export import x",
                                            "distill.export"), ("import eval", "eval"), ("from scripts import cli",
                                            "scripts"), ("import search.gate as gate", "search.gate")])
def test_an_old_top_level_name_fires(tmp_path, statement, name):
    graph = tree(tmp_path, {"scripts/bench.py": f"{statement}\n"})
    assert violations(graph) == [f"old name: kdlab.scripts.bench (bench.py):1 imports '{name}'; valid: kdlab.{name}"]


def test_a_function_level_import_of_our_modules_fires_outside_the_exemptions(tmp_path):
    graph = tree(tmp_path, {
        "eval/latency.py": "",
        "search/export.py": ("import json\n"
                             "def run():\n"
                             "    import torch  # not ours: the rule is about kdlab's own graph\n"
                             "    from kdlab.eval.latency import measure\n"
                             "class A:\n"
                             "    def m(self):\n"
                             "        f = lambda: __import__('x')\n"
                             "        import kdlab.eval.latency\n"),
        "scripts/cli.py": "def cmd():\n    from kdlab.search.export import run\n",
        "kdlab/__init__.py": "def __getattr__(name):\n    from kdlab.scripts import cli\n",
    })
    assert violations(graph) == [
        "function-level: kdlab.search.export (export.py):4 imports kdlab.eval.latency inside a function",
        "function-level: kdlab.search.export (export.py):8 imports kdlab.eval.latency inside a function",
    ]

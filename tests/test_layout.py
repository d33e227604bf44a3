"""The package's shape: no import cycles, no function over 80 lines, the core never imports kdkit.lm/hf/api, and
each kind of data gets its task."""

import ast
from pathlib import Path

import torch

from kdkit.data.core import ArrayData, DataSplits
from kdkit.tasks import task_for

SRC = Path(__file__).resolve().parents[1] / "src" / "kdkit"
CORE = ("kdkit.training", "kdkit.teacher", "kdkit.evaluation", "kdkit.export", "kdkit.compress")


def _modules():
    mods = {}
    for p in SRC.rglob("*.py"):
        parts = list(p.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    return mods


def _imports(mods):
    """Every kdkit module each module imports, at module level or inside a function."""
    graph = {m: set() for m in mods}
    for m, p in mods.items():
        package = m if p.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(p.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)] if node.level else []
                stem = ".".join(base + ([node.module] if node.module else []))
                names = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in mods else stem for a in node.names]
            for name in names:
                while name and name not in mods:
                    name = name.rpartition(".")[0]
                if name and name != m:
                    graph[m].add(name)
    return graph


def _cycle(graph):
    """One import cycle as a list of modules, or None."""
    state, stack = {}, []

    def visit(v):
        state[v] = 1
        stack.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return stack[stack.index(w):] + [w]
            if w not in state:
                found = visit(w)
                if found:
                    return found
        state[v] = 2
        stack.pop()
        return None

    for v in sorted(graph):
        if v not in state:
            found = visit(v)
            if found:
                return found
    return None


def test_no_import_cycle_in_the_package():
    assert _cycle(_imports(_modules())) is None


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_core_never_imports_language_models_transformers_or_the_api():
    graph = _imports(_modules())
    crossings = [(m, t) for m in graph if m.startswith(CORE) for t in graph[m]
                 if t.startswith(("kdkit.lm", "kdkit.hf", "kdkit.api"))]
    assert crossings == []


def test_no_function_over_80_lines():
    long = [(p.name, n.name, n.end_lineno - n.lineno + 1) for p in _modules().values()
            for n in ast.walk(ast.parse(p.read_text()))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 80]
    assert long == []


def test_each_kind_of_data_gets_its_task():
    images = ArrayData(torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 1]))
    rows = ArrayData(torch.randn(4, 3), torch.randn(4, 2))
    texts = ArrayData(torch.tensor([[5, 6, 0], [7, 0, 0], [5, 5, 5], [8, 0, 0]]), torch.tensor([0, 1, 1, 0]))
    tokens = torch.tensor([[5, 6, 7, 0], [7, 8, 0, 0]])
    corpus = ArrayData(tokens, torch.tensor([[6, 7, -100, -100], [8, -100, -100, -100]]))
    assert task_for(images).name == "classification"
    assert task_for(rows).name == "regression"
    assert task_for(texts).name == "text_classification"
    assert task_for(corpus).name == "causal_lm"
    assert task_for(ArrayData(torch.randn(4, 3))).name == "classification"  # unlabelled arrays
    splits = DataSplits(train=corpus, val=None, test=None, num_classes=None, input_shape=(4,))
    assert task_for(splits).name == "causal_lm"  # a run's splits: the training split decides
    assert task_for(corpus).cache_refusal and task_for(images).cache_refusal is None

"""The package layering of docs/architecture.md, checked on the source: pure maths imports torch
only, lower layers never import higher ones, and no module imports itself back (no cycles)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("reranker", "indexer", "service", "evaluation", "training", "vit_rerank")

#: What each package may import from the project (itself always).
ALLOWED = {
    "reranker": set(),
    "indexer": {"reranker"},
    "evaluation": {"reranker", "indexer"},
    "service": {"reranker", "indexer"},
    "training": {"reranker", "indexer", "evaluation"},
    "vit_rerank": {"reranker", "indexer", "evaluation", "service", "training"},
}

#: The pure maths: importable with torch alone.
PURE_MATHS = ("reranker.ot", "reranker.sinkhorn_plain", "reranker.mnn", "reranker.rollout", "reranker.marginals", "reranker.rerank", "reranker.grids",
              "reranker.features")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def _runtime_nodes(tree: ast.AST):
    """Every node, except those under ``if TYPE_CHECKING:`` (imports for annotations only)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and getattr(child.test, "id", None) == "TYPE_CHECKING":
                stack.extend(child.orelse)
                continue
            stack.append(child)


def import_graph() -> dict[str, set[str]]:
    """Project module -> the project modules it imports at run time (anywhere in the file, lazy imports
    too; not the annotation-only imports under ``if TYPE_CHECKING:``)."""
    sources = _sources()
    graph: dict[str, set[str]] = {}
    for name, path in sources.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        deps: set[str] = set()
        for node in _runtime_nodes(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                module = ".".join(base + ([node.module] if node.module else []))
                submodules = {f"{module}.{a.name}" for a in node.names} & sources.keys()
                deps.update(submodules or {module})  # `from pkg import submodule` needs only the submodule
        graph[name] = {d for d in deps if d in sources and d != name}
    return graph


def test_lower_layers_never_import_higher_ones():
    wrong = [
        f"{module} imports {dep}"
        for module, deps in import_graph().items()
        for dep in deps
        if dep.split(".")[0] not in ALLOWED[module.split(".")[0]] | {module.split(".")[0]}
    ]
    assert not wrong, wrong


def test_no_import_cycles():
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles


def test_the_graph_sees_real_imports():
    """The checks above cannot pass on an empty graph."""
    graph = import_graph()
    assert "reranker.ot" in graph["reranker.rerank"]
    assert "indexer" in graph["service.engine"]  # through the indexer's front door
    assert "indexer.index_dir" in graph["indexer.build"]
    assert "reranker.backbones.registry" in graph["reranker.backbones.timm_factory"]


def test_pure_maths_imports_torch_only():
    code = (
        "import sys\n"
        f"import {', '.join(PURE_MATHS)}\n"
        "heavy = {'timm', 'faiss', 'fastapi', 'PIL', 'matplotlib', 'transformers', 'ot', 'indexer', 'service'}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy or m.startswith('reranker.backbones')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_the_service_runs_without_the_extras():
    """`make demo` installs no extras: serving an index must not import Ray, transformers or the test tools."""
    code = (
        "import sys\n"
        "from service import ServiceSettings, create_app\n"
        "from service.cli import uvicorn_options\n"
        "create_app(ServiceSettings(index='/nonexistent', device='cpu')).openapi()\n"
        "uvicorn_options()\n"
        "extras = {'ray', 'transformers', 'pytest', 'schemathesis', 'psutil', 'playwright', 'pytorch_metric_learning'}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in extras))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_only_the_command_line_imports_training():
    """Training is a leaf: the library, the service and the benchmarks never depend on it."""
    importers = sorted(m for m, deps in import_graph().items()
                       if not m.startswith("training") and any(d.split(".")[0] == "training" for d in deps))
    assert importers == ["vit_rerank.cli"] or importers == [], importers

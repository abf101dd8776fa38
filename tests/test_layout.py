"""The shape of the tree: packages import each other without cycles, files stay readable, and
only the platform module (and the kernels) tell CUDA from CPU."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Where each installed package's source lives (pyproject.toml's package-dir).
SOURCES = {"srt": "srt", "srt.tokenizer_manager": "tokenizer_manager", "srt.scheduler": "scheduler", "srt.detokenizer": "detokenizer", "srt.kernels": "kernels"}
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    modules = {}
    for package, folder in SOURCES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if package == "srt" and parts[0] in {"tokenizer_manager", "scheduler", "detokenizer", "kernels"}:
                continue
            modules[".".join((package, *parts)).removesuffix(".__init__")] = path
    return modules


def _package(module: str, packages: set[str]) -> str:
    """The innermost package of ``module`` below ``srt`` (``srt.layers.attention``, ``srt.scheduler``...)."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in packages:
            return ".".join(parts[:n])
    return "srt"


def _runtime_imports(path: Path) -> set[str]:
    """Modules imported when ``path`` runs (imports under ``if TYPE_CHECKING:`` are for type hints only)."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] == "srt"}


def test_no_import_cycle_between_packages() -> None:
    modules = _modules()
    packages = {m for m, p in modules.items() if p.name == "__init__.py"} | {"srt"}
    graph: dict[str, set[str]] = defaultdict(set)
    for module, path in modules.items():
        source = _package(module, packages)
        for imported in _runtime_imports(path):
            target = _package(imported, packages)
            if target != source and not source.startswith(target + ".") and target != "srt":
                graph[source].add(target)
    # srt itself holds only shared modules (server_args, launch) and imports nothing heavier.
    visiting, done, cycles = set(), set(), []

    def visit(node: str, path: list[str]) -> None:
        visiting.add(node)
        for nxt in graph[node]:
            if nxt in visiting:
                cycles.append(path[path.index(nxt) :] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in done:
                visit(nxt, [*path, nxt])
        visiting.discard(node)
        done.add(node)

    for node in sorted(graph):
        if node not in done:
            visit(node, [node])
    assert not cycles, cycles


def test_no_file_is_longer_than_a_sitting() -> None:
    long = {str(p.relative_to(ROOT)): n for p in ROOT.glob("*/**/*.py") if ".venv" not in p.parts and (n := len(p.read_text().splitlines())) > MAX_LINES}
    long = {path: n for path, n in long.items() if not path.startswith(("tests/", "scripts/"))}
    assert not long, long


def test_only_the_platform_tells_cuda_from_cpu() -> None:
    pattern = re.compile(r"torch\.cuda|device\.type ==|\.type == \"cuda\"|\"nccl\"|mkldnn")
    allowed = ("srt/platform/", "kernels/", "srt/layers/cpu_weight_packing.py")
    offenders = [
        f"{path.relative_to(ROOT)}:{n}"
        for module, path in _modules().items()
        if not str(path.relative_to(ROOT)).startswith(allowed)
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not offenders, offenders

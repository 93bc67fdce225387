"""The layer rule of README's architecture section, enforced on the code: walk every module of nora_cli with
`ast`, collect every import (module level and inside functions), and require that no import runs from a
lower layer to a higher one and that the module graph has no cycles."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "nora_cli"

#: low → high; a module may import from its own layer or any lower one. First matching prefix wins.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("nora_cli", "nora_cli.errors", "nora_cli.safety", "nora_cli.cpu_kernels", "nora_cli.threads")),
    ("config", ("nora_cli.config",)),
    ("core", ("nora_cli.models", "nora_cli.lora", "nora_cli.optim", "nora_cli.data", "nora_cli.lab")),
    ("run_dir", ("nora_cli.run_dir",)),
    ("engine", ("nora_cli.loop", "nora_cli.export", "nora_cli.evaluate")),
    ("tasks", ("nora_cli.tasks",)),
    ("workflows", ("nora_cli.train", "nora_cli.merge", "nora_cli.sample", "nora_cli.sweep", "nora_cli.sweep_report")),
    ("commands", ("nora_cli.commands", "nora_cli.options")),
    ("app", ("nora_cli.cli", "nora_cli.__main__")),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    assert best is not None, f"{module} is in no layer: add it to LAYERS and to README's architecture section"
    return best


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """nora_cli modules that `path` imports (`from a.b import c` counts a.b.c when that is a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("nora_cli"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nora_cli"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
    return found


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imports_of(path, set(files)) - {name} for name, path in files.items()}


def test_every_module_has_a_layer() -> None:
    for module in graph():
        layer_of(module)


def test_no_import_runs_up_a_layer() -> None:
    upward = [
        f"{src} ({LAYERS[layer_of(src)][0]}) imports {dst} ({LAYERS[layer_of(dst)][0]})"
        for src, dsts in sorted(graph().items())
        for dst in sorted(dsts)
        if layer_of(dst) > layer_of(src)
    ]
    assert not upward, "\n".join(upward)


def test_module_graph_has_no_cycles() -> None:
    edges = graph()
    # a package's __init__ is its face: `from nora_cli.x import y` passes through it, so only real files count
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)

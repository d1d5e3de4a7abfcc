"""The package's imports form no cycle, counting every import in a module: at top level, under
TYPE_CHECKING and inside functions (a page of the web UI importing another inside a function
still loaded a second copy of the script Streamlit runs as __main__). Checked on the source
with `ast`, so a cycle fails here even where import order hides it at run time."""

from __future__ import annotations

import ast
from pathlib import Path

import wikigpt

SRC = Path(wikigpt.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, name: str) -> set[str]:
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for n in ast.walk(ast.parse(path.read_text())):
        if isinstance(n, ast.Import):
            found |= {a.name for a in n.names}
        elif isinstance(n, ast.ImportFrom):
            base = n.module or ""
            if n.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - n.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in n.names}
    return {m for m in found if m.startswith("wikigpt")}


def test_no_import_cycles():
    modules = {module_name(p): p for p in SRC.rglob("*.py")}
    graph = {m: {d for d in imports(p, m) if d in modules and d != m} for m, p in modules.items()}
    # a package's __init__ importing its own submodules is not a cycle back to it
    graph = {m: {d for d in deps if not (m.startswith(d + ".") and modules[d].name == "__init__.py")}
             for m, deps in graph.items()}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph[m]):
            assert state.get(d) != 1, "import cycle: " + " -> ".join(path[path.index(d):] + [d])
            if d not in state:
                visit(d)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert "wikigpt.ui.common" in graph and "wikigpt.ui.score_page" in graph["wikigpt.ui.app"]
    assert not [m for m, deps in graph.items() if "wikigpt.ui.app" in deps]  # the script is nobody's module

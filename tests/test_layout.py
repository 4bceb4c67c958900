"""The package's layout: no import circles between sqlgpt's modules, and
every SQL statement under sqlgpt/store/ (see docs/architecture.md)."""
import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "sqlgpt"

# string literals with SQL outside sqlgpt/store/, each with its reason:
# {(module, the function holding it or "<module>"): why it is not the store's}
SQL_OUTSIDE_STORE = {
    ("sqlgpt.sql.functions", "<module>"):
        "the module docstring's example of the SQL functions it registers",
    ("sqlgpt.cli.explore", "extension_path_command"):
        "help text: an example of the loadable extension in the sqlite3 shell",
    ("sqlgpt.cli.explore", "sql"):
        "help text: an example query for `sqlgpt sql`",
    ("sqlgpt.sql.functions", "probe"):
        "a one-row statement that asks the host's connection whether it was interrupted",
    ("sqlgpt.contract", "<module>"):
        "the keywords after which sqlgpt's SQL names its tables, declared for both loaders",
}
SQL_KEYWORD = re.compile(r"\b(SELECT|INSERT|UPDATE|DELETE|CREATE|BEGIN)\b")


def module_name(path):
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules():
    """{module name: (path, parsed tree)} of every module in the package."""
    return {module_name(p): (p, ast.parse(p.read_text(), str(p)))
            for p in sorted(PACKAGE.rglob("*.py"))}


def imported(module, path, node, known):
    """The package's modules an Import / ImportFrom node imports."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in known]
    if node.level:
        base = module.split(".")
        if path.name != "__init__.py":
            base = base[:-1]
        base = base[:len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    out = []
    for alias in node.names:
        if f"{source}.{alias.name}" in known:  # from package import module
            out.append(f"{source}.{alias.name}")
        elif source in known:
            out.append(source)
    return out


def import_graph():
    """{module: {modules it imports}}, module-level and function-level
    imports alike, relative and absolute."""
    found = modules()
    graph = {}
    for module, (path, tree) in found.items():
        graph[module] = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                graph[module].update(m for m in imported(module, path, node, found)
                                     if m != module)
    return graph


def find_cycle(graph):
    """One import circle as a list of modules (first == last), or None."""
    state = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt, path)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node, [])
            if cycle:
                return cycle
    return None


def test_the_import_graph_sees_every_package():
    graph = import_graph()
    for package in ("sqlgpt.model", "sqlgpt.data", "sqlgpt.data.tokenizers", "sqlgpt.train",
                    "sqlgpt.store", "sqlgpt.inference", "sqlgpt.interop", "sqlgpt.sql",
                    "sqlgpt.cli", "sqlgpt.chat", "sqlgpt.serve", "sqlgpt.plugins",
                    "sqlgpt.classify"):
        assert package in graph
    assert "sqlgpt.model.arch" in graph["sqlgpt.model.model"]
    assert "sqlgpt.api" in graph["sqlgpt"]


def test_every_package_is_installed():
    """pyproject.toml names each package: one left out imports from a
    checkout but is missing from an installed sqlgpt."""
    import tomllib
    listed = set(tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())
                 ["tool"]["setuptools"]["packages"])
    found = {".".join(init.parent.relative_to(PACKAGE.parent).parts)
             for init in PACKAGE.rglob("__init__.py")}
    assert found == listed


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_layers_import_downward_only():
    """cli -> api, sql -> train, inference, interop -> store, data -> model
    -> errors: no package imports one above it (nor the top-level sqlgpt,
    which imports the API)."""
    above = {
        "sqlgpt.model": ("sqlgpt.store", "sqlgpt.train", "sqlgpt.inference", "sqlgpt.interop",
                         "sqlgpt.sql", "sqlgpt.cli", "sqlgpt.api", "sqlgpt.data"),
        "sqlgpt.data": ("sqlgpt.store", "sqlgpt.train", "sqlgpt.inference", "sqlgpt.interop",
                        "sqlgpt.sql", "sqlgpt.cli", "sqlgpt.api"),
        "sqlgpt.store": ("sqlgpt.train", "sqlgpt.inference", "sqlgpt.interop", "sqlgpt.sql",
                         "sqlgpt.cli", "sqlgpt.api"),
        "sqlgpt.train": ("sqlgpt.sql", "sqlgpt.cli", "sqlgpt.api"),
        "sqlgpt.classify": ("sqlgpt.sql", "sqlgpt.cli", "sqlgpt.api"),
        "sqlgpt.inference": ("sqlgpt.sql", "sqlgpt.cli", "sqlgpt.api"),
        "sqlgpt.interop": ("sqlgpt.sql", "sqlgpt.cli", "sqlgpt.api"),
        "sqlgpt.sql": ("sqlgpt.cli",),
        "sqlgpt.api": ("sqlgpt.cli", "sqlgpt.sql"),
    }
    wrong = []
    for module, targets in import_graph().items():
        for layer, forbidden in above.items():
            if module == layer or module.startswith(layer + "."):
                wrong += [f"{module} -> {t}" for t in targets
                          if t == "sqlgpt" or any(t == f or t.startswith(f + ".")
                                                  for f in forbidden)]
    assert not wrong, "imports against the layers: " + ", ".join(sorted(wrong))


def sql_literals(tree, scope="<module>"):
    """(line, the function holding it, keyword) of every string literal that
    reads as SQL."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield from sql_literals(node, node.name)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            match = SQL_KEYWORD.search(node.value)
            if match:
                yield node.lineno, scope, match.group(1)
        else:
            yield from sql_literals(node, scope)


def test_sql_statements_live_in_the_store():
    found = set()
    for module, (path, tree) in modules().items():
        if module == "sqlgpt.store" or module.startswith("sqlgpt.store."):
            continue
        for line, scope, keyword in sql_literals(tree):
            found.add((module, scope))
            assert (module, scope) in SQL_OUTSIDE_STORE, \
                f"SQL outside sqlgpt/store/: {path.relative_to(PACKAGE.parent)}:{line} " \
                f"({keyword}, in {scope})"
    # every listed exception is still needed
    assert set(SQL_OUTSIDE_STORE) <= found, set(SQL_OUTSIDE_STORE) - found


def test_the_store_holds_sql():
    """The check above finds SQL where it is (it is not blind)."""
    path, tree = modules()["sqlgpt.store.queries"]
    assert any(keyword == "SELECT" for _, _, keyword in sql_literals(tree))

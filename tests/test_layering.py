"""The shape of the package, read from its import statements (no module is imported here).

Every ``import`` and ``from ... import`` of every module under ``batchinf/`` counts, at any
depth: those inside functions too, since a late import hides a cycle rather than removing it.

No cycle: the modules of ``batchinf`` import each other as a directed acyclic graph, so each
can be read, and loaded, after the ones it uses.

Layers, from the bottom:

1. ``errors`` and ``settings`` import nothing of batchinf: every other module may use them.
2. ``storage`` (the package) imports nothing of batchinf but ``errors`` and ``settings``;
   outside it, modules import ``batchinf.storage`` and never its backends
   (``storage.local``, ``storage.s3``, ``storage.backend``), so a backend can change alone.
3. The manifest readers (``rows``, ``manifest``, ``listing``, ``tables``) import nothing but
   each other and layers 1-2: reading rows needs no job, no model and no cluster.
4. ``raycluster`` (all of the Ray glue) imports nothing of batchinf but ``errors`` and
   ``settings``: no job logic.
5. ``job`` and ``jobstore``, and everything they import, never import Ray or TensorFlow: the
   queue's records are read and written (``batchinf status``, the dispatcher) without either.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Mapping
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "batchinf"

FOUNDATION = {"errors", "settings"}
STORAGE_BACKENDS = {"storage.backend", "storage.local", "storage.s3"}
READERS = {"rows", "manifest", "listing", "tables"}
HEAVY = {"ray", "tensorflow"}


def _name(path: Path) -> str:
    """A module's name below ``batchinf``: ``manifest``, ``storage``, ``storage.s3``."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@functools.cache
def modules() -> dict[str, Path]:
    return {_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _imported_names(module: str) -> set[str]:
    """Every dotted name an import statement of ``module`` names, at any depth (relative
    imports resolved); for ``from a import b`` both ``a`` and ``a.b``, since ``b`` may be a
    module."""
    tree = ast.parse(modules()[module].read_text(), filename=str(modules()[module]))
    here = ["batchinf", *module.split(".")]
    if modules()[module].name != "__init__.py":
        here.pop()  # a plain module's relative imports start from its package
    for guard in [n for n in ast.walk(tree) if _type_checking_only(n)]:
        guard.body = []  # imports for annotations only: never run, so no cycle at run time
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*here[: len(here) - node.level + 1], *filter(None, [base])])
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _type_checking_only(node: ast.AST) -> bool:
    """``if TYPE_CHECKING:`` (or ``typing.TYPE_CHECKING``)."""
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


@functools.cache
def imports(module: str) -> frozenset[str]:
    """The modules of batchinf that ``module`` imports. Importing ``batchinf.a.b`` runs
    ``batchinf.a`` too, so both count, except a package that holds ``module`` itself (its
    ``__init__`` is already under way when ``module`` loads)."""
    found: set[str] = set()
    for name in _imported_names(module):
        parts = name.split(".")
        if parts[0] != "batchinf":
            continue
        for end in range(2, len(parts) + 1):
            target = ".".join(parts[1:end])
            if target in modules() and target != module and not module.startswith(target + "."):
                found.add(target)
    return frozenset(found)


def external(module: str) -> set[str]:
    """The top-level names of what ``module`` imports from outside batchinf."""
    return {name.split(".")[0] for name in _imported_names(module)} - {"batchinf", ""}


def reachable(module: str) -> set[str]:
    """``module`` and every module of batchinf it imports, directly or not."""
    seen, todo = {module}, [module]
    while todo:
        for target in imports(todo.pop()) - seen:
            seen.add(target)
            todo.append(target)
    return seen


def graph() -> dict[str, frozenset[str]]:
    return {module: imports(module) for module in modules()}


def find_cycle(edges: Mapping[str, frozenset[str]]) -> list[str] | None:
    """One cycle of the graph as the nodes along it (first == last), or None."""
    state: dict[str, str] = {}  # "open" while on the path, "done" once all below are
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for target in sorted(edges[node]):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_is_read_from_every_module_and_sees_imports_inside_functions():
    assert {"errors", "storage", "storage.s3", "manifest", "rows", "raycluster",
            "online.app"} <= set(modules())
    assert {"listing", "tables", "rows", "storage"} <= imports("manifest")
    assert "storage.s3" in imports("storage")
    # cli imports most commands' modules inside the functions that need them
    assert {"dispatcher", "report", "demo"} <= imports("cli")


def test_a_cycle_is_found_when_there_is_one():
    """The check itself, on made-up graphs: a checker that never fails proves nothing."""
    edges = {"d": frozenset({"a"}), "a": frozenset({"b"}), "b": frozenset({"c"}),
             "c": frozenset({"a"})}
    assert find_cycle(edges) == ["a", "b", "c", "a"]
    assert find_cycle({**edges, "c": frozenset({"c"})}) == ["c", "c"]
    assert find_cycle({**edges, "c": frozenset()}) is None


def test_batchinf_has_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_errors_and_settings_import_nothing_of_batchinf():
    for module in FOUNDATION:
        assert imports(module) == set(), module


def test_storage_uses_only_the_foundation_and_no_one_reaches_past_it():
    for module in ("storage", *STORAGE_BACKENDS):
        outside = {m for m in imports(module) if m != "storage" and not m.startswith("storage.")}
        assert outside <= FOUNDATION, (module, outside)
    for module in set(modules()) - {"storage"} - STORAGE_BACKENDS:
        assert not imports(module) & STORAGE_BACKENDS, module


def test_the_manifest_readers_need_no_job_model_or_cluster():
    for module in READERS:
        assert imports(module) <= READERS | FOUNDATION | {"storage"}, (module, imports(module))


def test_raycluster_holds_no_job_logic():
    assert imports("raycluster") <= FOUNDATION, imports("raycluster")


def test_the_job_records_load_without_ray_or_tensorflow():
    for module in ("job", "jobstore"):
        loaded = {m: external(m) & HEAVY for m in reachable(module)}
        assert not any(loaded.values()), {m: heavy for m, heavy in loaded.items() if heavy}

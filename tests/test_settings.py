"""One settings object: every knob a documented field, read from the environment in one place.

Unit tier: no Ray, no TensorFlow. The package's source is read as syntax trees, so a knob added
without a field (or a module reading the environment itself) fails here, not in production.
"""

from __future__ import annotations

import ast
import dataclasses
import pickle
import re
from pathlib import Path

import pytest

from batchinf.settings import GROUPS, SettingError, Settings, reference, variable

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "batchinf"
MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "settings.py")
FIELDS = {variable(f.name) for f in dataclasses.fields(Settings)}
KNOB = re.compile(r"BATCHINF_[A-Z0-9_]+")


def _ids(path: Path) -> str:
    return str(path.relative_to(ROOT))


# -- the class and its reference table -------------------------------------------------------


@pytest.mark.parametrize("f", dataclasses.fields(Settings), ids=lambda f: f.name)
def test_every_setting_says_what_it_does_and_where_it_belongs(f: dataclasses.Field) -> None:
    assert f.metadata.get("description", "").strip(), f"{f.name} has no description"
    assert f.metadata.get("group") in GROUPS, f"{f.name}: group {f.metadata.get('group')!r}"


def test_the_reference_in_the_docs_is_generated_from_the_settings() -> None:
    written = (ROOT / "docs" / "settings.md").read_text(encoding="utf-8")
    assert written == reference(), "regenerate: python -m batchinf.settings > docs/settings.md"
    for name in FIELDS:
        assert f"`{name}`" in written


# -- reading the environment -----------------------------------------------------------------


def test_unset_and_empty_variables_leave_the_defaults() -> None:
    assert Settings.from_env({}) == Settings()
    assert Settings.from_env({"BATCHINF_STALL_TIMEOUT": " ", "BATCHINF_NODE_TYPES": ""}) == Settings()


def test_variables_are_read_as_their_fields_types() -> None:
    s = Settings.from_env({
        "BATCHINF_STALL_TIMEOUT": "12.5", "BATCHINF_S3_ATTEMPTS": " 3 ",
        "BATCHINF_S3_PRESIGNED_GET": "0", "BATCHINF_NODE_TYPES": '[{"CPU": 2}]',
        "BATCHINF_TF_THREADS": "2", "BATCHINF_STORE": "s3://ops/batchinf",
        "BATCHINF_NOT_A_KNOB": "ignored",
    })
    assert (s.stall_timeout, s.s3_attempts, s.s3_presigned_get, s.tf_threads) == (12.5, 3, False, 2)
    assert s.node_type_list == [{"CPU": 2}] and s.store_uri == "s3://ops/batchinf"


def test_set_but_empty_is_a_value_where_it_means_nothing_is_allowed() -> None:
    s = Settings.from_env({"BATCHINF_LOCAL_ROOTS": "", "BATCHINF_ALLOWED_BUCKETS": ""})
    assert (s.local_roots, s.allowed_buckets) == ("", "")
    assert Settings.from_env(s.as_env()) == s  # and a dispatcher passes it on as such


@pytest.mark.parametrize(("name", "raw"), [
    ("BATCHINF_S3_ATTEMPTS", "abc"), ("BATCHINF_STALL_TIMEOUT", "15m"),
    ("BATCHINF_S3_PRESIGNED_GET", "maybe"), ("BATCHINF_NODE_TYPES", "[{"),
])
def test_a_bad_value_names_its_variable(name: str, raw: str) -> None:
    with pytest.raises(SettingError, match=name):
        Settings.from_env({name: raw})


def test_what_a_dispatcher_passes_on_reads_back_the_same_without_its_secrets() -> None:
    s = Settings(retry_delay=1.0, launch_refusals=2, s3_presigned_get=False,
                 node_types='[{"CPU": 1}]', serve_token="hunter2")
    env = s.as_env()
    assert set(env) == {"BATCHINF_RETRY_DELAY", "BATCHINF_LAUNCH_REFUSALS",
                        "BATCHINF_S3_PRESIGNED_GET", "BATCHINF_NODE_TYPES"}
    assert Settings.from_env(env) == dataclasses.replace(s, serve_token=None)
    assert Settings().as_env() == {}


def test_options_win_over_the_environment_and_none_leaves_a_setting() -> None:
    s = Settings.from_env({"BATCHINF_STORE": "/from/env", "BATCHINF_RETRY_DELAY": "2"})
    assert s.replace(store="/from/option", retry_delay=None) == dataclasses.replace(
        s, store="/from/option")


def test_settings_travel_to_ray_tasks_and_actors_whole() -> None:
    s = Settings(decode_policy="nice", node_types="[]")
    assert pickle.loads(pickle.dumps(s)) == s
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.decode_policy = "idle"  # type: ignore[misc]


# -- the package's source: every knob is a field, and only settings.py reads them -------------


def _strings(tree: ast.AST) -> set[str]:
    return {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}


@pytest.mark.parametrize("path", [*MODULES, PACKAGE / "settings.py"], ids=_ids)
def test_every_batchinf_variable_named_in_the_package_is_a_setting(path: Path) -> None:
    named = {m for s in _strings(ast.parse(path.read_text(encoding="utf-8"))) for m in KNOB.findall(s)}
    assert named <= FIELDS, f"not a Settings field (add it, with a description): {named - FIELDS}"


def _is_environ(node: ast.AST) -> bool:
    """``os.environ`` (or a bare ``environ`` imported from os)."""
    if isinstance(node, ast.Attribute):
        return node.attr == "environ" and isinstance(node.value, ast.Name) and node.value.id == "os"
    return isinstance(node, ast.Name) and node.id == "environ"


def _is_getenv(node: ast.AST) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "getenv") or (
        isinstance(node, ast.Name) and node.id == "getenv")


def env_read(node: ast.AST) -> tuple[bool, ast.AST | None]:
    """Whether ``node`` reads the environment (``os.environ[...]``, ``.get``, ``os.getenv``,
    ``... in os.environ``, walking it), and the expression naming the variable, if one does."""
    if isinstance(node, ast.Call):
        func, first = node.func, (node.args[0] if node.args else None)
        if _is_getenv(func):
            return True, first
        if isinstance(func, ast.Attribute) and _is_environ(func.value):
            if func.attr in {"get", "pop", "setdefault"}:
                return True, first
            return func.attr in {"items", "keys", "values", "copy"}, None
        if isinstance(func, ast.Name) and func.id == "dict" and first is not None:
            return _is_environ(first), None
    if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load):
        return _is_environ(node.value), node.slice
    if isinstance(node, ast.Compare):
        return any(_is_environ(c) for c in node.comparators), node.left
    if isinstance(node, ast.For | ast.comprehension):
        return _is_environ(node.iter), None
    return False, None


def _line(node: ast.AST) -> int:
    return int(getattr(node, "lineno", 0) or getattr(getattr(node, "iter", None), "lineno", 0))


def _removals(tree: ast.AST) -> set[int]:
    """``os.environ.pop(...)`` whose value is thrown away: a removal, not a read (``batchinf
    serve`` drops its token so that no Ray process inherits it)."""
    return {id(n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Expr) and isinstance(n.value, ast.Call)
            and isinstance(n.value.func, ast.Attribute) and n.value.func.attr == "pop"
            and _is_environ(n.value.func.value)}


def _own_nodes(scope: ast.AST, skip: tuple[type, ...]) -> list[ast.AST]:
    """The nodes of ``scope`` outside the nested scopes of the types in ``skip``."""
    found, pending = [], list(ast.iter_child_nodes(scope))
    while pending:
        node = pending.pop()
        if isinstance(node, skip):
            continue
        found.append(node)
        pending.extend(ast.iter_child_nodes(node))
    return found


def _variable_named(node: ast.AST | None, constants: dict[str, str]) -> str | None:
    """The variable an expression names: ``"BATCHINF_X"``, a module constant holding it, or
    ``variable("x")``."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Name):
        return constants.get(node.id)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "variable":
        inner = _variable_named(node.args[0], constants) if node.args else None
        return variable(inner) if inner else None
    return None


def knob_reads(source: str) -> list[str]:
    """Places in ``source`` that read a ``BATCHINF_*`` variable from the environment, or read
    one it cannot name (or walk the environment) in a module that names knobs."""
    tree = ast.parse(source)
    constants: dict[str, str] = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            value = _variable_named(stmt.value, constants)
            if value is not None:
                constants[stmt.targets[0].id] = value
    removed = _removals(tree)
    mentions = any("BATCHINF_" in s for s in _strings(tree))
    found = []
    for node in ast.walk(tree):
        reads, named = env_read(node)
        if not reads or id(node) in removed:
            continue
        name = _variable_named(named, constants)
        # A variable it cannot tell (a parameter, a walk of the whole environment) counts in
        # a module that names knobs: ``_seconds("BATCHINF_S3_READ_TIMEOUT")`` reads one too.
        if (name or "").startswith("BATCHINF_") or (name is None and mentions):
            found.append(f"line {_line(node)}: {name or 'a variable named elsewhere'}")
    return sorted(set(found))


def import_time_reads(source: str) -> list[str]:
    """Reads of the environment that run when the module is imported: module-level statements,
    class bodies and default values, not function bodies or lambdas (nor the lines under
    ``if __name__ == "__main__"``)."""
    tree = ast.parse(source)
    later = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
    found = []

    def visit(statements: list[ast.stmt]) -> None:
        for stmt in statements:
            if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef):
                nodes = [stmt.args, *stmt.decorator_list]  # evaluated at import
            elif isinstance(stmt, ast.If) and "__main__" in _strings(stmt.test):
                continue
            else:
                nodes = [stmt]
            for node in nodes:
                for inner in [node, *_own_nodes(node, later)]:
                    if env_read(inner)[0]:
                        found.append(f"line {_line(inner)}")

    visit(tree.body)
    return sorted(set(found))


@pytest.mark.parametrize("path", MODULES, ids=_ids)
def test_no_module_reads_a_knob_from_the_environment_but_settings(path: Path) -> None:
    found = knob_reads(path.read_text(encoding="utf-8"))
    assert not found, f"{_ids(path)} reads the environment itself (take a Settings): {found}"


@pytest.mark.parametrize("path", [*MODULES, PACKAGE / "settings.py"], ids=_ids)
def test_nothing_reads_the_environment_at_import(path: Path) -> None:
    found = import_time_reads(path.read_text(encoding="utf-8"))
    assert not found, f"{_ids(path)} reads the environment when imported: {found}"


def test_the_scans_catch_what_they_look_for() -> None:
    """The two scans above, on code they must flag and code they must let through."""
    flagged = [
        'import os\nX = int(os.environ.get("BATCHINF_S3_ATTEMPTS", "6"))\n',
        'import os\ndef f():\n    return os.getenv("BATCHINF_STORE")\n',
        'import os\nNAME = "BATCHINF_STORE"\ndef f():\n    return os.environ[NAME]\n',
        'import os\ndef f():\n    return {k: v for k, v in os.environ.items() if k.startswith("BATCHINF_")}\n',
        'import os\ndef f():\n    return "BATCHINF_STORE" in os.environ\n',
        'import os\ndef f(name):\n    return os.environ.get(name)\ndef g():\n    return f("BATCHINF_STORE")\n',
    ]
    for source in flagged:
        assert knob_reads(source), source
    assert import_time_reads(flagged[0]) == ["line 2"]
    assert import_time_reads('import os\nclass A:\n    x = os.getenv("HOME")\n') == ["line 3"]
    assert import_time_reads('import os\ndef f(x=os.environ["HOME"]):\n    pass\n') == ["line 2"]
    fine = [
        'import os\ndef f():\n    return os.environ.get("RAY_AUTH_TOKEN")\n',
        'import os\nTOKEN = "BATCHINF_SERVE_TOKEN"\ndef f():\n    os.environ.pop(TOKEN, None)\n',
        'import os\nf = lambda: os.environ.get("HOME")\nif __name__ == "__main__":\n    os.getenv("X")\n',
    ]
    for source in fine:
        assert not knob_reads(source) and not import_time_reads(source), source

"""Replay a Dockerfile's build steps without a container engine (used by tests/test_deploy.py).

No Docker daemon runs where the tests run, so the images cannot be built. What decides what an
image holds can still be run: the build context that ``.dockerignore`` lets through, then each
COPY, ENV, WORKDIR and RUN in order, in a sandbox folder that stands for the image's filesystem,
with a Python of the base image's version on the PATH. Only the instructions the project's
Dockerfiles use are understood; any other one fails the replay, so it cannot be skipped unnoticed.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Instruction:
    keyword: str
    value: str
    line: int


def read_dockerfile(path: Path) -> list[Instruction]:
    """The instructions of a Dockerfile, continuation lines joined and comments dropped."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        text = raw.strip()
        if not text or text.startswith("#"):
            continue  # Docker drops comment lines, inside a continued instruction too
        if not pending:
            start = number
        pending.append(text.removesuffix("\\").strip())
        if text.endswith("\\"):
            continue
        keyword, _, value = " ".join(pending).partition(" ")
        instructions.append(Instruction(keyword.upper(), value.strip(), start))
        pending = []
    if pending:
        raise ValueError(f"{path}: the last instruction is continued past the end of the file")
    return instructions


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex: ``**`` spans folders, ``*`` and ``?`` do not."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


class DockerIgnore:
    """Docker's .dockerignore rules: the last pattern matching a path or one of its parents wins."""

    def __init__(self, path: Path) -> None:
        self.rules: list[tuple[bool, str, re.Pattern[str]]] = []
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            negated = line.startswith("!")
            pattern = os.path.normpath(line.removeprefix("!").strip()).lstrip("/")
            self.rules.append((negated, pattern, _pattern_regex(pattern)))

    def excludes(self, rel: str) -> bool:
        parts = rel.split("/")
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        excluded = False
        for negated, _, regex in self.rules:
            if any(regex.match(p) for p in prefixes):
                excluded = not negated
        return excluded

    def _may_reinclude_below(self, rel: str) -> bool:
        return any(
            negated and (pattern.startswith(rel + "/") or any(c in pattern for c in "*?["))
            for negated, pattern, _ in self.rules
        )

    def context(self, root: Path) -> list[str]:
        """Every file of the build context rooted at ``root``, as sorted relative paths."""
        files = []
        for folder, dirs, names in os.walk(root):
            rel_folder = os.path.relpath(folder, root)
            rel_folder = "" if rel_folder == "." else rel_folder + "/"
            dirs[:] = [
                d for d in dirs
                if not (self.excludes(rel_folder + d) and not self._may_reinclude_below(rel_folder + d))
            ]
            files += [rel_folder + n for n in names if not self.excludes(rel_folder + n)]
        return sorted(files)


@dataclass
class Replay:
    """What replaying a Dockerfile did: its base image, last USER, ENV and the COPY owners."""

    base: str = ""
    user: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    chowns: list[str] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)
    user_before_first_run: bool = False


def replay(
    dockerfile: Path, context: Path, root: Path, path_dirs: list[Path], env: dict[str, str]
) -> Replay:
    """Run ``dockerfile``'s steps with ``root`` standing for ``/`` and ``path_dirs`` first on PATH.

    A RUN whose command fails raises AssertionError with the command and its output.
    """
    ignore = DockerIgnore(context / ".dockerignore")
    included = set(ignore.context(context))
    result = Replay()
    workdir = root
    base_env = {k: v for k, v in os.environ.items()
                if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    base_env["PATH"] = os.pathsep.join([*map(str, path_dirs), base_env.get("PATH", "")])
    base_env.update(env)
    for ins in read_dockerfile(dockerfile):
        if ins.keyword == "FROM":
            result.base = ins.value
        elif ins.keyword == "ENV":
            for item in shlex.split(ins.value):
                key, _, value = item.partition("=")
                result.env[key] = value
        elif ins.keyword == "USER":
            result.user = ins.value
        elif ins.keyword == "WORKDIR":
            workdir = root / ins.value.lstrip("/") if ins.value.startswith("/") else workdir / ins.value
            workdir.mkdir(parents=True, exist_ok=True)
        elif ins.keyword == "COPY":
            _copy(ins, context, included, root, workdir, result)
        elif ins.keyword == "RUN":
            if not result.runs:
                result.user_before_first_run = result.user is not None
            result.runs.append(ins.value)
            _run(dockerfile, ins, workdir, {**base_env, **result.env})
        else:
            raise ValueError(f"{dockerfile}:{ins.line}: {ins.keyword} is not replayed here")
    return result


def _copy(ins: Instruction, context: Path, included: set[str], root: Path, workdir: Path,
          result: Replay) -> None:
    words = shlex.split(ins.value)
    flags = [w for w in words if w.startswith("--")]
    *sources, dest = [w for w in words if not w.startswith("--")]
    result.chowns += [f.removeprefix("--chown=") for f in flags if f.startswith("--chown=")]
    target = root / dest.lstrip("/") if dest.startswith("/") else workdir / dest
    into_folder = dest.endswith("/") or dest in (".", "./") or len(sources) > 1
    for source in sources:
        source = os.path.normpath(source)
        if source == ".":
            chosen = sorted(included)
            into_folder = True
        else:
            chosen = [f for f in included if f == source or f.startswith(source + "/")]
            if not chosen:
                raise AssertionError(f"COPY {source}: not in the build context (.dockerignore)")
        for rel in chosen:
            if source == ".":
                out = target / rel
            elif rel == source:  # a file: into the folder, or as the file named
                out = target / os.path.basename(rel) if into_folder else target
            else:  # a folder: its contents
                out = target / os.path.relpath(rel, source)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(context / rel, out)


def _run(dockerfile: Path, ins: Instruction, workdir: Path, env: dict[str, str]) -> None:
    done = subprocess.run(["/bin/sh", "-c", ins.value], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        output = (done.stdout + done.stderr)[-6000:]
        raise AssertionError(
            f"{dockerfile.name}:{ins.line}: RUN failed with status {done.returncode}\n"
            f"{ins.value}\n--- output (end) ---\n{output}"
        )


def unmet_requirements(installs: list[dict[str, Any]], environment: dict[str, str]) -> list[str]:
    """What ``pip check`` would report for a set resolved by ``pip install --report``.

    Like ``pip check``, every installed distribution's requirements must be installed at a
    version they accept; unlike it, the requirements of the extras asked for count too.
    """
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    versions = {canonicalize_name(i["metadata"]["name"]): Version(i["metadata"]["version"])
                for i in installs}
    requires = {canonicalize_name(i["metadata"]["name"]):
                [Requirement(r) for r in i["metadata"].get("requires_dist") or []]
                for i in installs}
    extras: dict[str, set[str]] = defaultdict(set)
    for i in installs:
        extras[canonicalize_name(i["metadata"]["name"])] |= set(i.get("requested_extras") or [])

    def active(name: str) -> list[Any]:
        return [r for r in requires[name] if r.marker is None or any(
            r.marker.evaluate({**environment, "extra": e}) for e in ["", *sorted(extras[name])])]

    changed = True
    while changed:  # extras asked for by dependencies (ray[data] asks for more extras of ray)
        changed = False
        for name in requires:
            for req in active(name):
                dep = canonicalize_name(req.name)
                if set(req.extras) - extras[dep]:
                    extras[dep] |= set(req.extras)
                    changed = True
    problems = []
    for name in sorted(requires):
        for req in active(name):
            dep = canonicalize_name(req.name)
            if dep not in versions:
                problems.append(f"{name} requires {req}, which is not installed")
            elif not req.specifier.contains(versions[dep], prereleases=True):
                problems.append(f"{name} requires {req}, but {dep} {versions[dep]} is installed")
    return problems

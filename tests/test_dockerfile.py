"""The Dockerfile, checked without a Docker engine: its two targets, what they copy, their
pins, their users, and that the operator's dependency set has no torch."""

from __future__ import annotations

import fnmatch
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

tomllib = pytest.importorskip("tomllib")  # Python 3.11+ (pyproject is read with it)

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# what must never be in the operator's image
TORCH_STACK = re.compile(r"^(torch|torchvision|triton|nvidia-.*|cuda-.*|datumaro|pycocotools)$")


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = (ROOT / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip())
        for line in joined.splitlines()
        if line.strip()
    ]


def _stages() -> dict[str, list[tuple[str, str]]]:
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for instruction, args in _instructions():
        if instruction == "FROM":
            current = stages.setdefault(args.split(" AS ")[-1].strip(), [])
        current.append((instruction, args))
    return stages


def _args(stage: list[tuple[str, str]]) -> dict[str, str]:
    return dict(a.split("=", 1) for i, a in stage if i == "ARG" and "=" in a)


def test_there_are_trainer_and_operator_targets():
    assert {"trainer", "operator"} <= _stages().keys()


@pytest.mark.parametrize(
    "target, command", [("trainer", "instseg"), ("operator", "instseg-operator")]
)
def test_final_stage_runs_our_command_as_a_numeric_non_root_user(target, command):
    stage = _stages()[target]
    assert ("ENTRYPOINT", f'["{command}"]') in stage
    assert command in PYPROJECT["project"]["scripts"]
    (user,) = [args for instruction, args in stage if instruction == "USER"]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0


@pytest.mark.parametrize("target", ["trainer", "operator"])
def test_final_stage_installs_nothing_and_copies_only_the_built_environment(target):
    """Compilers and package managers' work stay in the build stages."""
    stage = _stages()[target]
    runs = [args for instruction, args in stage if instruction == "RUN"]
    assert not any(re.search(r"\b(apt-get|apt|pip|gcc|make)\b", run) for run in runs), runs
    copies = [args for instruction, args in stage if instruction == "COPY"]
    assert copies and all(copy.startswith("--from=") for copy in copies)


def test_torch_pins_match_pyproject():
    pins = {
        Requirement(r).name: str(Requirement(r).specifier)
        for r in PYPROJECT["project"]["optional-dependencies"]["trainer"]
    }
    args = _args(_stages()["trainer-build"])
    assert f"=={args['TORCH_VERSION']}" == pins["torch"]
    assert f"=={args['TORCHVISION_VERSION']}" == pins["torchvision"]


def _context_sources() -> list[str]:
    """What the Dockerfile copies from the build context (not from another stage)."""
    sources = []
    for instruction, args in _instructions():
        if instruction in ("COPY", "ADD") and not args.startswith("--from="):
            parts = [p for p in args.split() if not p.startswith("--")]
            sources += parts[:-1]
    return sources


def _ignored(path: str, patterns: list[str]) -> bool:
    """.dockerignore semantics for the patterns used here (no `!` exceptions): a path is
    ignored when it, or a directory above it, matches a pattern."""
    parts = Path(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(
        fnmatch.fnmatch(prefix, pattern.removeprefix("**/"))
        or fnmatch.fnmatch(prefix.split("/")[-1], pattern.removeprefix("**/"))
        if pattern.startswith("**/")
        else fnmatch.fnmatch(prefix, pattern)
        for prefix in prefixes
        for pattern in patterns
    )


def test_copied_files_exist_and_are_not_docker_ignored():
    patterns = [
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert not any(p.startswith("!") for p in patterns), "_ignored() does not handle exceptions"
    sources = _context_sources()
    assert {"pyproject.toml", "trainer/", "operator/"} <= set(sources)
    for source in sources:
        assert (ROOT / source).exists(), f"Dockerfile copies {source}, which does not exist"
        assert not _ignored(source.rstrip("/"), patterns), f".dockerignore excludes {source}"
    # the readme pyproject.toml names is in the wheel's metadata, so the build needs it
    assert PYPROJECT["project"]["readme"] in sources


def _closure(distribution: str, extras: set[str]) -> set[str]:
    """Names of every installed distribution `distribution[extras]` depends on, transitively,
    with environment markers evaluated for this interpreter."""
    seen: set[str] = set()
    todo = [(distribution, frozenset(extras))]
    while todo:
        name, wanted = todo.pop()
        for text in metadata.requires(name) or []:
            requirement = Requirement(text)
            marker = requirement.marker
            if marker is not None and not any(
                marker.evaluate({**default_environment(), "extra": extra})
                for extra in wanted or {""}
            ):
                continue
            key = canonicalize_name(requirement.name)
            if key not in seen:
                seen.add(key)
                todo.append((requirement.name, frozenset(requirement.extras)))
    return seen


def test_operator_dependency_set_has_no_torch():
    operator = _closure("instseg", {"operator"})
    assert {"kopf", "kubernetes", "prometheus-client"} <= operator
    assert sorted(name for name in operator if TORCH_STACK.match(name)) == []
    # and the check can see torch where it is: in the trainer's set
    assert {"torch", "torchvision"} <= _closure("instseg", {"trainer"})


def test_operator_imports_without_torch():
    """The operator image has no torch: its modules must not import it, even indirectly."""
    code = (
        "import sys; sys.modules['torch'] = sys.modules['torchvision'] = None; "
        "import instseg_operator.__main__, instseg_operator.handlers"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr

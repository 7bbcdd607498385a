"""The project's own checks, run by the test command: ruff (lint and format)
and mypy in strict mode over the package."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@pytest.mark.parametrize(
    "command",
    [
        ["ruff", "check", "relay", "tests", "bench", "fuzz"],
        ["ruff", "format", "--check", "relay", "tests", "bench", "fuzz"],
        ["mypy"],
    ],
    ids=["ruff-check", "ruff-format", "mypy-strict"],
)
def test_static_check(command: list[str]) -> None:
    proc = subprocess.run(
        [str(BIN / command[0]), *command[1:]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_tasks_are_created_only_by_the_task_set() -> None:
    """A task nothing holds can be collected mid-run: every task goes through
    relay.tasks.TaskSet. ruff's banned-api (TID251) sees ``asyncio.create_task``
    but not ``loop.create_task``; this check sees both (and TaskGroup's, which
    holds its tasks, is allowed)."""
    import ast

    offenders = []
    for path in sorted((ROOT / "relay").rglob("*.py")):
        if path.name == "tasks.py" and path.parent.name == "relay":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("create_task", "ensure_future")
                and not (isinstance(node.func.value, ast.Name) and node.func.value.id == "group")
            ):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


MAX_MODULE_LINES = 500
MAX_CLASS_LINES = 250


def test_modules_and_classes_stay_within_their_budgets() -> None:
    """One job per part: no module in relay/ over 500 lines, no class over 250."""
    import ast

    over = []
    for path in sorted((ROOT / "relay").rglob("*.py")):
        source = path.read_text()
        lines = len(source.splitlines())
        if lines > MAX_MODULE_LINES:
            over.append(f"{path.relative_to(ROOT)}: {lines} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ClassDef):
                size = (node.end_lineno or node.lineno) - node.lineno + 1
                if size > MAX_CLASS_LINES:
                    over.append(f"{path.relative_to(ROOT)}: class {node.name} {size} lines")
    assert over == []

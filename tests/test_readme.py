"""The README's Python examples run as written, in order, in one namespace (as a reader
would paste them)."""

from __future__ import annotations

import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_examples() -> None:
    assert len(_blocks()) >= 2


def test_readme_python_examples_run() -> None:
    ns: dict = {}
    for i, code in enumerate(_blocks()):
        exec(compile(code, f"README.md python block {i + 1}", "exec"), ns)  # noqa: S102
    # The simulation block ends with a consistent state.
    ns["sim"].check()

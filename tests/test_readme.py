"""Every ```python block of README.md runs as written, each in a fresh interpreter.

A block runs with the repository on PYTHONPATH, in a temporary working directory (so the `runs/`
folders the examples write stay out of the checkout), on the CPU with 8 simulated devices. A
block that fails only because an optional extra is missing is skipped, naming the extra.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)
MISSING_EXTRA = re.compile(r"ImportError: (.*pip install 'jaxlab\[(\w+)\]')")
TIMEOUT_S = 120


def python_blocks() -> list[tuple[int, str]]:
    """(first line of the code in README.md, code) of every ```python block."""
    text = README.read_text(encoding="utf-8")
    return [(text.count("\n", 0, match.start(1)) + 1, match.group(1))
            for match in BLOCK.finditer(text)]


BLOCKS = python_blocks()


def test_readme_has_examples():
    assert len(BLOCKS) >= 5, f"expected an example per part in {README}, found {len(BLOCKS)}"


@pytest.mark.parametrize(("line", "code"), BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_readme_block_runs(line: int, code: str, tmp_path: pathlib.Path):
    script = tmp_path / "example.py"
    script.write_text(code, encoding="utf-8")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["JAX_PLATFORMS"] = "cpu"
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    if done.returncode != 0:
        missing = MISSING_EXTRA.search(done.stderr)
        if missing:
            pytest.skip(f"README.md:{line} needs the {missing[2]} extra ({missing[1]})")
        pytest.fail(f"the example at README.md:{line} failed (exit {done.returncode}):\n"
                    f"{done.stderr[-4000:]}", pytrace=False)

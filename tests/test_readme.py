"""Every ```python block of README.md runs as written, each in a fresh interpreter, and prints what
its `# ->` comments say.

A block runs with the repository on PYTHONPATH, in a temporary working directory (so the `runs/`
folders the examples write stay out of the checkout), on the CPU with 8 simulated devices. A
block that fails only because an optional extra is missing is skipped, naming the extra.

Expected output: a one-line `print(...)` call whose line ends in a comment `# -> TEXT` must print
exactly TEXT, one line (trailing whitespace aside); TEXT ending in `...` is a prefix (`# -> 0.64...`
accepts 0.6435). The check is per source line: what each print call of the block writes is
recorded with the line it was called from, so prints without `# ->` (multi-line arrays, timings)
may sit anywhere. A `# ->` comment on a line without a print call is an error. Other trailing
comments (`# [16, 16]`, `# NumPy arrays [4]`) are prose and not checked.
"""

from __future__ import annotations

import ast
import io
import json
import os
import pathlib
import re
import subprocess
import sys
import tokenize

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)
MISSING_EXTRA = re.compile(r"ImportError: (.*pip install 'jaxlab\[(\w+)\]')")
TIMEOUT_S = 120
EXPECT = "# ->"

# Runs a script (argv[1]) as __main__ with `print` recording, per call made from the script
# itself to stdout, [line, text printed]; writes the records to argv[2] as JSON when it ends.
RECORDER = """\
import builtins, io, json, runpy, sys

script, record = sys.argv[1], sys.argv[2]
printed, print_ = [], builtins.print


def recording_print(*args, sep=" ", end="\\n", file=None, flush=False):
    caller = sys._getframe(1)
    if file is None and caller.f_code.co_filename == script:
        text = io.StringIO()
        print_(*args, sep=sep, end=end, file=text)
        printed.append([caller.f_lineno, text.getvalue()])
    print_(*args, sep=sep, end=end, file=file, flush=flush)


builtins.print = recording_print
sys.argv = [script]
try:
    runpy.run_path(script, run_name="__main__")
finally:
    with open(record, "w", encoding="utf-8") as f:
        json.dump(printed, f)
"""


def python_blocks() -> list[tuple[int, str]]:
    """(first line of the code in README.md, code) of every ```python block."""
    text = README.read_text(encoding="utf-8")
    return [(text.count("\n", 0, match.start(1)) + 1, match.group(1))
            for match in BLOCK.finditer(text)]


def expected_prints(code: str, first_line: int = 1) -> dict[int, str]:
    """{line of the code (1-based): expected text} of its `# -> TEXT` comments. ValueError,
    naming the line as `first_line + line - 1`, for a `# ->` comment on a line without a
    one-line print call."""
    prints = {node.lineno for node in ast.walk(ast.parse(code))
              if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id == "print" and node.lineno == node.end_lineno}
    expected = {}
    for token in tokenize.generate_tokens(io.StringIO(code).readline):
        if token.type == tokenize.COMMENT and token.string.startswith(EXPECT):
            line = token.start[0]
            if line not in prints:
                raise ValueError(f"line {first_line + line - 1}: a `{EXPECT}` comment belongs "
                                 "on a line with a one-line print(...) call")
            expected[line] = token.string[len(EXPECT):].strip()
    return expected


def mismatches(expected: dict[int, str], printed: list[tuple[int, str]],
               first_line: int = 1) -> list[str]:
    """A message per expected print that printed something else, or nothing, or more than one
    line; lines reported as `first_line + line - 1`."""
    problems = []
    for line, want in sorted(expected.items()):
        got = "".join(text for at, text in printed if at == line)
        where = f"line {first_line + line - 1}"
        if not got:
            problems.append(f"{where}: printed nothing, expected {want!r}")
            continue
        lines = got.rstrip("\n").split("\n")
        text = lines[0].rstrip()
        prefix = want.endswith("...")
        ok = len(lines) == 1 and (text.startswith(want[:-3]) if prefix else text == want)
        if not ok:
            problems.append(f"{where}: printed {got.rstrip(chr(10))!r}, expected {want!r}"
                            + (" (a prefix)" if prefix else ""))
    return problems


def run_block(code: str, folder: pathlib.Path) -> tuple[subprocess.CompletedProcess,
                                                       list[tuple[int, str]]]:
    """Runs `code` as a script in `folder` (fresh interpreter, repository importable, CPU):
    (the finished process, [(line, text)] of every print call the script made)."""
    script, record = folder / "example.py", folder / "printed.json"
    script.write_text(code, encoding="utf-8")
    (folder / "record_prints.py").write_text(RECORDER, encoding="utf-8")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["JAX_PLATFORMS"] = "cpu"
    done = subprocess.run([sys.executable, str(folder / "record_prints.py"), str(script),
                           str(record)], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    printed = ([(line, text) for line, text in json.loads(record.read_text(encoding="utf-8"))]
               if record.exists() else [])
    return done, printed


BLOCKS = python_blocks()


def test_readme_has_examples():
    assert len(BLOCKS) >= 5, f"expected an example per part in {README}, found {len(BLOCKS)}"


@pytest.mark.parametrize(("line", "code"), BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_readme_block_runs(line: int, code: str, tmp_path: pathlib.Path):
    try:
        expected = expected_prints(code, line)
    except ValueError as e:
        pytest.fail(f"README.md, {e}", pytrace=False)
    done, printed = run_block(code, tmp_path)
    if done.returncode != 0:
        missing = MISSING_EXTRA.search(done.stderr)
        if missing:
            pytest.skip(f"README.md:{line} needs the {missing[2]} extra ({missing[1]})")
        pytest.fail(f"the example at README.md:{line} failed (exit {done.returncode}):\n"
                    f"{done.stderr[-4000:]}", pytrace=False)
    problems = mismatches(expected, printed, line)
    if problems:
        pytest.fail(f"the example at README.md:{line} printed what its `{EXPECT}` comments do "
                    "not say:\n" + "\n".join(f"README.md {p}" for p in problems), pytrace=False)


# The convention itself, on a synthetic block (plain Python: no JAX, well under a second).
SYNTHETIC = """\
x = 6 * 7
print(x)                          # -> 42
print("a", "b", sep="-")          # -> a-b
print([0.5, 1 / 3])               # -> [0.5, 0.33...
print([[1, 2], [3, 4]])           # a shape comment, not checked
for name in ("loop", "prints"):
    print(name)
print("unchecked\\nmulti-line")
def show(value):
    print(value)                  # -> 1
show(1)
"""


def test_expected_prints_reads_only_arrow_comments_on_print_lines():
    assert expected_prints(SYNTHETIC) == {2: "42", 3: "a-b", 4: "[0.5, 0.33...", 10: "1"}
    with pytest.raises(ValueError, match="line 12: a `# ->` comment"):
        expected_prints("x = 1\nprint(x)\ny = x  # -> 1\n", first_line=10)
    with pytest.raises(ValueError, match="line 3"):   # a print over two lines
        expected_prints("x = 1\nprint(x,\n      x)  # -> 1 1\n")
    assert expected_prints('s = "# -> not a comment"\nprint(s)\n') == {}


def test_printed_lines_are_compared_per_source_line(tmp_path):
    done, printed = run_block(SYNTHETIC, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["42", "a-b", "[0.5, 0.3333333333333333]",
                                        "[[1, 2], [3, 4]]", "loop", "prints", "unchecked",
                                        "multi-line", "1"]  # the recorder leaves stdout as is
    assert printed == [(2, "42\n"), (3, "a-b\n"), (4, "[0.5, 0.3333333333333333]\n"),
                       (5, "[[1, 2], [3, 4]]\n"), (7, "loop\n"), (7, "prints\n"),
                       (8, "unchecked\nmulti-line\n"), (10, "1\n")]
    assert mismatches(expected_prints(SYNTHETIC), printed) == []
    assert mismatches({2: "41"}, printed, first_line=20) == [
        "line 21: printed '42', expected '41'"]
    assert mismatches({4: "[0.5, 0.34..."}, printed) == [
        "line 4: printed '[0.5, 0.3333333333333333]', expected '[0.5, 0.34...' (a prefix)"]
    assert mismatches({4: "[0.5, 0.33"}, printed) != []        # without `...`: the whole line
    assert mismatches({7: "loop"}, printed) != []              # two lines printed
    assert mismatches({8: "unchecked"}, printed) != []         # a multi-line print
    assert mismatches({11: "1"}, printed) == [                 # the print's line counts
        "line 11: printed nothing, expected '1'"]


def test_a_failing_block_still_reports_its_prints(tmp_path):
    done, printed = run_block('print("before")\nraise SystemExit(3)\n', tmp_path)
    assert done.returncode == 3 and printed == [(1, "before\n")]

"""Mutation check of changed code: do the tests notice when a changed line is broken?

For every line of ``src/detrkit`` changed since a git ref (``--base``, default ``main~1``; the
Makefile passes ``BASE``), this makes small faults one at a time -- a comparison flipped, ``and``
for ``or``, a constant changed, a ``+`` for a ``-``, a ``not`` dropped, a statement removed --
runs the test files that exercise the mutated module, and lists each fault that no test caught
(a "survivor") as ``file:line``. A survivor is a line whose behaviour no test pins down.
The mutants are made in a copy of the checkout (the files git knows), never in the checkout itself.

    make mutate BASE=main~5
    python scripts/mutate.py --base v0.1.0 --max-mutants 80 --tests tests/test_training.py

The tests for a module are the test files that import it or name one of its public definitions
(``--tests`` overrides); with ``--confirm`` a mutant they miss is run against the whole suite
before it is listed. Each run stops at the first failure (``-x``) and is cut after
``--timeout`` seconds (listed apart: a fault may hang the tests, or the tests may just be slow).
Not part of CI: it runs the tests once per mutant.
"""

from __future__ import annotations

import argparse
import ast
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "detrkit"
ALL_TESTS = sorted((ROOT / "tests").glob("test_*.py"))

# (name, pattern, replacement): each applied to one occurrence at a time.
OPERATORS = [
    ("== -> !=", r"==", "!="),
    ("!= -> ==", r"!=", "=="),
    ("<= -> <", r"<=", "<"),
    (">= -> >", r">=", ">"),
    ("< -> <=", r"(?<![<>=!])<(?![<=])", "<="),
    ("> -> >=", r"(?<![<>=!-])>(?![>=])", ">="),
    ("and -> or", r"\band\b", "or"),
    ("or -> and", r"\bor\b", "and"),
    ("not x -> x", r"\bnot\s+", ""),
    ("True -> False", r"\bTrue\b", "False"),
    ("False -> True", r"\bFalse\b", "True"),
    ("+ -> -", r"(?<=\s)\+(?=\s)", "-"),
    ("- -> +", r"(?<=\s)-(?=\s)", "+"),
    ("* -> /", r"(?<=\s)\*(?=\s)", "/"),
    ("is None -> is not None", r"\bis None\b", "is not None"),
    ("is not None -> is None", r"\bis not None\b", "is None"),
    ("in -> not in", r"(?<!not )\bin\b(?= )", "not in"),
    ("0 -> 1", r"(?<![\w.])0(?![\w.])", "1"),
    ("1 -> 0", r"(?<![\w.])1(?![\w.])", "0"),
    ("number + 1", r"(?<![\w.])([2-9]|[1-9]\d+)(?![\w.])", None),
]


@dataclass
class Mutant:
    path: Path
    line: int
    what: str
    text: str  # the mutated line


def changed_lines(base: str) -> dict[Path, set[int]]:
    """Lines of src/detrkit added or changed since ``base``, per file."""
    diff = subprocess.run(
        ["git", "diff", "-U0", base, "--", "src/detrkit"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    out: dict[Path, set[int]] = {}
    current = None
    for line in diff.splitlines():
        if line.startswith("+++ "):
            name = line[4:].removeprefix("b/")
            current = ROOT / name if name.endswith(".py") else None
        elif line.startswith("@@") and current is not None:
            match = re.search(r"\+(\d+)(?:,(\d+))?", line)
            start, count = int(match.group(1)), int(match.group(2) or 1)
            out.setdefault(current, set()).update(range(start, start + count))
    return {p: lines for p, lines in out.items() if lines and p.exists()}


def code_lines(source: str) -> set[int]:
    """Lines that hold code (not docstrings, comments, or blank)."""
    tree = ast.parse(source)
    docstrings = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            value = body[0].value
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                docstrings.update(range(body[0].lineno, body[0].end_lineno + 1))
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.stmt) and not isinstance(node, (ast.Import, ast.ImportFrom)):
            lines.add(node.lineno)
        if isinstance(node, ast.expr):
            lines.update(range(node.lineno, node.end_lineno + 1))
    return lines - docstrings


def statement_starts(source: str) -> set[int]:
    """Lines where a simple statement (removable without breaking the syntax) starts and ends."""
    starts = set()
    for node in ast.walk(ast.parse(source)):
        simple = (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Expr, ast.Raise, ast.Return, ast.Assert)
        docstring = isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
        if isinstance(node, simple) and node.lineno == node.end_lineno and not docstring:
            starts.add(node.lineno)
    return starts


def mutants_of(path: Path, lines: set[int]) -> list[Mutant]:
    source = path.read_text()
    text = source.splitlines()
    candidates = sorted(lines & code_lines(source))
    removable = statement_starts(source)
    found = []
    for number in candidates:
        line = text[number - 1]
        code, _, _ = line.partition("  #")
        if code.lstrip().startswith(("def ", "class ", "@", "import ", "from ")):
            continue
        for what, pattern, replacement in OPERATORS:
            for match in re.finditer(pattern, code):
                if _inside_string(code, match.start()):
                    continue
                new = str(int(match.group(0)) + 1) if replacement is None else replacement
                found.append(Mutant(path, number, what, code[: match.start()] + new + code[match.end() :]))
        if number in removable:
            indent = code[: len(code) - len(code.lstrip())]
            stripped = code.strip()
            replacement = f"{indent}pass" if not stripped.startswith("return") else f"{indent}return None"
            if stripped not in ("pass", "return None", "return"):
                found.append(Mutant(path, number, "statement removed", replacement))
    return [m for m in found if _compiles(source, m)]


def _inside_string(code: str, position: int) -> bool:
    quotes = re.findall(r"(?<!\\)[\"']", code[:position])
    return len(quotes) % 2 == 1


def _compiles(source: str, mutant: Mutant) -> bool:
    lines = source.splitlines()
    lines[mutant.line - 1] = mutant.text
    try:
        compile("\n".join(lines), str(mutant.path), "exec")
    except SyntaxError:
        return False
    return True


def tests_for(path: Path) -> list[Path]:
    """Test files that import ``path``'s module or name one of its public definitions."""
    module = ".".join(path.relative_to(ROOT / "src").with_suffix("").parts)
    tree = ast.parse(path.read_text())
    names = {
        node.name
        for node in tree.body
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_")
    }
    texts = {test: test.read_text() for test in ALL_TESTS}
    # Narrowest first: the files that import the module, else those that name what it defines,
    # else (a leaf no test names directly, exercised through the others) the whole suite.
    # A test file named after the module (test_hub_repo.py for hub.py) may drive it only through
    # the command line or another module: it belongs to the selection too.
    named = [test for test in texts if path.stem in test.stem.split("_")[1:]]
    importing = [test for test, text in texts.items() if module in text]
    if importing:
        return sorted(set(importing) | set(named))
    naming = [t for t, text in texts.items() if any(re.search(rf"\b{re.escape(n)}\b", text) for n in names)]
    return naming or ALL_TESTS


def copy_checkout(into: Path) -> Path:
    """The files git knows (committed or not; ignored ones left out), copied under ``into``."""
    names = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, names):
        source = ROOT / name
        if source.is_file():
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, into / name)
    return into


def run_tests(copy: Path, tests: list[Path], timeout: float) -> tuple[bool | None, float]:
    """Whether the tests pass in ``copy`` (the mutant survives; None: they ran out of time), and
    the seconds taken. The copy's ``src`` comes first on the path, before any installed detrkit."""
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *map(str, tests)]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(copy / "src"), os.environ.get("PYTHONPATH")])),
    }
    try:
        result = subprocess.run(cmd, cwd=copy, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return None, time.perf_counter() - start
    return result.returncode == 0, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="main~1", help="git ref: mutate the lines changed since it")
    parser.add_argument("--max-mutants", type=int, default=60, help="a random sample of at most this many")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample")
    parser.add_argument("--tests", nargs="*", help="test files to run (default: those of each module)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per test run")
    parser.add_argument("--list", action="store_true", help="list the mutants, run nothing")
    parser.add_argument(
        "--paths",
        nargs="*",
        help="only these source files (globs relative to the checkout, e.g. 'src/detrkit/data/*.py')",
    )
    parser.add_argument(
        "--confirm",
        action="store_true",
        help="run a mutant its module's test files miss against the whole suite",
    )
    args = parser.parse_args(argv)
    # A plain `kill` ends the run like Ctrl-C: the temporary copy is removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))

    changed = changed_lines(args.base)
    if args.paths:
        wanted = {p.resolve() for pattern in args.paths for p in ROOT.glob(pattern)}
        changed = {path: lines for path, lines in changed.items() if path.resolve() in wanted}
    mutants = [m for path, lines in changed.items() for m in mutants_of(path, lines)]
    if len(mutants) > args.max_mutants:
        mutants = sorted(
            random.Random(args.seed).sample(mutants, args.max_mutants), key=lambda m: (str(m.path), m.line)
        )
    print(f"{len(mutants)} mutants of the lines changed since {args.base}")
    if args.list:
        for m in mutants:
            print(f"{m.path.relative_to(ROOT)}:{m.line}: {m.what}: {m.text.strip()}")
        return 0
    survivors, timed_out = [], []
    with tempfile.TemporaryDirectory(prefix="detrkit-mutate-") as tmp:
        copy = copy_checkout(Path(tmp))
        for i, m in enumerate(mutants, 1):
            tests = [ROOT / t for t in args.tests] if args.tests else tests_for(m.path)
            where = f"{m.path.relative_to(ROOT)}:{m.line}"
            if not tests:
                survivors.append((m, "no test file exercises this module"))
                print(f"[{i}/{len(mutants)}] SURVIVED {where}: {m.what} (no tests)")
                continue
            target = copy / m.path.relative_to(ROOT)
            original = target.read_text()
            lines = original.splitlines(keepends=True)
            ending = "\n" if lines[m.line - 1].endswith("\n") else ""
            lines[m.line - 1] = m.text + ending
            target.write_text("".join(lines))
            try:
                survived, seconds = run_tests(copy, [copy / t.relative_to(ROOT) for t in tests], args.timeout)
            finally:
                target.write_text(original)
            if survived and args.confirm and not args.tests and len(tests) < len(ALL_TESTS):
                # The module's own test files missed it: does any test of the suite catch it?
                target.write_text("".join(lines))
                try:
                    survived, more = run_tests(
                        copy, [copy / t.relative_to(ROOT) for t in ALL_TESTS], args.timeout
                    )
                finally:
                    target.write_text(original)
                seconds += more
                tests = ALL_TESTS
            status = {True: "SURVIVED", False: "caught", None: "TIMED OUT"}[survived]
            print(
                f"[{i}/{len(mutants)}] {status} {where}: {m.what}: {m.text.strip()} "
                f"({len(tests)} test files, {seconds:.0f}s)",
                flush=True,
            )
            if survived is None:
                timed_out.append(m)
            elif survived:
                survivors.append((m, ""))
    caught = len(mutants) - len(survivors) - len(timed_out)
    print(f"\n{caught} of {len(mutants)} mutants caught, {len(timed_out)} timed out; survivors:")
    for m, why in survivors:
        print(
            f"  {m.path.relative_to(ROOT)}:{m.line}: {m.what}: {m.text.strip()}"
            + (f" ({why})" if why else "")
        )
    return 1 if survivors else 0


if __name__ == "__main__":
    raise SystemExit(main())

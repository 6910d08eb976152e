"""Copies the compiled module's docstrings (the doc comments of src/bindings.rs) into
python/wandapp/_core.pyi, so that the documentation site, which reads the stub without importing
the core, shows them. The doc comments stay the one source; the stub's copies are generated.

    python tools/stub_docs.py           # rewrite the stub's docstrings (make stub)
    python tools/stub_docs.py --check   # exit 1 when the stub is out of date (tests/test_stub.py)
"""

from __future__ import annotations

import argparse
import ast
import os
import sys

STUB = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python", "wandapp", "_core.pyi")


def _docstring_lines(doc: str, indent: str) -> list[str]:
    if "\\" in doc or '"""' in doc or doc.strip().endswith('"'):
        raise SystemExit(f"a docstring stub_docs.py cannot quote as is (a backslash or a closing quote): {doc[:60]!r}")
    lines = doc.strip().splitlines()
    if len(lines) == 1:
        return [f'{indent}"""{lines[0]}"""']
    return [f'{indent}"""{lines[0]}', *(f"{indent}{line}" if line else "" for line in lines[1:]), f'{indent}"""']


def _documented(tree: ast.Module, runtime) -> list[tuple[ast.AST, str]]:
    """(definition, runtime docstring) of every stub function, class and method whose compiled
    counterpart has a docstring."""
    found = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_") and hasattr(runtime, node.name):
            obj = getattr(runtime, node.name)
            found.append((node, obj.__doc__))
            if isinstance(node, ast.ClassDef):
                for member in node.body:
                    if isinstance(member, ast.FunctionDef) and not member.name.startswith("__"):
                        found.append((member, getattr(getattr(obj, member.name, None), "__doc__", None)))
    return [(node, doc) for node, doc in found if doc and doc.strip()]


def with_docstrings(source: str, runtime) -> str:
    """``source`` (the stub) with each definition's docstring set to the compiled one's: an
    existing docstring is replaced, a ``...`` body becomes the docstring."""
    lines = source.splitlines()
    tree = ast.parse(source)
    for node, doc in sorted(_documented(tree, runtime), key=lambda pair: -pair[0].lineno):
        indent = " " * (node.col_offset + 4)
        first = node.body[0]
        has_doc = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str)
        if has_doc:
            lines[first.lineno - 1 : first.end_lineno] = _docstring_lines(doc, indent)
        elif isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and first.value.value is Ellipsis and first.lineno == node.body[-1].end_lineno:
            # `def f(...) -> T: ...` (or a class body of one `...`): the docstring replaces the `...`.
            line = lines[first.lineno - 1]
            head = line[: first.col_offset].rstrip()
            lines[first.lineno - 1 : first.end_lineno] = ([head] if head else []) + _docstring_lines(doc, indent)
        else:  # before the first statement, or before its decorators
            at = min([first.lineno] + [d.lineno for d in getattr(first, "decorator_list", [])])
            lines[at - 1 : at - 1] = _docstring_lines(doc, indent)
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only say whether the stub is up to date (exit 1 if not)")
    args = ap.parse_args()
    import wandapp._core as runtime

    source = open(STUB, encoding="utf-8").read()
    updated = with_docstrings(source, runtime)
    if args.check:
        if updated != source:
            sys.exit(f"{STUB} lacks the compiled module's docstrings or has stale ones: run `make stub`")
        return
    if updated != source:
        open(STUB, "w", encoding="utf-8").write(updated)
        print(f"updated {STUB}")


if __name__ == "__main__":
    main()

"""The model package stays readable: no function over ~80 lines unless its docstring says why it is long."""

from __future__ import annotations

import ast
from pathlib import Path

MODEL = Path(__file__).resolve().parents[2] / "src" / "sa2va_pipeline" / "model"
MAX_LINES = 80
REASON = "Long because"  # a function may be longer when its docstring starts a sentence with this


def test_no_long_function_in_model_without_a_reason():
    long = []
    for path in sorted(MODEL.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_LINES and REASON not in (ast.get_docstring(node) or ""):
                    long.append(f"{path.name}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, f"functions over {MAX_LINES} lines without a reason in their docstring: {long}"

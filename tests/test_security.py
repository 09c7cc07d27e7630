"""Security: no code path unpickles files, and the Hub remote code imports only what a Hub folder can rely on.

Both checks parse the source with `ast` (a call split over lines, or an aliased import, is still found) and are
run on deliberately bad snippets too, so that they are known to be able to fail.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from collections.abc import Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Calls that unpickle whatever the file holds (arbitrary code execution on load).
UNPICKLING_CALLS = {
    "pickle.load", "pickle.loads", "pickle.Unpickler", "_pickle.load", "_pickle.loads",
    "joblib.load", "dill.load", "dill.loads", "pandas.read_pickle",
}
REMOTE_CODE_DIRS = ("modeling", "processing")
# What a Hub folder's remote code may import besides the standard library (numpy comes with transformers).
REMOTE_CODE_PACKAGES = {"torch", "timm", "transformers", "PIL", "numpy"}


def python_files() -> list[Path]:
    """The repository's Python files: tracked and new ones, not ignored ones (virtual environments, builds)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", "*.py"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.split()
    return [REPO / name for name in listed if (REPO / name).is_file()]


def _dotted(node: ast.expr) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([node.id, *reversed(parts)])


def _call_names(tree: ast.AST) -> Iterable[tuple[ast.Call, str]]:
    """Each call with its full dotted name, import aliases resolved (`np.load` -> `numpy.load`)."""
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                aliases[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and (name := _dotted(node.func)):
            head, _, rest = name.partition(".")
            yield node, ".".join(filter(None, [aliases.get(head, head), rest]))


def _keyword_is_true(call: ast.Call, name: str) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is True for k in call.keywords)


def unpickling_calls(paths: Iterable[Path]) -> list[str]:
    """`path:line: name` for each call that can unpickle: pickle/joblib/dill loads, `torch.load` without
    `weights_only=True`, `numpy.load(allow_pickle=True)`; `pickle.loads(pickle.dumps(x))` reads nothing outside."""
    found = []
    for path in paths:
        names = dict(_call_names(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))))
        for call, name in sorted(names.items(), key=lambda item: item[0].lineno):
            round_trip = name == "pickle.loads" and call.args and names.get(call.args[0]) == "pickle.dumps"
            unsafe = (
                (name in UNPICKLING_CALLS and not round_trip)
                or (name == "torch.load" and not _keyword_is_true(call, "weights_only"))
                or (name == "numpy.load" and _keyword_is_true(call, "allow_pickle"))
            )
            if unsafe:
                found.append(f"{path}:{call.lineno}: {name}")
    return found


def disallowed_imports(paths: Iterable[Path]) -> list[str]:
    """`path:line: module` for every import in remote-code files other than the standard library, the allowed
    packages and relative imports of a sibling file (a Hub folder is flat)."""
    allowed = REMOTE_CODE_PACKAGES | set(sys.stdlib_module_names)
    found = []
    for path in paths:
        siblings = {p.stem for p in path.parent.glob("*.py")}
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names if alias.name.split(".")[0] not in allowed]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module] if node.module.split(".")[0] not in allowed else []
            elif isinstance(node, ast.ImportFrom):
                targets = [node.module] if node.module else [alias.name for alias in node.names]
                sibling = node.level == 1 and all(target in siblings for target in targets)
                names = [] if sibling else ["." * node.level + (node.module or "")]
            else:
                continue
            found += [(str(path), node.lineno, f"{path}:{node.lineno}: {name}") for name in names]
    return [entry for *_, entry in sorted(found)]


def test_no_file_is_unpickled_anywhere_in_the_repository():
    files = python_files()
    assert any(f.name == "modeling_deepseek_vl_hf.py" for f in files) and len(files) > 10
    assert unpickling_calls(files) == []


def test_remote_code_imports_only_what_a_hub_folder_has():
    files = [f for f in python_files() if f.parent.name in REMOTE_CODE_DIRS and f.parent.parent == REPO]
    assert {f.name for f in files} >= {"modeling_deepseek_vl_hf.py", "processing_deepseek_vl_hf.py"}
    assert disallowed_imports(files) == []


def write(path: Path, source: str) -> Path:
    path.write_text(textwrap.dedent(source), encoding="utf-8")
    return path


def test_the_pickle_check_finds_unsafe_loads(tmp_path):
    bad = write(tmp_path / "bad.py", """\
        import pickle
        import dill
        import numpy as np
        import torch as T
        from joblib import load as restore
        from pickle import loads
        pickle.load(open("a.pkl", "rb"))
        loads(b"")
        np.load("a.npy", allow_pickle=True)
        T.load("a.pt")
        T.load(
            "a.pt", weights_only=False,
        )
        restore("a.joblib")
        dill.loads(b"")
    """)
    good = write(tmp_path / "good.py", """\
        import pickle
        import numpy
        import torch
        torch.load("a.pt", map_location="cpu", weights_only=True)
        numpy.load("a.npy")
        numpy.load("a.npy", allow_pickle=False)
        pickle.loads(pickle.dumps({"round": "trip"}))
        pickle.dumps(1)
        text = "pickle.load(f) in a string is not a call"
    """)
    assert unpickling_calls([bad, good]) == [
        f"{bad}:{line}: {name}"
        for line, name in [
            (7, "pickle.load"), (8, "pickle.loads"), (9, "numpy.load"), (10, "torch.load"), (11, "torch.load"),
            (14, "joblib.load"), (15, "dill.loads"),
        ]
    ]


def test_the_import_check_finds_foreign_imports(tmp_path):
    folder = tmp_path / "modeling"
    folder.mkdir()
    write(folder / "sibling.py", "X = 1\n")
    bad = write(folder / "model.py", """\
        from __future__ import annotations
        import json, os.path
        import torch.nn
        from PIL import Image
        from .sibling import X
        from . import sibling
        import requests
        from safetensors import safe_open
        from ..package import helper
        from .missing import Y
        from .sibling.deeper import Z
        import deepseek_vl_hf.tokenizer
    """)
    assert disallowed_imports([bad]) == [
        f"{bad}:{line}: {name}"
        for line, name in [
            (7, "requests"), (8, "safetensors"), (9, "..package"), (10, ".missing"), (11, ".sibling.deeper"),
            (12, "deepseek_vl_hf.tokenizer"),
        ]
    ]

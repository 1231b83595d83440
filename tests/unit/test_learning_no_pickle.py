"""No pickle, joblib.load, or torch.load without weights_only=True anywhere in the package."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import allocsvc

pytestmark = pytest.mark.unit

PACKAGE = Path(allocsvc.__file__).resolve().parent
FORBIDDEN = (
    re.compile(r"\b(import\s+(c?pickle|dill|cloudpickle)|from\s+(c?pickle|dill|cloudpickle)\s)"),
    re.compile(r"\b(c?pickle|dill|cloudpickle)\.(loads?|Unpickler)\b"),
    re.compile(r"\bjoblib\.load\b"),
)
TORCH_LOAD = re.compile(r"\btorch\.load\s*\(")


def offences(text: str) -> list[str]:
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        if any(p.search(line) for p in FORBIDDEN):
            found.append(f"{number}: {line.strip()}")
    for match in TORCH_LOAD.finditer(text):
        # The call's argument text, up to its closing parenthesis (calls span a few lines).
        depth, end = 0, match.end()
        for end in range(match.end() - 1, len(text)):
            depth += {"(": 1, ")": -1}.get(text[end], 0)
            if depth == 0:
                break
        if not re.search(r"weights_only\s*=\s*True", text[match.end() : end]):
            found.append(
                f"{text.count(chr(10), 0, match.start()) + 1}: torch.load without weights_only=True"
            )
    return found


def test_the_check_catches_what_it_should() -> None:
    assert offences("import pickle")
    assert offences("x = pickle.loads(data)")
    assert offences("from joblib import dump\nm = joblib.load(p)")
    assert offences("state = torch.load(path)")
    assert offences("state = torch.load(\n    path, map_location='cpu'\n)")
    assert not offences("state = torch.load(\n    path, weights_only=True\n)")
    assert not offences("# pickles are not used here")


def test_package_has_no_unsafe_loading() -> None:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20 and (PACKAGE / "learning" / "embeddings.py") in files
    problems = [
        f"{path.relative_to(PACKAGE)}:{offence}"
        for path in files
        for offence in offences(path.read_text(encoding="utf-8"))
    ]
    assert not problems, "\n".join(problems)

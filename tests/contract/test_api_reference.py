"""docs/api.md is what /openapi.json says: regenerating it changes nothing."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

from tests.conftest import Api

ROOT = Path(__file__).resolve().parents[2]


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("generate_api_md", ROOT / "docs" / "generate_api_md.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_api_reference_matches_the_served_schema(api: Api) -> None:
    served = api.client.get("/openapi.json").json()
    expected = _generator().render(served)
    actual = (ROOT / "docs" / "api.md").read_text()
    assert actual == expected, "docs/api.md is out of date: run .venv/bin/python docs/generate_api_md.py"


def test_api_reference_covers_every_operation_and_code(api: Api) -> None:
    served = api.client.get("/openapi.json").json()
    text = (ROOT / "docs" / "api.md").read_text()
    for path, item in served["paths"].items():
        for method, op in item.items():
            assert f"### `{method.upper()} {path}`" in text
            assert f"`{op['operationId']}`" in text
    for code in served["x-problem-codes"]:
        assert f"| `{code}` |" in text


def test_readme_and_docs_name_only_files_that_exist() -> None:
    for doc in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        text = doc.read_text()
        assert not re.search(r"(?<![\w/])(API|DESIGN)\.md", text), f"{doc.name} names a file not in the repository"
        for target in re.findall(r"\]\(([\w./-]+)(?:#[^)]*)?\)", text):
            assert (doc.parent / target).exists(), f"{doc.name} links to {target}, which does not exist"

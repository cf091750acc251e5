from __future__ import annotations

from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"
FIXTURES = sorted((DATA / "loras").glob("*.safetensors"))


@pytest.fixture(params=FIXTURES, ids=[p.stem for p in FIXTURES])
def fixture_lora(request: pytest.FixtureRequest) -> Path:
    path: Path = request.param
    return path


@pytest.fixture
def falcon() -> Path:
    return DATA / "loras" / "smart_falcon_4_lokr.safetensors"


@pytest.fixture(autouse=True)
def _doctest_tmp_path(doctest_namespace: dict[str, object], tmp_path: Path) -> None:
    doctest_namespace["tmp_path"] = tmp_path

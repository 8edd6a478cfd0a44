"""Shared test fixtures."""
from __future__ import annotations

from pathlib import Path

import pytest

# The repository sits next to shared/ (…/main and …/shared), both in development and in a CI clone.
SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


@pytest.fixture(scope="session")
def shakespeare_path() -> Path:
    """tiny-shakespeare (1.1 MB of real English); the test is skipped where the file is absent."""
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} not found")
    return SHAKESPEARE


@pytest.fixture(scope="session")
def shakespeare_text(shakespeare_path: Path) -> str:
    return shakespeare_path.read_text(encoding="utf-8")

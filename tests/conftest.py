"""Shared pytest configuration: async tests run on asyncio through anyio's pytest plugin."""

import pytest

pytest_plugins = ("model_fixtures",)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"

"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest

from kvs.server.server import IO_MODELS
from tests import netutil


@pytest.fixture(params=IO_MODELS)
def io_model(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test once per server I/O model (servers started through ``tests.netutil``)."""
    monkeypatch.setattr(netutil, "IO_MODEL", request.param)
    return request.param

"""Fixtures shared by the test modules."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kvs.engine.kvstore import KvStore
from kvs.server.fd_limit import raise_open_file_limit
from kvs.server.server import IO_MODELS
from tests import netutil


@pytest.fixture(params=IO_MODELS)
def io_model(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test once per server I/O model (servers started through ``tests.netutil``)."""
    monkeypatch.setattr(netutil, "IO_MODEL", request.param)
    return request.param


@pytest.fixture
def stores() -> Iterator[Callable[..., KvStore]]:
    """``stores(path, **options)`` opens a KvStore that is closed at the end of the test
    (test modules that need other engines too define a ``stores`` of their own)."""
    opened: list[KvStore] = []

    def open_(path: Path, **options: Any) -> KvStore:
        store = KvStore.open(path, **options)
        opened.append(store)
        return store

    yield open_
    for store in opened:
        store.close()


def pytest_configure(config: pytest.Config) -> None:
    # Server tests hold both ends of 1,100 connections in this one process: raise a soft
    # open-file limit of 1024 (the usual default) as kvs-server does for itself.
    raise_open_file_limit(4096)

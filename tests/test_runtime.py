"""Tripwire: the suite must run on free-threaded CPython with the GIL really disabled.

Importing an extension module that does not declare free-threading support silently
re-enables the GIL (with only a RuntimeWarning). So this test imports kvs and every
third-party package the project uses, and only then asserts the GIL is still off.
"""

import importlib
import sys
import sysconfig

import pytest

# kvs itself, then every third-party package of the project (runtime, dev and bench).
PROJECT_IMPORTS = [
    "kvs", "kvs.server", "kvs.client", "kvs.cli.server", "kvs.cli.client", "kvs.engine.sqlite",
    "pytest", "pytest_timeout", "hypothesis", "rich", "numpy", "matplotlib", "redis", "diskcache",
    "bench.common", "bench.plots",
]


@pytest.mark.parametrize("module", PROJECT_IMPORTS)
def test_module_imports(module: str) -> None:
    importlib.import_module(module)


def test_gil_stays_disabled_after_importing_everything() -> None:
    for module in PROJECT_IMPORTS:
        importlib.import_module(module)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # pulls in the compiled backends

    assert sysconfig.get_config_var("Py_GIL_DISABLED") == 1, "not a free-threaded build"
    assert sys._is_gil_enabled() is False, "an imported extension re-enabled the GIL"


def test_interpreter_is_313_or_newer() -> None:
    assert sys.version_info >= (3, 13)


def test_hot_shared_dict_reads_never_use_dict_get() -> None:
    """On 3.13t dict.get locks the dict (Argument Clinic's @critical_section), while d[key]
    is lock-free; every pool thread runs these functions on the same dicts, so a .get there
    brings back lock contention (docs/free-threading.md, section 2b)."""
    from kvs import resp
    from kvs.engine.kvstore import KvStore
    from kvs.server import resp_commands
    from kvs.server.connection import Connection
    from kvs.server.resp_session import RespSession
    from kvs.server.server import KvsServer

    hot = [KvStore.get, KvStore._get_slow, KvStore._read_current, KvStore.__contains__,
           resp._split_commands, resp._parse_commands, resp._strict_int,
           resp.RespDecoder.parse_single, KvsServer._poll_connections, KvsServer._io_loop,
           Connection.claim, Connection.release, Connection._serve_turn, RespSession.handle,
           RespSession.execute, resp_commands.set_value]
    # (KvsSession.execute and resp_commands.get_value call the engine's get, a method of
    # their own name: this name-based check cannot tell it from dict.get.)
    for fn in hot:
        assert "get" not in fn.__code__.co_names, f"{fn.__qualname__} calls .get"

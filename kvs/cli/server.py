"""kvs-server: serve a data directory over the network.

    kvs-server [--addr IP:PORT] [--engine kvs|sqlite] [--pool NAME] [--threads N]
               [--io MODEL] [--scheduling batch|normal] [--data-dir DIR]
               [--fsync never|always|interval] [limits...] [-V]

Every failure to start (bad flag, wrong engine for the directory, port in use, unwritable
directory) is one line on stderr and a non-zero exit, never a traceback. SIGTERM and SIGINT
shut the server down gracefully (requests in flight answered, data flushed), exit status 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from kvs import __version__
from kvs.address import DEFAULT_ADDRESS, parse_address
from kvs.engine import ENGINES, FSYNC_POLICIES, detect_engine, open_engine
from kvs.errors import KvsError
from kvs.limits import DEFAULT_MAX_KEY_BYTES, DEFAULT_MAX_VALUE_BYTES
from kvs.server import KvsServer
from kvs.server.fd_limit import RESERVED_DESCRIPTORS, raise_open_file_limit
from kvs.server.scheduling import SCHEDULING
from kvs.server.server import IO_MODELS, PROTOCOLS
from kvs.thread_pool import POOLS, make_pool

log = logging.getLogger("kvs.server")


def _address(text: str) -> tuple[str, int]:
    try:
        return parse_address(text)
    except KvsError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def _protocols(text: str) -> tuple[str, ...]:
    names = tuple(p.strip() for p in text.split(",") if p.strip())
    bad = [p for p in names if p not in PROTOCOLS]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown protocol {', '.join(bad) or '(none)'}; choose from {','.join(PROTOCOLS)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvs-server", description="Serve a kvs data directory.")
    p.add_argument("-V", "--version", action="version", version=f"kvs-server {__version__}")
    p.add_argument("--addr", type=_address, default=DEFAULT_ADDRESS, metavar="IP:PORT",
                   help=f"address to listen on (default {DEFAULT_ADDRESS})")
    p.add_argument("--engine", choices=sorted(ENGINES),
                   help="storage engine (default: the one the data directory holds, else kvs)")
    p.add_argument("--pool", choices=list(POOLS), default="shared-queue", help="thread pool (default shared-queue)")
    p.add_argument("--threads", type=_positive_int, default=os.cpu_count() or 1, metavar="N",
                   help="pool threads (default: CPU count)")
    p.add_argument("--io", choices=IO_MODELS, default=IO_MODELS[0],
                   help="leader-followers: the pool threads wait for ready connections themselves; "
                        "dispatch: an I/O thread hands ready connections to the pool "
                        f"(default {IO_MODELS[0]})")
    p.add_argument("--scheduling", choices=SCHEDULING, default=SCHEDULING[0],
                   help="batch: the threads serving connections run under SCHED_BATCH (Linux), "
                        "so a woken one does not preempt a running client and finds several "
                        "requests ready; normal: leave them as they are (default batch)")
    p.add_argument("--data-dir", type=Path, default=Path.cwd(), metavar="DIR",
                   help="data directory (default: the current directory)")
    p.add_argument("--fsync", choices=FSYNC_POLICIES, default="never",
                   help="never: writes reach the OS before they are acknowledged (survive a crash "
                        "of the server); always: fsync before acknowledging; interval: fsync every second")
    p.add_argument("--protocols", type=_protocols, default=PROTOCOLS, metavar="LIST",
                   help=f"comma-separated protocols to serve (default {','.join(PROTOCOLS)})")
    p.add_argument("--max-connections", type=_positive_int, default=10000, metavar="N")
    p.add_argument("--max-key-bytes", type=_positive_int, default=DEFAULT_MAX_KEY_BYTES, metavar="N")
    p.add_argument("--max-value-bytes", type=_positive_int, default=DEFAULT_MAX_VALUE_BYTES, metavar="N")
    p.add_argument("--frame-timeout", type=_positive_float, default=30.0, metavar="SECONDS",
                   help="close a connection that leaves a request half-sent this long")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine = pool = server = None
    try:
        if args.data_dir.exists() and not args.data_dir.is_dir():
            raise KvsError(f"data directory {args.data_dir} is not a directory")
        found = detect_engine(args.data_dir) if args.data_dir.is_dir() else None
        name = args.engine or found or "kvs"
        if found is not None and found != name:
            raise KvsError(f"data directory {args.data_dir} was created by engine '{found}', "
                           f"cannot open it with engine '{name}'")
        engine = open_engine(name, args.data_dir, fsync=args.fsync, max_key_bytes=args.max_key_bytes,
                             max_value_bytes=args.max_value_bytes)
        pool = make_pool(args.pool, args.threads)
        server = KvsServer(engine, pool, args.addr, max_connections=args.max_connections,
                           max_key_bytes=args.max_key_bytes, max_value_bytes=args.max_value_bytes,
                           frame_timeout=args.frame_timeout, protocols=args.protocols, io_model=args.io,
                           scheduling=args.scheduling)
    except (KvsError, ValueError, OSError) as exc:
        print(f"kvs-server: error: {exc}", file=sys.stderr)
        if pool is not None:
            pool.shutdown()
        if engine is not None:
            engine.close()
        return 1

    def stop(signum: int, _frame: object) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        server.shutdown()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    host, port = server.address
    log.info("kvs-server %s: engine %s, pool %s, %d threads, I/O model %s, scheduling %s, data directory %s, "
             "protocols %s", __version__, name, args.pool, args.threads, args.io, args.scheduling,
             args.data_dir.resolve(), ",".join(args.protocols))
    log.info("listening on %s:%d", host, port)
    # After the start can no longer fail: a failed start prints one error line and nothing else.
    raise_open_file_limit(args.max_connections + RESERVED_DESCRIPTORS)
    status = 0
    try:
        server.serve_forever()
    except Exception:
        log.exception("the server failed")
        status = 1
    finally:
        server.close()
        pool.shutdown(wait=True)
        try:
            engine.close()
        except KvsError as exc:
            log.error("closing the engine failed: %s", exc)
            status = 1
    log.info("stopped")
    return status


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    run()

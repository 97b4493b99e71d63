"""The kvs benchmark suites. Run them with ``scripts/bench``; see ``bench/README.md``."""

"""Command-line programs: ``kvs-server`` and ``kvs-client``."""

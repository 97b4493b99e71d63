"""The process's open-file limit (``RLIMIT_NOFILE``), raised to fit the connections a server
is configured for.

Every connection holds a descriptor, and so does every segment file of a ``KvStore``. Linux
starts processes with a soft limit of 1024 while the hard limit is usually far higher: like
Redis (``maxclients``) and the Go runtime, ``kvs-server`` raises its soft limit at start,
never past the hard limit, and says so when even the hard limit is too low. This is a
process-wide decision, so the library's ``KvsServer`` leaves it to its caller."""

from __future__ import annotations

import logging
import resource

log = logging.getLogger(__name__)

#: Descriptors a server needs besides its connections: listener, epoll, eventfd, the
#: engine's segment files, log files.
RESERVED_DESCRIPTORS = 64


def raise_open_file_limit(wanted: int) -> int:
    """Raise the soft ``RLIMIT_NOFILE`` to ``wanted`` when it is lower, capped by the hard
    limit. The soft limit in force afterwards; never lowers it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return soft
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, exc)
            return soft
        log.debug("open-file limit raised from %d to %d", soft, target)
        soft = target
    if soft < wanted:
        log.warning("the open-file limit is %d (hard limit %s), below the %d this configuration "
                    "needs: connections past about %d will fail to be accepted",
                    soft, hard, wanted, max(soft - RESERVED_DESCRIPTORS, 0))
    return soft

"""``python -m tests.integration.agent_with_fault agent``: the real agent, except
that reading its spool fails as a broken disk would (EIO), which ends its publish
task."""

import errno
import os

from edge_agent.spool import Spool
from ktel.cli import main


def broken_read(self, cursor, limit=64):
    raise OSError(errno.EIO, os.strerror(errno.EIO), str(self.dir))


Spool.read = broken_read  # type: ignore[method-assign]
main()

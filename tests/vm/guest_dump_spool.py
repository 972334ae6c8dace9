"""Run in the guest (chrooted in the host's root): print every event of an agent's
spool as a JSON line, for tests/vm/test_kmod_vm.py to judge.

Usage: python -m tests.vm.guest_dump_spool SPOOL_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from edge_agent.spool import Spool
from ktel.wire import decode_batch, event_dict


def main(directory: str) -> None:
    spool = Spool(Path(directory))
    cursor = spool.ack_cursor
    while records := spool.read(cursor):
        for rec in records:
            batch = decode_batch(rec.payload)
            for ev in batch.events:
                row = {"host.id": batch.host_id, "batch.seq": batch.seq, **event_dict(ev)}
                print(json.dumps(row, default=lambda b: b.hex()))
            cursor = rec.next
    spool.close()


if __name__ == "__main__":
    main(sys.argv[1])

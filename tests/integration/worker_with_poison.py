"""``python -m tests.integration.worker_with_poison process <stage>``: the real worker,
except that its stages raise on every batch of the host ``host-poison``, as a stage
bug that one record's content triggers would."""

from ktel.cli import main
from processors.chain import Chain

on_batch = Chain.on_batch


def poisoned(self, value, batch, now_ms):
    if batch.host_id == "host-poison":
        raise ValueError("poisoned")
    return on_batch(self, value, batch, now_ms)


Chain.on_batch = poisoned  # type: ignore[method-assign]
main()

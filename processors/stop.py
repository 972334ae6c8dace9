"""How a processing worker ends on a record it cannot process: at once, exit status 1,
with one log line, before Faust acknowledges the record.

Faust acknowledges a record when the agent's loop leaves it, even by an exception
(``Stream.__aiter__``'s ``finally``), and its default agent supervisor then starts
the agent again on the next record. A failure that repeats (a table write refused
with PartitionsMismatch, seen when the group leader's metadata lagged the brokers')
so acknowledged one record after another: the worker spun, committed source
offsets past batches whose counts never reached the changelog, and those batches
were lost. Ending the process instead leaves the record and every later one of its
partition uncommitted, as a SIGKILL does (docs/design.md, "What a SIGKILL costs"):
the worker that takes the partition next, this one restarted by its supervisor
(systemd, Kubernetes; ``ktel up`` restarts nothing: it stops the stack and shows the
line), processes them again, and the stages' dedupe counts none twice.

Any other crash of the Faust app (a timer, a task, one of Faust's own services) ends
the worker the same way (``Worker``), rather than through a shutdown that commits
what the stream acknowledged, and leaves it to the same restart. So does a record the
producer could not deliver (``undelivered``): the commit that would follow must not
go past the records that made it.

A record a stage itself fails on (``StageFailed``: the exception of a stage core, a
bug that record's content triggers) would stop every worker that takes its partition
in turn, and nothing of that partition would move again. So before such a worker
ends, it writes the record's place and reason to ``Poisoned``'s file in its data
directory (which a restarted process or pod finds again); the worker that meets the
record next sends it to ktel.dlq with that reason, whole, and goes on. The host's
state is then the changelog's, which the failed record never reached. A worker
elsewhere (without the file) stops on it once more, and writes its own. A note names
a place (topic, partition, offset), so a topic deleted and made again must lose the
file, as it must its table copies (docs/operating.md, "Processing state on disk").
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from typing import Any, NoReturn

import faust
from faust.exceptions import PartitionsMismatch

log = logging.getLogger("ktel.process")

EXIT_STATUS = 1


class StageFailed(Exception):
    """A stage core raised on a record: the record's content is what fails (see above)."""


class Poisoned:
    """The records a stage failed on, by place, with the reason: a JSON file, kept to
    its last ``KEEP`` records."""

    KEEP = 1000

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.places: dict[str, str] = json.loads(path.read_text())
        except FileNotFoundError:
            self.places = {}
        except (OSError, ValueError) as err:  # unreadable: every record is tried again
            log.warning("%s: %s; records that stopped a worker before are tried again", path, err)
            self.places = {}

    @staticmethod
    def place(msg: Any) -> str:
        return f"{msg.topic}[{msg.partition}]@{msg.offset}"

    def reason(self, msg: Any) -> str | None:
        """Why the record ``msg`` (a Faust message) stopped a worker before, or None."""
        return self.places.get(self.place(msg))

    def add(self, msg: Any, err: BaseException) -> None:
        """Note the record, durably, before the worker ends on it."""
        cause = err.__cause__ or err
        why = " ".join(f"{type(cause).__name__}: {cause}".split())[:1000]
        self.places[self.place(msg)] = f"a stage failed on it and stopped a worker ({why})"
        while len(self.places) > self.KEEP:
            del self.places[next(iter(self.places))]
        tmp = self.path.with_suffix(".tmp")
        try:
            with open(tmp, "w") as f:
                json.dump(self.places, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as err:  # (a full disk, say): the worker still stops, and meets it again
            log.error("%s: cannot note the record that stops this worker: %s", self.path, err)


def reason(stage: str, topic: str, partition: int, offset: int, err: BaseException) -> str:
    """The one line a worker logs as it stops on ``err``, raised processing the record
    at ``topic[partition]@offset``."""
    text = " ".join(str(err).split())  # Faust's messages span lines
    if isinstance(err, PartitionsMismatch):
        # Its first sentence has the counts; its advice (configure Kafka) does not apply:
        # Faust counts partitions in the consumer group's metadata, and the brokers had
        # the two topics equal when the worker started (check_partitions).
        text = text.partition(". ")[0] + ", in Faust's metadata, which lags the brokers'"
    why = f"{type(err).__name__}: {text}"
    return (
        f"ktel process {stage}: stopping: {why}; nothing of {topic}[{partition}] from offset "
        f"{offset} on is committed: restart the worker (its supervisor does) to process it again"
    )


def end(line: str, exc_info: Any = None) -> NoReturn:
    """Log ``line`` (CRITICAL) and end the process now, exit status 1: no shutdown that
    would commit what Faust acknowledged."""
    log.critical(line, exc_info=exc_info)
    logging.shutdown()  # flushed: os._exit skips it
    os._exit(EXIT_STATUS)


def undelivered(topic: str, err: BaseException) -> NoReturn:
    """Log and end the process now: the producer could not deliver a record to ``topic``
    (its retries spent), and the commit that would follow must not go past the records
    that made it."""
    text = " ".join(str(err).split())
    end(
        f"ktel process: stopping: a record to {topic} was not delivered ({type(err).__name__}: {text}); "
        "nothing processed since the last commit is committed: restart the worker (its supervisor "
        "does) to process it again"
    )


def stop(stage: str, msg: Any, err: BaseException) -> NoReturn:
    """Log why and end the process now, the record ``msg`` (a Faust message) unacknowledged."""
    line = reason(stage, msg.topic, msg.partition, msg.offset, err)
    # Anything but a lagging metadata is a bug: its traceback follows the line.
    end(line, exc_info=not isinstance(err, PartitionsMismatch))


def crashed(stage: str, err: BaseException) -> str:
    """The one line a worker logs as its Faust app crashes on ``err``."""
    text = " ".join(str(err).split())
    return (
        f"ktel process {stage}: stopping: the Faust app crashed on {type(err).__name__}: {text}; "
        "restart the worker (its supervisor does): it resumes from its committed offsets"
    )


class Worker(faust.Worker):
    """``faust.Worker`` that ends at once, with one line, when its app crashes, and
    logs at the level it is given."""

    def __init__(self, app: faust.App, stage: str, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.stage = stage
        # Faust keeps its terminal spinner at WARNING and above, and to spin it on every
        # record sets the root logger to DEBUG: every debug call in Faust and aiokafka (one
        # per record sent) would then build its record, only for the handlers to drop it.
        self.spinner = None

    def _crash(self, reason: BaseException) -> None:
        # mode marks every service up to the root, this worker, crashed through _crash
        # (Service.crash); the worker would then stop the app, committing on the way.
        if isinstance(reason, asyncio.CancelledError):
            # Faust's fetcher "crashes" with this when it is cancelled, which only a stop
            # does: that stop goes on as it is.
            super()._crash(reason)
            return
        end(crashed(self.stage, reason), exc_info=reason)

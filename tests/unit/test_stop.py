"""The line a processing worker logs as it stops on a record it cannot process, or
as its Faust app crashes (processors/stop.py); that it stops, the record
uncommitted, is tested on the real broker (tests/integration/test_processing_stages.py)."""

from faust.exceptions import PartitionsMismatch
from faust.tables.base import E_SOURCE_PARTITIONS_MISMATCH

from processors.stop import crashed, reason


def test_a_partitions_mismatch_is_one_line_with_faust_counts_and_not_its_advice():
    err = PartitionsMismatch(
        E_SOURCE_PARTITIONS_MISMATCH.format(
            source_topic="ktel.raw",
            table_name="host-state",
            source_n=6,
            change_topic="ktel-all-host-state-changelog",
            change_n=0,
        )
    )
    line = reason("all", "ktel.raw", 3, 17, err)
    assert "\n" not in line
    assert line == (
        "ktel process all: stopping: PartitionsMismatch: The source topic 'ktel.raw' for table "
        "'host-state' has 6 partitions, but the changelog topic 'ktel-all-host-state-changelog' "
        "has 0 partitions, in Faust's metadata, which lags the brokers'; nothing of ktel.raw[3] "
        "from offset 17 on is committed: restart the worker (its supervisor does) to process it again"
    )


def test_any_other_error_is_named_with_its_message():
    line = reason("enrich", "ktel.deduped", 0, 5, KeyError("host.id"))
    assert line.startswith("ktel process enrich: stopping: KeyError: 'host.id'; nothing of ktel.deduped[0]")


def test_a_crash_of_the_faust_app_is_one_line():
    line = crashed("aggregate", RuntimeError("timer\nfailed"))
    assert line == (
        "ktel process aggregate: stopping: the Faust app crashed on RuntimeError: timer failed; "
        "restart the worker (its supervisor does): it resumes from its committed offsets"
    )


def test_a_poisoned_record_is_found_again_by_the_next_process_and_the_file_stays_bounded(
    tmp_path, monkeypatch
):
    from types import SimpleNamespace

    from processors.stop import Poisoned, StageFailed

    def event(offset: int) -> SimpleNamespace:  # (a Faust message: its place)
        return SimpleNamespace(topic="ktel.raw", partition=2, offset=offset)

    path = tmp_path / "poisoned.json"
    first = Poisoned(path)
    assert first.reason(event(7)) is None
    try:
        raise StageFailed from KeyError("series")
    except StageFailed as err:
        first.add(event(7), err)
    # A new process (the restarted worker) reads the file.
    assert Poisoned(path).reason(event(7)) == "a stage failed on it and stopped a worker (KeyError: 'series')"
    assert Poisoned(path).reason(event(8)) is None
    monkeypatch.setattr(Poisoned, "KEEP", 3)
    for offset in range(10, 15):
        first.add(event(offset), StageFailed())
    kept = Poisoned(path)
    assert [kept.reason(event(o)) is not None for o in (7, 12, 13, 14)] == [False, True, True, True]
    path.write_text("{not json")
    assert Poisoned(path).reason(event(14)) is None  # unreadable: tried again, not refused


def test_a_note_that_cannot_be_written_does_not_keep_the_worker_from_stopping(tmp_path):
    from types import SimpleNamespace

    from processors.stop import Poisoned, StageFailed

    event = SimpleNamespace(topic="ktel.raw", partition=0, offset=1)
    Poisoned(tmp_path / "no-such-dir" / "poisoned.json").add(event, StageFailed())  # logs, no raise


def test_a_worker_at_warning_leaves_the_root_logger_at_warning():
    import logging

    import faust

    from processors.stop import Worker

    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    root.addHandler(logging.NullHandler())  # (Faust's spinner set-up edits the first handler)
    before = list(root.handlers)
    try:
        worker = Worker(
            faust.App("ktel-test-spinner", broker="kafka://127.0.0.1:9"), "all", loglevel="WARNING"
        )
        worker.on_setup_root_logger(root, logging.WARNING)
        # faust.Worker would set it to DEBUG and add its spinner's handler: every debug
        # call would build a record.
        assert root.getEffectiveLevel() != logging.DEBUG
        assert root.handlers == before
    finally:
        root.setLevel(level)
        root.handlers[:] = handlers

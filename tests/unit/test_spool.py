import pytest

from edge_agent.spool import HEADER, Spool


def payload(i: int, size: int = 100) -> bytes:
    return (f"batch-{i:06d}-".encode() * size)[:size]


def read_all(spool: Spool) -> list[bytes]:
    out, cur = [], spool.ack_cursor
    while recs := spool.read(cur, limit=7):
        out += [r.payload for r in recs]
        cur = recs[-1].next
    return out


def test_records_come_back_in_order_across_segments_and_reopen(tmp_path):
    sp = Spool(tmp_path, segment_bytes=1000)
    for i in range(50):
        assert sp.append(payload(i), n_events=3)
    assert read_all(sp) == [payload(i) for i in range(50)]
    assert len(list(tmp_path.glob("*.seg"))) > 5
    sp.close()
    again = Spool(tmp_path, segment_bytes=1000)  # a restart reads the same backlog
    assert read_all(again) == [payload(i) for i in range(50)]


def test_ack_deletes_segments_and_survives_restart(tmp_path):
    sp = Spool(tmp_path, segment_bytes=1000)
    for i in range(30):
        sp.append(payload(i), 1)
    recs = []
    cur = sp.ack_cursor
    while batch := sp.read(cur):
        recs += batch
        cur = batch[-1].next
    before = len(list(tmp_path.glob("*.seg")))
    sp.ack(recs[19].next)
    assert len(list(tmp_path.glob("*.seg"))) < before
    sp.close()
    again = Spool(tmp_path, segment_bytes=1000)
    assert read_all(again) == [payload(i) for i in range(20, 30)]
    # New appends come after the backlog.
    again.append(payload(99), 1)
    assert read_all(again)[-1] == payload(99)


def test_truncated_and_corrupted_segments_keep_every_intact_record(tmp_path, caplog):
    sp = Spool(tmp_path, segment_bytes=10_000)
    for i in range(40):
        sp.append(payload(i), n_events=5)
    sp.close()
    segs = sorted(tmp_path.glob("*.seg"))
    rec = HEADER.size + 100
    # Corrupt record 3 of the first segment in its payload, and record 5 in its header.
    data = bytearray(segs[0].read_bytes())
    data[3 * rec + 40] ^= 0xFF
    data[5 * rec + 1] ^= 0xFF
    segs[0].write_bytes(bytes(data))
    # Tear the last segment's tail mid-record (a crash mid-write).
    last = segs[-1].read_bytes()
    segs[-1].write_bytes(last[: len(last) - 30])

    again = Spool(tmp_path, segment_bytes=10_000)
    got = read_all(again)
    per_seg = 10_000 // rec
    lost = {3, 5, (len(segs) - 1) * per_seg + (len(last) // rec) - 1}
    assert got == [payload(i) for i in range(40) if i not in lost]
    assert again.corrupt_bytes == 2 * rec + (rec - 30)
    assert "is damaged at byte" in caplog.text


@pytest.mark.parametrize("policy", ["drop_newest", "drop_oldest"])
def test_full_spool_drops_by_policy_and_counts_events(tmp_path, policy):
    rec = HEADER.size + 100
    sp = Spool(tmp_path, max_bytes=10 * rec, segment_bytes=2 * rec, full_policy=policy)
    results = [sp.append(payload(i), n_events=7) for i in range(15)]
    got = read_all(sp)
    if policy == "drop_newest":
        assert results == [True] * 10 + [False] * 5
        assert got == [payload(i) for i in range(10)]
    else:
        assert all(results)
        assert got == [payload(i) for i in range(len(got) and 15 - len(got), 15)]
    assert sp.dropped_events == 7 * (15 - len(got))
    assert sp.dropped_batches == 15 - len(got)
    assert sp.depth_bytes() <= 10 * rec

"""The agent's numbering: an incarnation made with the state, sequence numbers
never issued twice, private files."""

import errno
import os
import stat

import pytest

from edge_agent.seqstore import SeqStore


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_restart_keeps_the_incarnation_and_never_reuses_a_number(tmp_path):
    s = SeqStore(tmp_path, block=10)
    assert [s.next() for _ in range(15)] == list(range(15))
    s2 = SeqStore(tmp_path, block=10)
    assert (s2.incarnation, s2.next()) == (s.incarnation, 20)


def test_lost_state_starts_a_new_incarnation(tmp_path):
    s = SeqStore(tmp_path / "state")
    s.next()
    (tmp_path / "state" / "batch-seq").unlink()
    s2 = SeqStore(tmp_path / "state")
    assert s2.next() == 0
    assert s2.incarnation != s.incarnation and len(s2.incarnation) == 32


def test_a_file_from_before_incarnations_gets_one_and_keeps_its_numbers(tmp_path):
    (tmp_path / "batch-seq").write_text("8192")
    s = SeqStore(tmp_path)
    assert s.next() == 8192
    assert SeqStore(tmp_path).incarnation == s.incarnation


def test_a_block_that_cannot_be_written_issues_no_number(tmp_path, monkeypatch):
    s = SeqStore(tmp_path, block=10)
    assert s.next() == 0
    for _ in range(9):
        s.next()

    def full(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError):
        s.next()
    with pytest.raises(OSError):  # still nothing on disk: still no number
        s.next()
    monkeypatch.undo()
    assert s.next() == 10
    assert SeqStore(tmp_path, block=10).next() == 20


@pytest.mark.parametrize("failing", ["fchmod", "fsync"])
def test_a_block_that_cannot_be_written_leaves_no_file_open(tmp_path, monkeypatch, failing):
    """The agent asks again at each batch while the disk refuses the block: a descriptor
    left open at each try would run it out of them."""
    s = SeqStore(tmp_path, block=10)
    before = sorted(os.listdir("/proc/self/fd"))

    def failed(*_a, **_k):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, failing, failed)
    for _ in range(20):
        with pytest.raises(OSError):
            s.next()
    monkeypatch.undo()
    assert sorted(os.listdir("/proc/self/fd")) == before
    assert s.next() == 0


def test_a_first_start_on_a_full_disk_numbers_once_space_returns(tmp_path, monkeypatch):
    def full(path, *_a, **_k):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(os, "mkdir", full)
    s = SeqStore(tmp_path / "state", block=10)  # no directory could be made: not a reason to stop
    with pytest.raises(OSError):
        s.next()
    monkeypatch.undo()
    assert s.next() == 0
    assert SeqStore(tmp_path / "state", block=10).next() == 10


def test_the_state_is_private_even_if_it_was_not(tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    (state / "batch-seq").write_text("c" * 32 + " 5\n")
    os.chmod(state, 0o755)
    os.chmod(state / "batch-seq", 0o644)
    s = SeqStore(state, block=10)
    assert (mode(state), mode(state / "batch-seq")) == (0o700, 0o600)
    s.next()
    assert mode(state / "batch-seq") == 0o600
    new = tmp_path / "new" / "state"
    SeqStore(new).next()
    assert (mode(new), mode(new / "batch-seq")) == (0o700, 0o600)


@pytest.mark.parametrize(
    "text",
    [
        b"",
        b"\x00\x17garbage",
        b"c" * 32 + b" not-a-number\n",
        b"c" * 32 + b" -5\n",  # the wire takes no negative sequence number
        b"c" * 32 + b" " + str(2**64).encode() + b"\n",  # nor one past 2^63 - 1
        # digits past what Python turns into an int (sys.get_int_max_str_digits(), 4300)
        b"c" * 32 + b" " + b"0" * 5000 + b"\n",
        b"9" * 5000 + b"\n",
        b"x y z\n",
        b"not hex " + b"5\n",
    ],
)
def test_a_damaged_file_is_lost_state_not_a_crash_at_every_start(tmp_path, caplog, text):
    """A disk's damage or a hand's edit: logged, and numbering starts again under a new
    incarnation, as when the file is gone (dedupe keys the two numberings apart)."""
    (tmp_path / "batch-seq").write_bytes(text)
    s = SeqStore(tmp_path, block=10)
    assert s.next() == 0 and len(s.incarnation) == 32 and s.incarnation != "c" * 32
    assert "does not hold an incarnation and a batch number" in caplog.text
    again = SeqStore(tmp_path, block=10)  # what it wrote reads back
    assert (again.incarnation, again.next()) == (s.incarnation, 10)

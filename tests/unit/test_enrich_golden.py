"""Golden in/out files of the enrich stage (see tests/golden/enrich/README.md), run
through the chain `ktel process enrich` runs, and its feed file."""

import os

import pytest

from ktel.wire import PROCESS_EXEC, RawBatch
from processors import enrich_core
from processors.chain import Chain
from tests.unit import golden

CASES = golden.cases("enrich")


def run_case(case: dict, tmp_path) -> dict:
    path = tmp_path / "feed.jsonl"
    path.write_text("\n".join(case["feed"]))
    feed = enrich_core.MetadataFile(path)
    feed_errors = feed.refresh()
    chain = Chain([enrich_core.Enrich(enrich_core.Options(**case["options"]), feed)])
    table: dict[str, dict] = {}
    steps = []
    for step in case["steps"]:
        if "heartbeat" in step:
            hb = step["heartbeat"]
            host = hb["host"]["host.id"]
            taken = chain.on_heartbeat(table.setdefault(host, {}), host, hb).changed
            steps.append({"heartbeat_taken": taken})
            continue
        b = step["batch"]
        batch = RawBatch(b["host"], b["boot"], b["seq"], b["sent"], b["events"])
        value = table.setdefault(b["host"], {})
        result = chain.on_batch(value, batch, 0)
        out = result.batch
        assert out is not None
        steps.append(
            {
                "res": out.resource,
                "proc": out.processes,
                "changed": result.changed,
                "evicted": result.counts["evicted_processes"],
                "processes": enrich_core.known_processes(value["enrich"]),
            }
        )
        # Enrich adds attributes, and nothing else of the batch changes.
        assert (out.events, out.seq, out.weights) == (b["events"], b["seq"], None)
    return {"feed_errors": feed_errors, "steps": steps, "states": {h: v["enrich"] for h, v in table.items()}}


@pytest.mark.parametrize("name", CASES)
def test_golden(name, tmp_path):
    golden.check("enrich", name, run_case(golden.load("enrich", name), tmp_path))


def test_every_case_of_the_issue_has_a_golden_file():
    assert set(CASES) >= {
        "unknown_pid",
        "exec_then_exit",
        "heartbeat_updates_host_name",
        "metadata_feed",
        "table_bound",
        "agent_containers",
    }


def test_the_feed_file_is_reloaded_when_it_changes_and_emptied_when_it_goes(tmp_path):
    path = tmp_path / "pods.jsonl"
    f = enrich_core.MetadataFile(path)
    assert f.refresh() is None  # not written yet: nothing to say
    path.write_text('{"host.id": "h1", "cgroup.id": 7, "k8s.pod.name": "a"}\n')
    assert f.refresh() == []
    assert f.feed == {"h1": {None: {7: {"k8s.pod.name": "a"}}}}
    assert f.refresh() is None  # unchanged: not read again
    tmp = tmp_path / "pods.tmp"
    tmp.write_text('{"host.id": "h1", "cgroup.id": 7, "k8s.pod.name": "b"}\nbad\n')
    os.replace(tmp, path)  # how a writer should replace it
    assert f.refresh() == ["line 2: not JSON (Expecting value: line 1 column 1 (char 0))"]
    assert f.feed == {"h1": {None: {7: {"k8s.pod.name": "b"}}}}
    path.unlink()
    assert f.refresh() is not None
    assert f.feed == {} and f.entries == 0


def test_the_feed_file_is_reloaded_when_the_kubelet_updates_its_config_map(tmp_path):
    """The Helm chart mounts the file from a ConfigMap (process.enrichMetadata) and counts
    on this rather than restarting the workers: the kubelet writes a ConfigMap's new
    content in a new directory and swaps the link `..data` to it, the file a link through
    it. The new file is read even with the same size and mtime as the old one."""
    mount = tmp_path / "enrich-metadata"
    mount.mkdir()
    line = '{"host.id": "h1", "cgroup.id": 7, "k8s.pod.name": "%s"}\n'
    for version, pod in (("..2026_12_06_16_00_00.1", "a"), ("..2026_12_06_16_05_00.2", "b")):
        (mount / version).mkdir()
        (mount / version / "metadata.jsonl").write_text(line % pod)
        os.utime(mount / version / "metadata.jsonl", ns=(0, 0))
    (mount / "..data").symlink_to("..2026_12_06_16_00_00.1")
    (mount / "metadata.jsonl").symlink_to("..data/metadata.jsonl")
    f = enrich_core.MetadataFile(mount / "metadata.jsonl")
    assert f.refresh() == [] and f.feed == {"h1": {None: {7: {"k8s.pod.name": "a"}}}}
    (mount / "..data_tmp").symlink_to("..2026_12_06_16_05_00.2")
    os.replace(mount / "..data_tmp", mount / "..data")
    assert f.refresh() == [] and f.feed == {"h1": {None: {7: {"k8s.pod.name": "b"}}}}


def test_a_feed_line_is_one_line_whatever_its_strings_hold():
    """JSON takes U+2028, U+2029 and U+0085 unescaped in a string (an annotation's text, as
    jq and Go's encoder may write it): the line is one line of the feed, not two broken
    ones, and the lines after it keep their numbers."""
    text = '{"host.id": "h1", "cgroup.id": 7, "k8s.pod.annotation.note": "a\u2028b\u2029c\x85d"}\nbad\n'
    feed, errors = enrich_core.load_metadata(text)
    assert feed == {"h1": {None: {7: {"k8s.pod.annotation.note": "a\u2028b\u2029c\x85d"}}}}
    assert errors == ["line 2: not JSON (Expecting value: line 1 column 1 (char 0))"]


def test_no_feed_configured_is_an_empty_feed():
    f = enrich_core.MetadataFile(None)
    assert f.refresh() is None and f.feed == {}


def test_a_heartbeat_repeating_what_the_state_holds_changes_nothing_persisted_but_moves_its_time():
    """Most heartbeats of a fleet repeat their host's attributes: each would be a changelog
    record (1,000 a second at 10,000 hosts). Such a heartbeat changes nothing the table
    must carry, yet its time is taken: an older one that comes after it is still ignored."""
    stage = enrich_core.Enrich(enrich_core.Options(), enrich_core.MetadataFile(None))
    state: dict = {}

    def hb(ts: int, name: str) -> dict:
        return {"ts": ts, "host": {"host.id": "h", "boot.id": "b", "host.name": name}}

    assert stage.on_heartbeat(state, hb(1000, "n1")).changed
    assert not stage.on_heartbeat(state, hb(2000, "n1")).changed
    assert state["boots"]["b"]["hb"] == 2000
    assert not stage.on_heartbeat(state, hb(1500, "old name")).changed  # older than 2000
    assert state["boots"]["b"]["host"]["host.name"] == "n1"
    assert stage.on_heartbeat(state, hb(3000, "n2")).changed
    assert (state["boots"]["b"]["hb"], state["boots"]["b"]["host"]["host.name"]) == (3000, "n2")


def test_a_boots_heartbeats_are_ordered_by_their_number_not_by_a_clock_set_back():
    """A node's clock set back an hour (NTP, a VM restored): its next heartbeats' host and
    container attributes are taken, where ordered by ``ts`` they were ignored for the
    hour; one re-read or re-driven from before is still ignored. An older agent's
    heartbeats, without ``seq``, are ordered by ``ts`` as before."""
    stage = enrich_core.Enrich(enrich_core.Options(), enrich_core.MetadataFile(None))
    state: dict = {}
    hour = 3_600_000

    def hb(boot: str, ts: int, seq: int | None, name: str) -> dict:
        containers = [[7, {"k8s.pod.name": f"pod of {name}"}]]
        numbered = {} if seq is None else {"seq": seq}
        return {
            "ts": ts,
            **numbered,
            "host": {"host.id": "h", "boot.id": boot, "host.name": name},
            "containers": containers,
        }

    def seen(boot: str) -> tuple[str, str]:
        b = state["boots"][boot]
        return b["host"]["host.name"], b["containers"]["7"]["k8s.pod.name"]

    assert stage.on_heartbeat(state, hb("b", 10 * hour, 100, "n1")).changed
    assert stage.on_heartbeat(state, hb("b", 9 * hour, 200, "n2")).changed  # the clock an hour back
    assert seen("b") == ("n2", "pod of n2")
    assert stage.on_heartbeat(state, hb("b", 9 * hour + 10_000, 300, "n3")).changed
    assert seen("b") == ("n3", "pod of n3")
    # Re-read: the heartbeats of before, and the last one again, change nothing.
    for old in (
        hb("b", 10 * hour, 100, "n1"),
        hb("b", 9 * hour, 200, "n2"),
        hb("b", 9 * hour + 10_000, 300, "n1"),
    ):
        assert not stage.on_heartbeat(state, old).changed
    assert seen("b") == ("n3", "pod of n3")
    # A VM restored from a snapshot with its memory: its numbers go back with it, its
    # wall clock, set right, past every heartbeat's before.
    assert stage.on_heartbeat(state, hb("b", 10 * hour + 60_000, 150, "n4")).changed
    assert seen("b") == ("n4", "pod of n4")

    # An older agent's: by ts, a clock set back ignored until it passes the last taken.
    assert stage.on_heartbeat(state, hb("old", 10 * hour, None, "n1")).changed
    assert not stage.on_heartbeat(state, hb("old", 9 * hour, None, "n2")).changed
    assert seen("old") == ("n1", "pod of n1")
    assert stage.on_heartbeat(state, hb("old", 10 * hour + 1, None, "n3")).changed
    assert seen("old") == ("n3", "pod of n3")


def test_a_hosts_containers_are_bounded_dropping_the_unlisted_and_old_boots_first(monkeypatch):
    monkeypatch.setattr(enrich_core, "MAX_CONTAINERS", 3)
    state: dict = {}

    def heartbeat(ts, boot, *cgroups):
        host = {"host.id": "h", "boot.id": boot}
        hb = {"ts": ts, "host": host, "containers": [[cg, {"container.id": f"{cg:064x}"}] for cg in cgroups]}
        assert enrich_core.observe_heartbeat(state, hb)
        enrich_core.bound(state, enrich_core.Options())

    def kept():
        return {b: list(v.get("containers", {})) for b, v in state["boots"].items()}

    heartbeat(1, "old", 1, 2)
    heartbeat(2, "new", 10)
    assert kept() == {"old": ["1", "2"], "new": ["10"]}
    heartbeat(3, "new", 11)  # 10 stopped: still known, but the old boot's go first
    assert kept() == {"old": ["2"], "new": ["10", "11"]}
    heartbeat(4, "new", 11, 12, 13)
    assert kept() == {"old": [], "new": ["11", "12", "13"]}


def test_a_heartbeat_listing_more_container_bytes_than_fit_evicts_processes_then_the_oldest_containers():
    stage = enrich_core.Enrich(enrich_core.Options(max_table_bytes=20_000), enrich_core.MetadataFile(None))
    state: dict = {}
    execs = [[PROCESS_EXEC.id, 1, pid, pid, 1, 0, 7, "p", f"/bin/p{pid}"] for pid in range(10)]
    stage.on_batch(state, RawBatch("h", "b", 0, 1, execs), 0)
    assert enrich_core.known_processes(state) == 10
    # 100 containers of about 500 bytes each: 50 KB.
    listed = [[cg, {"container.id": f"{cg:064x}", "k8s.pod.name": "p" * 400}] for cg in range(1, 101)]
    hb = {"ts": 1, "host": {"host.id": "h", "boot.id": "b"}, "containers": listed}
    result = stage.on_heartbeat(state, hb)
    kept = list(state["boots"]["b"]["containers"])
    assert result.changed and result.counts["evicted_processes"] == 10
    assert result.counts["evicted_containers"] == 100 - len(kept) > 50
    assert result.counts["processes"] == -10 and enrich_core.known_processes(state) == 0
    assert kept == [str(cg) for cg in range(101 - len(kept), 101)]  # the first listed went first
    rest = {k: v for k, v in state.items() if k != "bytes"}
    assert enrich_core.encoded_size(rest) <= state["bytes"] <= 20_000


def test_a_batch_of_more_execs_than_the_next_stage_takes_passes_on_at_most_max_processes():
    """A fork storm: one batch exec'ing 9,000 processes. Its output used to name all
    9,000, past the 8,192 processes the next stage's decoder takes, so in split mode the
    whole batch was dead-lettered there."""
    from ktel.wire import decode_batch, encode_batch

    opts = enrich_core.Options(max_processes=4096, max_table_bytes=10_000_000)
    stage = enrich_core.Enrich(opts, enrich_core.MetadataFile(None))
    state: dict = {}
    execs = [[PROCESS_EXEC.id, 1, pid, pid, 1, 0, 7, "p", f"/bin/p{pid}"] for pid in range(1, 9001)]
    result = stage.on_batch(state, RawBatch("h", "b", 0, 1, execs), 0)
    out = result.batch
    assert out is not None and out.events == execs
    assert len(out.processes) == 4096 == enrich_core.known_processes(state)
    assert set(out.processes) == {str(pid) for pid in range(4905, 9001)}  # the most recent kept
    assert len(decode_batch(encode_batch(out)).processes) == 4096


def test_a_feed_line_setting_more_than_a_batch_takes_is_refused():
    """The feed's attributes go into the batches enrich sends on, whose next reader takes
    an attribute of a name up to 256 characters and a value up to 4096 (the wire's), and
    into the resource of their spans and logs, 128 attributes at most. A line past either
    (a pod's annotations or labels, as k8s.pod.annotation.*: kubectl's
    last-applied-configuration is often longer) made every batch naming a process of its
    cgroup one the next stage dead-letters whole: it is refused, with the reason."""
    import json

    from ktel.wire import KTEL_SPAN, decode_batch, decode_spans, encode_batch, encode_spans
    from processors import aggregate_core

    many = {f"k8s.pod.label.l{i}": "v" for i in range(enrich_core.FEED_MAX_ATTRS)}
    lines = [
        {"host.id": "h", "cgroup.id": 1, "k8s.pod.annotation.big": "x" * 4097},
        {"host.id": "h", "cgroup.id": 2, "k8s.pod.label." + "k" * 300: "v"},
        {"host.id": "h", "cgroup.id": 3, **many, "k8s.pod.name": "one-too-many"},
        {"host.id": "h", "cgroup.id": 4, **many},
    ]
    feed, errors = enrich_core.load_metadata("\n".join(json.dumps(line) for line in lines))
    assert [e.split(":")[0] for e in errors] == ["line 1", "line 2", "line 3"]
    assert list(feed["h"][None]) == [4]
    # The most a line may set still makes a batch and a span's resource the wire takes,
    # with a host's and a container's attributes at their most.
    state: dict = {}
    host = {"host.id": "h", "boot.id": "b", **{f"host.a{i}": "v" * 1024 for i in range(30)}}
    told = {f"container.a{i}": "v" for i in range(16)}
    enrich_core.observe_heartbeat(state, {"ts": 1, "host": host, "containers": [[4, told]]})
    exec_ = [PROCESS_EXEC.id, 1, 10, 10, 1, 0, 4, "sh", "/bin/sh"]
    span = [KTEL_SPAN.id, 1, 10, 10, b"t" * 16, b"s" * 8, b"", "op", 1, 2, 0, {}]
    out = enrich_core.enrich(state, RawBatch("h", "b", 1, 1, [exec_, span]), feed, enrich_core.Options())
    batch = decode_batch(encode_batch(out.batch))
    [spans] = aggregate_core.signals(batch)[0]
    decode_spans(encode_spans(spans))

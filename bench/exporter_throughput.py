"""Benchmark: the exporters' throughput per process, each against the plain library
path measured in the same run, against the same local receiver.

  remote-write  ktel: wire snapshot records -> decode -> exporters.remote_write.deliver
                (labels, protobuf, snappy, POST with httpx, one request per 2000 series)
                library: opentelemetry-exporter-prometheus-remote-write's own exporter,
                handed the same samples as SDK MetricsData, once ready-made (building
                them untimed, which favours the library) and once built from the records
                in the timed loop (the same job as ktel's)
                receiver: a minimal HTTP server in its own process that reads the body
                and answers 204, so the exporter, not the receiver, is measured
  otlp spans    ktel: wire span records -> decode -> exporters.otlp.Sender.deliver
                (the OTLP request built by exporters/otlp_spans.py, sent by the
                SDK's OTLP exporters, gRPC and HTTP)
                library: the SDK's own path, tracer spans (same names, ids' parents,
                attributes, times) through BatchSpanProcessor into the same OTLP
                exporter, timed until force_flush returned; its queue is made large
                enough to drop nothing (the default 2048 would drop most of them)
                receiver: the real OpenTelemetry Collector (otlp receiver -> debug
                exporter; its own process)

Everything runs in this one process except the receivers (the second core). Rates are
given per wall second and per CPU second of this process (all its threads): the
second is what one core sustains, and is less disturbed by other load on the machine.

Run: .venv/bin/python bench/exporter_throughput.py [--samples 400000] [--spans 100000]
Results go to bench/RESULTS.md by hand, with the date and the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from exporters import otlp, remote_write  # noqa: E402
from exporters.consume import Record  # noqa: E402
from exporters.delivery import Window  # noqa: E402
from exporters.remote_write_client import Receiver  # noqa: E402
from ktel import runtime  # noqa: E402
from ktel.config import OtlpConfig, RemoteWriteConfig  # noqa: E402
from ktel.stack import proc  # noqa: E402
from ktel.stack.otelcol import LocalCollector  # noqa: E402
from ktel.stack.proc import free_port  # noqa: E402
from ktel.wire import (  # noqa: E402
    METRICS_TOPIC,
    SPANS_TOPIC,
    MetricSnapshot,
    SpanBatch,
    decode_snapshot,
    decode_spans,
    encode_snapshot,
    encode_spans,
)

SERIES_PER_RECORD = 1000  # one aggregate snapshot: a host's series
RECORDS_PER_DELIVERY = 50  # what one consumer poll hands the exporter
SPANS_PER_RECORD = 1000

_RECEIVER = """
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class H(BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(204)
        self.end_headers()
    def log_message(self, *a):
        pass

ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


class NullCollector(LocalCollector):
    """The real Collector, keeping nothing: the debug exporter only counts."""

    def _config(self) -> dict[str, Any]:
        cfg = super()._config()
        cfg["exporters"] = {"debug": {"verbosity": "basic"}}
        pipeline = {"receivers": ["otlp"], "exporters": ["debug"]}
        cfg["service"]["pipelines"] = {"traces": pipeline}
        return cfg


class Clock:
    """Wall time and this process's CPU time (all its threads) since start."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def stop(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def best(n: int, runs: list[tuple[float, float]]) -> tuple[float, float]:
    """Best items per wall second and per CPU second of this process."""
    return n / min(w for w, _ in runs), n / min(c for _, c in runs)


# ---------------------------------------------------------------- remote-write


# The snapshots below step 10 s per window from now, into the future: checked against
# the window like any, but never outside it (the bench measures delivery, not refusal).
WINDOW = Window(math.inf, math.inf, "remote_write")


def snapshot_records(total: int) -> list[bytes]:
    """As the aggregate stage writes them: each window, one snapshot per host; a delivery
    (one consumer poll) holds one window of RECORDS_PER_DELIVERY hosts."""
    records = []
    t0 = int(time.time() * 1000)
    for i in range(total // SERIES_PER_RECORD):
        window, host = divmod(i, RECORDS_PER_DELIVERY)
        rows = [
            [
                "file_created_total",
                "counter",
                {"host.id": f"host-{host}", "directory": f"/srv/data/{j}"},
                i + j,
            ]
            for j in range(SERIES_PER_RECORD)
        ]
        records.append(encode_snapshot(MetricSnapshot(t0 + window * 10_000, rows)))
    return records


def deliveries(records: list[bytes]) -> list[list[bytes]]:
    return [records[i : i + RECORDS_PER_DELIVERY] for i in range(0, len(records), RECORDS_PER_DELIVERY)]


async def ktel_remote_write(url: str, records: list[bytes]) -> tuple[float, float]:
    async with Receiver(RemoteWriteConfig(url=url, timeout_seconds=30)) as receiver:
        clock = Clock()
        for chunk in deliveries(records):
            recs = [Record(decode_snapshot(r), METRICS_TOPIC, 0, i, None, r) for i, r in enumerate(chunk)]
            await remote_write.deliver(receiver, recs, None, WINDOW)  # type: ignore[arg-type]
        return clock.stop()


def library_remote_write(url: str, records: list[bytes], *, build_timed: bool) -> tuple[float, float]:
    """The library's exporter handed SDK MetricsData built from the same records (with
    exporters.otlp.to_metrics); building them is timed or not."""
    from opentelemetry.exporter.prometheus_remote_write import PrometheusRemoteWriteMetricsExporter

    def build(chunk: list[bytes]) -> Any:
        return otlp.to_metrics([(s.ts_ms, row) for s in map(decode_snapshot, chunk) for row in s.series])

    exporter = PrometheusRemoteWriteMetricsExporter(endpoint=url)
    prebuilt = None if build_timed else [build(c) for c in deliveries(records)]
    clock = Clock()
    for md in prebuilt or map(build, deliveries(records)):
        if exporter.export(md).name != "SUCCESS":
            raise RuntimeError("the library's remote-write export failed")
    return clock.stop()


# ---------------------------------------------------------------------- spans


def span_records(total: int) -> list[bytes]:
    records = []
    t0 = time.time_ns()
    for i in range(total // SPANS_PER_RECORD):
        trace_id = os.urandom(16)
        root = os.urandom(8)
        rows = []
        for j in range(SPANS_PER_RECORD):
            sid = root if j == 0 else os.urandom(8)
            parent = b"" if j == 0 else root
            attrs = {"process.pid": 1000 + j, "path": f"/srv/data/{j}", "flags": 64}
            rows.append([trace_id, sid, parent, "vfs_open", t0 + j * 1000, t0 + j * 1000 + 500, 1, "", attrs])
        records.append(encode_spans(SpanBatch({"host.id": f"host-{i % 10}", "host.name": "node"}, rows)))
    return records


async def ktel_spans(protocol: str, endpoint: str, records: list[bytes]) -> tuple[float, float]:
    sender = otlp.Sender(OtlpConfig(protocol=protocol, endpoint=endpoint))  # type: ignore[arg-type]
    try:
        clock = Clock()
        for start in range(0, len(records), 10):
            chunk = records[start : start + 10]
            recs = [Record(decode_spans(r), SPANS_TOPIC, 0, i, None, r) for i, r in enumerate(chunk)]
            await sender.deliver(recs, None)  # type: ignore[arg-type]  # nothing is dead-lettered
        return clock.stop()
    finally:
        sender.shutdown()


def sdk_span_exporter(protocol: str, endpoint: str) -> Any:
    """The SDK's own OTLP span exporter, configured as ktel's (exporters/otlp.py)."""
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=endpoint)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter

    return HttpSpanExporter(endpoint=f"{endpoint.rstrip('/')}/v1/traces")


def library_spans(protocol: str, endpoint: str, records: list[bytes]) -> tuple[float, float]:
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.trace import NonRecordingSpan, SpanContext, Status, StatusCode, TraceFlags

    exporter = sdk_span_exporter(protocol, endpoint)
    exported = [0]  # spans the receiver acknowledged: a failing baseline must not look fast
    plain_export = exporter.export

    def export(spans: Any) -> Any:
        result = plain_export(spans)
        exported[0] += len(spans) if result.name == "SUCCESS" else 0
        return result

    exporter.export = export
    batches = [decode_spans(r) for r in records]
    n = sum(len(b.spans) for b in batches)
    provider = TracerProvider(resource=Resource(batches[0].resource))
    provider.add_span_processor(BatchSpanProcessor(exporter, max_queue_size=n, max_export_batch_size=2048))
    tracer = provider.get_tracer("ktel")
    clock = Clock()
    for b in batches:
        for trace_id, _span_id, parent, name, start, end, status, _msg, attrs in b.spans:
            ctx = None
            if parent:
                sc = SpanContext(
                    int.from_bytes(trace_id, "big"), int.from_bytes(parent, "big"), False, TraceFlags(1)
                )
                ctx = trace.set_span_in_context(NonRecordingSpan(sc))
            span = tracer.start_span(name, context=ctx, attributes=attrs, start_time=start)
            span.set_status(Status(StatusCode(status)))
            span.end(end_time=end)
    if not provider.force_flush(timeout_millis=600_000):
        raise RuntimeError("BatchSpanProcessor did not flush")
    elapsed = clock.stop()
    provider.shutdown()
    if exported[0] != n:
        raise RuntimeError(f"the SDK exported {exported[0]} of {n} spans")
    return elapsed


# ----------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=400_000)
    ap.add_argument("--spans", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=3, help="best of this many runs of each")
    args = ap.parse_args()
    runtime.tune_gc()  # as every exporter process does (exporters/consume.py); baselines too

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        receiver = proc.spawn([sys.executable, "-c", _RECEIVER, str(port)], Path(tmp) / "rx.log", Path(tmp))
        try:
            while not proc.port_in_use(port):
                time.sleep(0.05)
            url = f"http://127.0.0.1:{port}/api/v1/write"
            records = snapshot_records(args.samples)
            n = len(records) * SERIES_PER_RECORD
            ktel = best(n, [asyncio.run(ktel_remote_write(url, records)) for _ in range(args.runs)])
            for timed in (False, True):
                lib = best(
                    n, [library_remote_write(url, records, build_timed=timed) for _ in range(args.runs)]
                )
                what = (
                    "library exporter, "
                    + ("incl. building" if timed else "handed ready")
                    + " its MetricsData"
                )
                rows.append(("remote-write samples/s", ktel, what, lib))
        finally:
            proc.stop(receiver, 5)

        with NullCollector(Path(tmp) / "otelcol", free_port(), free_port()) as col:
            records = span_records(args.spans)
            n = len(records) * SPANS_PER_RECORD
            for protocol, endpoint in (("grpc", col.grpc_endpoint), ("http/protobuf", col.http_endpoint)):
                ktel = best(
                    n, [asyncio.run(ktel_spans(protocol, endpoint, records)) for _ in range(args.runs)]
                )
                lib = best(n, [library_spans(protocol, endpoint, records) for _ in range(args.runs)])
                rows.append((f"OTLP/{protocol} spans/s", ktel, "SDK BatchSpanProcessor", lib))

    machine = f"{platform.node()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    print(f"{time.strftime('%Y-%m-%d')}, {machine}")
    print("| what | per | ktel | baseline | baseline rate | ktel / baseline |")
    print("| --- | --- | ---: | --- | ---: | ---: |")
    for what, ktel, base, lib in rows:
        for i, per in enumerate(("wall second", "CPU second")):
            print(f"| {what} | {per} | {ktel[i]:,.0f} | {base} | {lib[i]:,.0f} | {ktel[i] / lib[i]:.2f} |")


if __name__ == "__main__":
    main()

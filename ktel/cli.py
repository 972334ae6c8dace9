"""The ``ktel`` command."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging.config
import math
import os
import pathlib
import re
import signal
import sys
from collections.abc import Awaitable, Callable
from importlib.metadata import version

from ktel import config as config_mod
from ktel import logs
from processors.chain import PROCESSES


def _setup_logging(cfg: config_mod.Config, args: argparse.Namespace) -> str:
    """Log as ``service.*`` says, at --log-level if given; the level in force."""
    level = getattr(args, "log_level", None) or cfg.service.log_level
    logging.config.dictConfig(logs.config(level, cfg.service.log_format))
    return level


def _run_until_signal(main: Callable[[asyncio.Event], Awaitable[None]], *, graceful: bool) -> None:
    """Run ``main(stop)`` until SIGINT/SIGTERM.

    graceful: the first signal sets ``stop`` so ``main`` can flush and return;
    a second one cancels it. Otherwise the signal cancels ``main`` at once, for
    workers that hold nothing unacknowledged (offsets follow acknowledgements).
    """

    async def runner() -> None:
        stop = asyncio.Event()
        task = asyncio.ensure_future(main(stop))

        def on_signal() -> None:
            if graceful and not stop.is_set():
                stop.set()
            else:
                task.cancel()

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(runner())


def cmd_agent(cfg: config_mod.Config, _args: argparse.Namespace) -> None:
    from edge_agent.agent import Agent

    _run_until_signal(Agent(cfg).run, graceful=True)


def cmd_probes(_cfg: config_mod.Config, args: argparse.Namespace) -> None:
    # The registry only: BCC is imported when a probe loads, so this runs without it.
    from ktel.probes import KINDS, PROBE_OF_KIND, PROBES

    if args.kinds:
        for kind in sorted(KINDS.values(), key=lambda k: k.id):
            probe = PROBE_OF_KIND.get(kind.id, "every histogram probe")
            keep = ", always kept" if kind.keep else ""
            print(f"{kind.id} {kind.name} (from {probe}{keep}): {' '.join(kind.field_names)}")
        return
    for name, p in PROBES.items():
        print(f"{name}: {p.summary}")
        if args.verbose:
            needs = [*p.tracepoints, *(f"uprobe {u.library}:{u.symbol}" for u in p.uprobes)]
            print(f"    needs: {', '.join(needs)}")
            if p.kinds:
                print(f"    sends: {', '.join(k.name for k in p.kinds)}")
            if p.histograms:
                print(f"    histograms: {', '.join(h.metric for h in p.histograms)}")


def cmd_process(cfg: config_mod.Config, args: argparse.Namespace) -> None:
    from processors import stages

    stages.run(cfg, args.stage, args.log_level_in_force)


def cmd_export(cfg: config_mod.Config, args: argparse.Namespace) -> None:
    if args.exporter == "remote-write":
        from exporters import remote_write

        _run_until_signal(lambda stop: remote_write.run(cfg, stop), graceful=False)
    elif args.exporter == "otlp":
        from exporters import otlp

        _run_until_signal(lambda stop: otlp.run(cfg, stop), graceful=False)
    else:
        from exporters import pull

        _run_until_signal(lambda stop: pull.run(cfg, stop), graceful=False)


def cmd_topics(cfg: config_mod.Config, _args: argparse.Namespace) -> None:
    from ktel import topics

    sys.exit(asyncio.run(topics.ensure(cfg, print)))


def cmd_acls(cfg: config_mod.Config, args: argparse.Namespace) -> None:
    from ktel import acls

    print(acls.script(cfg.kafka, PROCESSES, args.command_config))


def cmd_up(cfg: config_mod.Config, args: argparse.Namespace) -> None:
    from ktel import up

    if getattr(args, "config", None):  # the children load the same file
        os.environ["KTEL_CONFIG"] = os.path.abspath(args.config)
    sys.exit(up.run(cfg))


def cmd_cluster(_cfg: config_mod.Config, args: argparse.Namespace) -> None:
    from ktel.stack import cluster

    if args.brokers < 1:
        sys.exit(f"ktel cluster: --brokers {args.brokers}: a cluster needs at least one broker")
    sys.exit(cluster.run(pathlib.Path(args.directory), args.brokers, tuple(PROCESSES)))


def cmd_down(cfg: config_mod.Config, _args: argparse.Namespace) -> None:
    from ktel import up

    sys.exit(up.down(cfg))


def cmd_config(cfg: config_mod.Config, _args: argparse.Namespace) -> None:
    # Secrets (e.g. otlp.headers' tokens) masked: this output ends up in tickets and chats.
    print(json.dumps(config_mod.printable(cfg), indent=2))


def cmd_status(cfg: config_mod.Config, args: argparse.Namespace) -> None:
    from ktel import status

    sys.exit(status.main(cfg, args))


def cmd_replay(cfg: config_mod.Config, args: argparse.Namespace) -> None:
    from ktel import replay

    sys.exit(replay.main(cfg, args))


def cmd_dlq(cfg: config_mod.Config, args: argparse.Namespace) -> None:
    from ktel import dlq

    sys.exit(dlq.main(cfg, args))


def _seconds(text: str) -> float:
    """A duration option's value: seconds, above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text} seconds: give more than 0")
    if value == math.inf:  # which --json would print as Infinity, not JSON
        raise argparse.ArgumentTypeError(f"{text} seconds: give a finite number")
    return value


def _relative_times(argv: list[str]) -> list[str]:
    """``--from -15m`` -> ``--from=-15m``: argparse takes a value starting with "-"
    for an option, and relative times are what an operator types most."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1] in ("--from", "--to") and re.fullmatch(r"-[\d.]+[smhd]", arg):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def build_parser() -> argparse.ArgumentParser:
    """The ``ktel`` command line: its commands, each calling its ``fn``."""
    # Accepted before the command and after it (`ktel up --config x.toml`); SUPPRESS
    # keeps a subcommand's unset option from overwriting the one given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        default=argparse.SUPPRESS,
        help="TOML config file (default: $KTEL_CONFIG; KTEL_* env overrides)",
    )
    common.add_argument(
        "--log-level",
        default=argparse.SUPPRESS,
        choices=["debug", "info", "warning", "error"],
        help="default: service.log_level (KTEL_SERVICE__LOG_LEVEL), else info",
    )
    parser = argparse.ArgumentParser(
        prog="ktel", description="Fleet-wide Linux kernel telemetry.", parents=[common]
    )
    parser.add_argument("--version", action="version", version=f"ktel {version('ktel')}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser(
        "up", parents=[common], help="run the whole pipeline on this host with a local Kafka and Prometheus"
    )
    p.set_defaults(fn=cmd_up)
    p = sub.add_parser(
        "down", parents=[common], help="stop the `ktel up` running from the same config, in order"
    )
    p.set_defaults(fn=cmd_down)
    p = sub.add_parser(
        "cluster",
        parents=[common],
        help="start a local Kafka set up like a production one, to try ktel against: SASL_SSL, mTLS, "
        "the ACLs of `ktel acls` (throwaway certificates and passwords)",
    )
    p.add_argument(
        "directory", help="for the brokers' data, the certificates and a config file per principal"
    )
    p.add_argument("--brokers", type=int, default=3, help="KRaft nodes, each a broker and a controller")
    p.set_defaults(fn=cmd_cluster)
    p = sub.add_parser("agent", parents=[common], help="the edge agent: BPF ring buffers -> Kafka ktel.raw")
    p.set_defaults(fn=cmd_agent)
    p = sub.add_parser(
        "probes", parents=[common], help="list the probes the agent can load (agent.probes names them)"
    )
    p.add_argument("-v", "--verbose", action="store_true", help="with what each needs and sends")
    p.add_argument("--kinds", action="store_true", help="list the event kinds instead, with their fields")
    p.set_defaults(fn=cmd_probes)
    p = sub.add_parser(
        "process", parents=[common], help="a Faust processing worker (start more of a stage to scale it out)"
    )
    p.add_argument(
        "stage",
        choices=list(PROCESSES),
        help="dedupe: drop re-sent batches; enrich: host, process, container and pod attributes; "
        "sample: adaptive sampling and anomaly-driven fidelity; "
        "aggregate: windowed metric snapshots; all: the four in one worker",
    )
    p.set_defaults(fn=cmd_process)
    p = sub.add_parser("export", parents=[common], help="an exporter worker reading ktel's output topics")
    p.add_argument(
        "exporter",
        choices=["remote-write", "pull", "otlp"],
        help="remote-write: Prometheus remote-write 1.0; pull: a /metrics endpoint; "
        "otlp: spans, logs and metrics over OTLP (gRPC or HTTP)",
    )
    p.set_defaults(fn=cmd_export)
    p = sub.add_parser(
        "topics",
        parents=[common],
        help="create ktel's topics on the configured Kafka (idempotent); refuses existing ones laid out "
        "otherwise than the configuration says",
    )
    p.set_defaults(fn=cmd_topics)
    p = sub.add_parser(
        "acls",
        parents=[common],
        help="print the kafka-acls.sh commands giving each ktel role least privilege",
    )
    p.add_argument(
        "--command-config", metavar="FILE", help="kafka-acls.sh's client config (admin credentials)"
    )
    p.set_defaults(fn=cmd_acls)
    p = sub.add_parser("config", parents=[common], help="print the effective configuration")
    p.set_defaults(fn=cmd_config)
    p = sub.add_parser(
        "replay",
        parents=[common],
        help="print or re-publish the raw events of a time window (forensics)",
        description="Read a time window of ktel.raw with a group-less consumer (live consumer groups "
        "are untouched). Times: ISO-8601 (UTC unless a zone is given; to the nanosecond), relative like "
        "-15m or -2h, or now. Exit status: 0 done (records that do not decode included), 1 a "
        "matched batch too large to re-publish to --to-topic (each named), 2 a bad argument or Kafka "
        "could not be read. Which records are read and which events kept: ktel/replay.py.",
    )
    p.add_argument("--from", dest="from_", required=True, metavar="TIME", help="start of the window (kept)")
    p.add_argument("--to", default="now", metavar="TIME", help="end of the window (excluded; default now)")
    p.add_argument(
        "--host",
        action="append",
        metavar="HOST_ID",
        help="only records keyed by this host id or whose batch names it (repeatable)",
    )
    p.add_argument("--kind", action="append", metavar="KIND", help="only this event kind (repeatable)")
    p.add_argument(
        "--margin",
        default="5m",
        metavar="DURATION",
        help="also read records up to this long after --to, for batches that reached Kafka late (default 5m)",
    )
    p.add_argument("--topic", help="topic of raw batches to read (default ktel.raw, under kafka.prefix)")
    p.add_argument(
        "--format",
        choices=["jsonl", "none"],
        help="jsonl: one JSON object per event on stdout (default without --to-topic); none: no output",
    )
    p.add_argument("--to-topic", metavar="TOPIC", help="re-publish the matching batches, filtered, to TOPIC")
    p.add_argument(
        "--to-bootstrap",
        metavar="HOST:PORT",
        help="the Kafka of --to-topic (default: the configured one)",
    )
    p.add_argument("--dlq", action="store_true", help="send records that do not decode to ktel.dlq")
    p.set_defaults(fn=cmd_replay)
    p = sub.add_parser(
        "dlq",
        parents=[common],
        help="list the dead letters of ktel.dlq, and re-drive them (--redrive): back to their topics, or "
        "to their exporter's backend",
        description="Read the dead letters written in a time window (when they were dead-lettered) with a "
        "group-less consumer and print the selected ones: when, the stage, where the record was, its key, "
        "its size and the reason. With --redrive, re-publish each stage's dead letter's record to its "
        "topic, and send each exporter's (remote-write, otlp) to that exporter's configured backend. Exit "
        "status: 0 done, 1 --redrive left some or a backend refused some again (each line says why), 2 a "
        "bad argument, Kafka could not be read, or a backend did not take a dead letter within "
        "--backend-wait (or asked to be left alone past it). What is re-driven, and why that is safe to "
        "repeat: ktel/dlq.py.",
    )
    p.add_argument(
        "--from",
        dest="from_",
        metavar="TIME",
        help="start of the window (default: the oldest, whatever its time)",
    )
    p.add_argument(
        "--to", metavar="TIME", help="end of the window (excluded; default: the newest, whatever its time)"
    )
    p.add_argument("--stage", action="append", metavar="STAGE", help="only from this stage (repeatable)")
    p.add_argument(
        "--source", action="append", metavar="TOPIC", help="only records read from TOPIC (repeatable)"
    )
    p.add_argument("--host", action="append", metavar="HOST_ID", help="only records keyed so (repeatable)")
    p.add_argument("--reason", metavar="REGEX", help="only dead letters whose reason matches REGEX")
    p.add_argument("--json", action="store_true", help="one JSON object per dead letter, its payload in hex")
    p.add_argument(
        "--redrive",
        action="store_true",
        help="re-publish the selected stages' records, with their keys, to the topics they were read "
        "from; send the selected exporters' to their backends; each delivered one is marked on ktel.dlq, "
        "and one marked by an earlier --redrive is skipped",
    )
    p.add_argument(
        "--again",
        action="store_true",
        help="with --redrive, re-drive dead letters an earlier --redrive marked as delivered too",
    )
    p.add_argument(
        "--backend-wait",
        type=_seconds,
        metavar="SECONDS",
        help="with --redrive, how long an exporter's dead letter waits for its backend to take it, "
        "asking again meanwhile, before the run stops (exit 2); at once when the backend asks "
        "(Retry-After) for a wait past it (default 120)",
    )
    p.set_defaults(fn=cmd_dlq)
    p = sub.add_parser(
        "status",
        parents=[common],
        help="the fleet at a glance: every host's last heartbeat, probes, drops and spool; every "
        "stage's and exporter's consumer lag and members; exits 1 when a host is stale",
        description="Hosts from the heartbeats of the last --since seconds on ktel.heartbeats; stages "
        "and exporters from their consumer groups (ids starting with ktel-). Exit status: 0 all hosts "
        "fresh, 1 a host is stale, 2 Kafka could not be read. The --json shape: ktel/status.py SCHEMA.",
    )
    p.add_argument("--json", action="store_true", help="one JSON object (per refresh with --watch)")
    p.add_argument(
        "--watch",
        nargs="?",
        const=2.0,
        type=_seconds,
        metavar="SECONDS",
        help="refresh every SECONDS (default 2) until Ctrl-C",
    )
    p.add_argument(
        "--stale-after",
        type=_seconds,
        metavar="SECONDS",
        help="a host with no heartbeat for this long, or whose last is stamped more than this far ahead "
        "of this clock, is stale (default: 3 x agent.heartbeat_seconds)",
    )
    p.add_argument(
        "--since",
        type=_seconds,
        default=900.0,
        metavar="SECONDS",
        help="read the heartbeats of this many seconds back (default 900); a host silent "
        "for longer is not listed",
    )
    p.add_argument("--host", action="append", metavar="HOST_ID", help="only this host id (repeatable)")
    p.add_argument(
        "--timeout",
        type=_seconds,
        default=30.0,
        metavar="SECONDS",
        help="give up (exit 2) when Kafka has not answered in this long, retrying meanwhile (default 30)",
    )
    p.set_defaults(fn=cmd_status)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(_relative_times(sys.argv[1:] if argv is None else argv))
    try:
        cfg = config_mod.load(getattr(args, "config", None))
        args.log_level_in_force = _setup_logging(cfg, args)
        # A setting can also prove unusable when a command starts (a certificate file
        # that is not PEM): the same message, not a traceback.
        args.fn(cfg, args)
    except config_mod.ConfigError as err:
        print(f"ktel: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

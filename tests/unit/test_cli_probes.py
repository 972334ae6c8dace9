from ktel import cli
from ktel.probes import KINDS, PROBES


def test_ktel_probes_lists_every_registered_probe(capsys):
    cli.main(["probes"])
    assert capsys.readouterr().out.splitlines() == [f"{n}: {p.summary}" for n, p in PROBES.items()]


def test_ktel_probes_verbose_says_what_each_needs(capsys):
    cli.main(["probes", "-v"])
    out = capsys.readouterr().out
    assert "    needs: tcp/tcp_retransmit_skb\n    sends: tcp_retransmit\n" in out
    assert "    needs: uprobe c:getaddrinfo\n    sends: dns_slow\n    histograms: dns_latency\n" in out


def test_ktel_probes_kinds_lists_every_kind_with_its_fields(capsys):
    cli.main(["probes", "--kinds"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(KINDS)
    assert (
        "2 tcp_retransmit (from tcp_retransmit, always kept): ts_ns family saddr sport daddr dport state err"
        in lines
    )

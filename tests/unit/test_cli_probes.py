from edge_agent.probes import SPECS
from ktel import cli


def test_ktel_probes_lists_every_probe_with_its_required_tracepoints(capsys):
    cli.main(["probes"])
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split() for ln in lines] == [[f"{n}:", *s.required_tracepoints] for n, s in SPECS.items()]

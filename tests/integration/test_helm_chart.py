"""The Helm chart (deploy/helm/ktel), rendered by the real helm and checked offline.

Every rendered object is validated against the Kubernetes schemas (kubernetes-validate,
strict: an unknown field is an error); then what matters is asserted: no privileged
container, the agent's exact capabilities, host PID namespace and mounts, probes on the
port each process really serves, no secret in the ConfigMap, and a ConfigMap that
ktel's own config loader accepts. deploy/setup.sh builds helm into the cache.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from pydantic import BaseModel

from ktel import config, topics
from ktel.paths import TRACEFS
from processors.chain import PROCESSES
from processors.stages import changelog_topic

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "ktel"
FULL = CHART / "ci" / "full-values.yaml"
# The rules and dashboards the chart ships (prometheusRule, dashboards), where the local
# stack and their own tests read them; the chart reaches them through links.
RULES = ROOT / "deploy" / "prometheus" / "ktel-rules.yml"
DASHBOARDS = sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"))
HELM_VERSION = "3.22.0"  # deploy/setup.sh builds this one
SECRETS_DIR = "/etc/ktel/secrets"
# Each workload's container: its `ktel` arguments and the setting of the port it serves
# its self-metrics, /healthz and /readyz on.
PORT_SETTING = {
    "agent": ("agent", "metrics_port"),
    "process": ("process", "metrics_port"),
    "remote-write": ("remote_write", "metrics_port"),
    "otlp": ("otlp", "metrics_port"),
    "pull": ("pull", "metrics_port"),
}


def helm() -> str:
    cache = Path(os.environ.get("KTEL_CACHE_DIR") or Path.home() / ".cache" / "ktel")
    built = cache / f"helm-{HELM_VERSION}" / "bin" / "helm"
    found = str(built) if built.is_file() else shutil.which("helm")
    if not found:
        pytest.skip(f"helm is not built (deploy/setup.sh builds it into {built})")
    return found


def run_helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm(), *args], capture_output=True, text=True, timeout=300)


def render(*values: Path, sets: tuple[str, ...] = (), kube: str = "") -> list[dict[str, Any]]:
    argv = ["template", "ktel", str(CHART), "--namespace", "telemetry"]
    argv += ["--kube-version", kube] if kube else []
    argv += [a for v in values for a in ("-f", str(v))] + [a for s in sets for a in ("--set", s)]
    res = run_helm(*argv)
    assert res.returncode == 0, res.stderr
    return [d for d in yaml.safe_load_all(res.stdout) if d]


@pytest.fixture(scope="module", params=["default", "full"])
def rendered(request) -> list[dict[str, Any]]:
    return render() if request.param == "default" else render(FULL)


@pytest.fixture(scope="module")
def full() -> list[dict[str, Any]]:
    return render(FULL)


def of_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def workloads(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return of_kind(objs, "DaemonSet") + of_kind(objs, "Deployment")


def the_agent(objs: list[dict[str, Any]]) -> dict[str, Any]:
    [ds] = of_kind(objs, "DaemonSet")
    return ds


def hooks(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objs if "helm.sh/hook" in o["metadata"].get("annotations", {})]


def config_map(objs: list[dict[str, Any]]) -> dict[str, Any]:
    """The release's ConfigMap of ktel.toml (not the topics hook's copy, nor the dashboards')."""
    [cm] = [o for o in of_kind(objs, "ConfigMap") if o not in hooks(objs) and "ktel.toml" in o["data"]]
    return cm


def dashboards_config_map(objs: list[dict[str, Any]]) -> dict[str, Any]:
    [cm] = [o for o in of_kind(objs, "ConfigMap") if o["metadata"]["name"].endswith("-dashboards")]
    return cm


def toml_config(objs: list[dict[str, Any]]) -> dict[str, Any]:
    return tomllib.loads(config_map(objs)["data"]["ktel.toml"])


def config_file(objs: list[dict[str, Any]], tmp_path: Path) -> Path:
    """The release's ktel.toml under tmp_path, with the Kafka Secrets' files it names,
    which exist in the pod, there too."""
    text = config_map(objs)["data"]["ktel.toml"].replace(SECRETS_DIR, str(tmp_path / "secrets"))
    for sub in ("kafka/password", "kafka-tls/ca.crt"):
        (tmp_path / "secrets" / sub).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "secrets" / sub).write_text("x\n")
    path = tmp_path / "ktel.toml"
    path.write_text(text)
    return path


def port_setting(args: list[str]) -> tuple[str, str]:
    return PORT_SETTING["agent" if args == ["agent"] else args[0] if args[0] == "process" else args[1]]


def test_helm_lint_passes_with_default_and_full_values() -> None:
    for values in ([], ["-f", str(FULL)]):
        res = run_helm("lint", "--strict", str(CHART), *values)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "0 chart(s) failed" in res.stdout


# The oldest Kubernetes docs/operating.md promises, and the newest kubernetes-validate knows.
K8S_VERSIONS = ["1.25.0", kubernetes_validate.latest_version()]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_object_is_valid_kubernetes_strictly(rendered, version) -> None:
    kinds = set()
    for obj in rendered:
        kinds.add(obj["kind"])
        if obj["kind"] in (
            "ServiceMonitor",
            "PodMonitor",
            "PrometheusRule",
        ):  # CRDs: no schema in Kubernetes itself
            continue
        kubernetes_validate.validate(obj, version, strict=True)
    assert {"ConfigMap", "DaemonSet", "Deployment", "Service", "PodDisruptionBudget"} <= kinds


def test_strict_validation_rejects_an_unknown_field(rendered) -> None:
    """The check above can fail: a misspelt field is caught."""
    ds = the_agent(rendered)
    ds["spec"]["template"]["spec"]["hostPid"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, kubernetes_validate.latest_version(), strict=True)


def test_no_container_is_privileged_and_only_the_agent_adds_capabilities(rendered) -> None:
    for w in workloads(rendered) + of_kind(rendered, "Job"):
        pod = w["spec"]["template"]["spec"]
        for c in pod["containers"] + pod.get("initContainers", []):
            sc = c["securityContext"]
            assert sc.get("privileged") is False, w["metadata"]["name"]
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"]["drop"] == ["ALL"]
            if w["kind"] != "DaemonSet":
                assert "add" not in sc["capabilities"]
                assert sc["runAsNonRoot"] is True
                assert not pod.get("hostPID") and not pod.get("hostNetwork")
                assert not [v for v in pod["volumes"] if "hostPath" in v]
        assert pod["automountServiceAccountToken"] is False


def test_the_agent_has_exactly_bpf_perfmon_and_sys_resource_and_the_host_pids(rendered) -> None:
    pod = the_agent(rendered)["spec"]["template"]["spec"]
    [c] = pod["containers"]
    assert c["args"] == ["agent"]
    assert c["securityContext"]["capabilities"] == {
        "drop": ["ALL"],
        "add": ["BPF", "PERFMON", "SYS_RESOURCE"],
    }
    assert c["securityContext"]["runAsUser"] == 0
    assert pod["hostPID"] is True
    assert not pod.get("hostNetwork")


def test_the_agent_mounts_the_kernel_interfaces_and_keeps_its_state_on_the_node(rendered) -> None:
    pod = the_agent(rendered)["spec"]["template"]["spec"]
    [c] = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    host = {
        m["mountPath"]: (volumes[m["name"]]["hostPath"]["path"], m.get("readOnly", False))
        for m in c["volumeMounts"]
        if "hostPath" in volumes[m["name"]]
    }
    cfg = toml_config(rendered)
    assert host == {
        "/sys/kernel/tracing": ("/sys/kernel/tracing", False),
        "/host/sys/fs/cgroup": ("/sys/fs/cgroup", True),
        "/lib/modules": ("/lib/modules", True),
        "/usr/src": ("/usr/src", True),
        "/etc/machine-id": ("/etc/machine-id", True),
        cfg["agent"]["state_dir"]: ("/var/lib/ktel/agent", False),
    }
    [state] = [v for v in pod["volumes"] if v.get("hostPath", {}).get("path") == "/var/lib/ktel/agent"]
    assert state["hostPath"]["type"] == "DirectoryOrCreate"  # survives the pod, made on first start
    assert cfg["agent"]["cgroup_root"] == "/host/sys/fs/cgroup"


def test_the_agent_names_its_host_by_the_node_not_by_its_pod(rendered) -> None:
    """A pod's host name is its own (a new one at each rollout): host.name is the node's."""
    [c] = the_agent(rendered)["spec"]["template"]["spec"]["containers"]
    [name] = [e for e in c["env"] if e["name"] == "KTEL_AGENT__HOST_NAME"]
    assert name["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}


def test_the_agent_needs_tracefs_alone_not_debugfs(rendered) -> None:
    """A node without debugfs (booted with debugfs=off, or a kernel without CONFIG_DEBUG_FS)
    has no /sys/kernel/debug: the agent mounted it (a hostPath of type Directory), so its
    pod could not start on such a node, though it reads tracefs alone, at ktel.paths.TRACEFS,
    and BCC uses /sys/kernel/tracing where /sys/kernel/debug/tracing is absent."""
    pod = the_agent(rendered)["spec"]["template"]["spec"]
    [c] = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    from_node = {v["hostPath"]["path"]: v for v in volumes.values() if "hostPath" in v}
    assert [p for p in from_node if p.startswith("/sys/kernel/debug")] == []
    assert not [m for m in c["volumeMounts"] if m["mountPath"].startswith("/sys/kernel/debug")]
    tracefs = from_node[str(TRACEFS)]
    assert tracefs["hostPath"]["type"] == "Directory"  # tracefs the agent cannot do without
    [mount] = [m for m in c["volumeMounts"] if m["name"] == tracefs["name"]]
    assert mount["mountPath"] == str(TRACEFS) and not mount.get("readOnly")  # (uprobe_events)


def test_dns_latency_attaches_to_the_nodes_libc_mounted_from_agent_libc_host_path() -> None:
    """A uprobe is on a file, seen only by the processes mapping it: the agent's own libc
    is its image's, which none of the node's processes map. The node's libc's directory
    is mounted, and agent.libc_path names the file there."""
    sets = ("agent.libcHostPath=/lib/x86_64-linux-gnu/libc.so.6", "config.agent.probes={dns_latency}")
    objs = render(sets=sets)
    pod = the_agent(objs)["spec"]["template"]["spec"]
    [volume] = [v for v in pod["volumes"] if v["name"] == "libc"]
    assert volume["hostPath"] == {"path": "/lib/x86_64-linux-gnu", "type": "Directory"}
    [mount] = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "libc"]
    assert mount["readOnly"] is True
    assert toml_config(objs)["agent"]["libc_path"] == f"{mount['mountPath']}/libc.so.6"
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(the_agent(objs), version, strict=True)


@pytest.mark.parametrize(
    "sets, hint",
    [
        (("config.agent.probes={file_created,dns_latency}",), "config.agent.probes has dns_latency"),
        (("config.agent.libc_path=/lib/x86_64-linux-gnu/libc.so.6",), "config.agent.libc_path = /lib/"),
    ],
)
def test_dns_latency_on_the_images_libc_is_refused_naming_agent_libc_host_path(sets, hint) -> None:
    res = run_helm("template", "ktel", str(CHART), *(a for s in sets for a in ("--set", s)))
    assert res.returncode != 0
    assert hint in res.stderr
    assert "set agent.libcHostPath to the node's libc" in res.stderr


def test_every_pod_runs_on_linux_nodes_only() -> None:
    """ktel runs on Linux alone: every pod selects Linux nodes, those a nodeSelector value
    names among them. The agent tolerates every taint, so without it its pods landed on a
    cluster's Windows nodes, never started, and held up every rollout of the DaemonSet."""
    linux = {"kubernetes.io/os": "linux"}
    for objs in (render(), render(FULL)):
        pods = workloads(objs) + of_kind(objs, "Job")
        assert {w["kind"] for w in pods} == {"DaemonSet", "Deployment", "Job"}
        for w in pods:
            assert w["spec"]["template"]["spec"]["nodeSelector"] == linux, w["metadata"]["name"]
    objs = render(sets=("agent.nodeSelector.pool=edge", "process.nodeSelector.gen=2"))
    for w in workloads(objs):
        selector = w["spec"]["template"]["spec"]["nodeSelector"]
        given = {"DaemonSet": {"pool": "edge"}, "Deployment": {}}[w["kind"]]
        if w["metadata"]["name"].startswith("ktel-process"):
            given = {"gen": "2"}  # a label's value is a string
        assert selector == {**linux, **given}, w["metadata"]["name"]
        kubernetes_validate.validate(w, kubernetes_validate.latest_version(), strict=True)


def service_links(objs: list[dict[str, Any]]) -> dict[str, str]:
    """The variables Kubernetes puts in a pod's environment for each Service of its
    namespace with a cluster IP, unless the pod's enableServiceLinks is false."""
    env: dict[str, str] = {}
    for svc in of_kind(objs, "Service"):
        if svc["spec"].get("clusterIP") == "None":
            continue
        name = svc["metadata"]["name"].upper().replace("-", "_")
        env[f"{name}_SERVICE_HOST"] = "10.0.0.1"
        for i, port in enumerate(svc["spec"]["ports"]):
            number, url = port["port"], f"tcp://10.0.0.1:{port['port']}"
            if i == 0:
                env[f"{name}_SERVICE_PORT"], env[f"{name}_PORT"] = str(number), url
            env[f"{name}_SERVICE_PORT_{port['name'].upper().replace('-', '_')}"] = str(number)
            env[f"{name}_PORT_{number}_TCP"] = url
            env[f"{name}_PORT_{number}_TCP_PROTO"] = "tcp"
            env[f"{name}_PORT_{number}_TCP_PORT"] = str(number)
            env[f"{name}_PORT_{number}_TCP_ADDR"] = "10.0.0.1"
    return env


def test_every_pod_loads_its_config_in_the_environment_kubernetes_gives_it(
    rendered, tmp_path, monkeypatch
) -> None:
    """Kubernetes names a Service's address variables after it (KTEL_PROCESS_ALL_SERVICE_HOST
    for ktel-process-all), and ktel's config refuses a KTEL_ variable it does not read:
    every pod would exit at its start. No pod takes them."""
    links = service_links(rendered)
    assert any(name.startswith("KTEL_PROCESS_") for name in links)  # (what the chart's Services make)
    for name in [n for n in os.environ if n.startswith("KTEL_")]:
        monkeypatch.delenv(name)
    path = config_file(rendered, tmp_path)
    for pod in workloads(rendered) + of_kind(rendered, "Job"):
        spec = pod["spec"]["template"]["spec"]
        given = {} if spec.get("enableServiceLinks") is False else links
        with monkeypatch.context() as env:
            for name, value in given.items():
                env.setenv(name, value)
            config.load(path)  # (raises ConfigError naming the variable)


def test_digits_set_for_a_string_are_refused_naming_set_string(tmp_path, monkeypatch) -> None:
    """Helm's --set makes digits a number, which the ConfigMap's TOML keeps: ktel refuses it,
    and says how to give it as the string it wants."""
    for name in [n for n in os.environ if n.startswith("KTEL_")]:
        monkeypatch.delenv(name)
    with pytest.raises(config.ConfigError, match=r'service.name = 2024: .*name = "2024".*--set-string'):
        config.load(config_file(render(sets=("config.service.name=2024",)), tmp_path))
    res = run_helm("template", "ktel", str(CHART), "--set-string", "config.service.name=2024")
    assert res.returncode == 0, res.stderr
    [cm] = [
        d
        for d in yaml.safe_load_all(res.stdout)
        if d
        and d["kind"] == "ConfigMap"
        and "ktel.toml" in d["data"]
        and "helm.sh/hook" not in d["metadata"].get("annotations", {})
    ]
    assert config.load(config_file([cm], tmp_path)).service.name == "2024"


def placed_by(w: dict[str, Any]) -> str:
    """The values that place a pod: its group's (agent, process, exporters, topicsJob)."""
    if w["kind"] != "Deployment":
        return {"DaemonSet": "agent", "Job": "topicsJob"}[w["kind"]]
    return "process" if w["metadata"]["name"].startswith("ktel-process") else "exporters"


@pytest.mark.parametrize("group", ["agent", "process", "exporters", "topicsJob"])
def test_each_pod_runs_where_its_values_place_it(group) -> None:
    """Each group of pods has its nodeSelector, tolerations and priorityClassName, the
    others' leaving it as it is. The topics Job had no nodeSelector or tolerations: where
    every Linux node is tainted, or Kafka is reached from some nodes alone, it could not go
    where the other pods do, and every install and upgrade waited on it until helm's
    timeout, and failed. No pod had a priority: on a node full of other pods, a new agent
    stayed Pending, the node untraced, for want of one above theirs."""
    toleration = {"key": "dedicated", "operator": "Equal", "value": "ktel", "effect": "NoSchedule"}
    objs = render(
        sets=(
            f"{group}.nodeSelector.pool=ktel",
            *(f"{group}.tolerations[0].{k}={v}" for k, v in toleration.items()),
            f"{group}.priorityClassName=system-node-critical",
        )
    )
    pods = workloads(objs) + of_kind(objs, "Job")
    assert {placed_by(w) for w in pods} == {"agent", "process", "exporters", "topicsJob"}
    for w in pods:
        pod = w["spec"]["template"]["spec"]
        mine = placed_by(w) == group
        assert pod["nodeSelector"] == {"kubernetes.io/os": "linux", **({"pool": "ktel"} if mine else {})}
        assert (toleration in pod.get("tolerations", [])) is mine, w["metadata"]["name"]
        assert pod.get("priorityClassName") == ("system-node-critical" if mine else None)
        kubernetes_validate.validate(w, kubernetes_validate.latest_version(), strict=True)


def test_pods_take_the_clusters_default_priority_unless_given_one() -> None:
    """Unset, no pod names a PriorityClass: one the cluster lacks, or limits to kube-system
    (system-node-critical on GKE), would keep its pods from being made at all."""
    objs = render()
    for w in workloads(objs) + of_kind(objs, "Job"):
        assert "priorityClassName" not in w["spec"]["template"]["spec"], w["metadata"]["name"]
    [ds] = of_kind(render(FULL), "DaemonSet")  # what docs/operating.md recommends for the agent
    assert ds["spec"]["template"]["spec"]["priorityClassName"] == "system-node-critical"


def test_a_nodes_agent_is_replaced_only_once_the_old_one_ended(rendered) -> None:
    """Two agents never share a node's state directory: the second refuses to start
    (edge_agent/statelock.py), so a surge's new pod would never be ready, and the
    rollout would stop at the first node."""
    strategy = the_agent(rendered)["spec"]["updateStrategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"].get("maxSurge", 0) == 0
    for surge in ("0", "0%"):
        render(sets=(f"agent.updateStrategy.rollingUpdate.maxSurge={surge}",))
    for surge in ("1", "10%"):
        res = run_helm(
            "template", "ktel", str(CHART), "--set", f"agent.updateStrategy.rollingUpdate.maxSurge={surge}"
        )
        assert res.returncode != 0
        assert f"agent.updateStrategy.rollingUpdate.maxSurge = {surge}: a surge starts" in res.stderr
        assert "leave maxSurge at 0" in res.stderr


def test_the_agents_are_replaced_a_share_of_the_nodes_at_a_time_as_values_say() -> None:
    """One node at a time, a rollout over 10,000 nodes takes days: the default is a share
    of the nodes, and what values give is what the DaemonSet gets."""
    default = the_agent(render())["spec"]["updateStrategy"]
    assert default == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "10%"}}
    for given, rendered in (("25%", "25%"), ("3", 3)):
        sets = (f"agent.updateStrategy.rollingUpdate.maxUnavailable={given}",)
        strategy = the_agent(render(sets=sets))["spec"]["updateStrategy"]
        assert strategy["rollingUpdate"] == {"maxUnavailable": rendered}
    for none in ("0", "0%"):
        res = run_helm(
            "template",
            "ktel",
            str(CHART),
            "--set",
            f"agent.updateStrategy.rollingUpdate.maxUnavailable={none}",
        )
        assert res.returncode != 0
        assert f"agent.updateStrategy.rollingUpdate.maxUnavailable = {none}: with maxSurge 0" in res.stderr
        assert "replaces no agent at all" in res.stderr
    # Agents replaced by hand: the default's rollingUpdate, which Kubernetes refuses with
    # that type, is left out.
    on_delete = render(sets=("agent.updateStrategy.type=OnDelete",))
    assert the_agent(on_delete)["spec"]["updateStrategy"] == {"type": "OnDelete"}


# The sections of ktel's config the agent reads (edge_agent/), which alone roll its pods;
# of kafka's, only some fields (agent_kafka_fields).
AGENT_SECTIONS = ("kafka", "agent", "service")


def config_checksums(*sets: str) -> tuple[str, set[str]]:
    """The agent's checksum/config annotation, and the Deployments'."""
    objs = render(sets=sets)
    of = [
        w["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
        for w in of_kind(objs, "Deployment")
    ]
    return the_agent(objs)["spec"]["template"]["metadata"]["annotations"]["checksum/config"], set(of)


@pytest.mark.parametrize(
    "change, agent_rolls",
    [
        ("config.remote_write.url=http://prometheus.example:9090/api/v1/write", False),
        ("config.aggregate.window_seconds=5", False),
        ("config.enrich.max_processes=9000", False),
        ("config.agent.batch_max_ms=700", True),
        ("config.kafka.bootstrap=kafka.example:9093", True),
        ("config.kafka.raw_partitions=12", False),
        ("config.kafka.output_partitions=12", False),
        ("config.service.log_level=debug", True),
    ],
)
def test_a_config_change_rolls_the_agents_only_when_they_read_it(change, agent_rolls) -> None:
    """A node's agent restarted has a gap in its events while its probes load again,
    maxUnavailable nodes at a time across the fleet: a change it does not read leaves it running."""
    agent, deployments = config_checksums()
    agent_after, deployments_after = config_checksums(change)
    assert (agent_after != agent) is agent_rolls
    assert deployments_after.isdisjoint(deployments)  # (every worker and exporter reads the whole config)


def test_the_agent_reads_no_other_section_of_the_config() -> None:
    """What keeps AGENT_SECTIONS, and the agent's checksum, whole."""
    others = [f for f in config.Config.model_fields if f not in AGENT_SECTIONS]
    pattern = re.compile(r"\.(" + "|".join(others) + r")\b")
    for path in sorted((ROOT / "edge_agent").glob("*.py")):
        assert not pattern.findall(path.read_text()), path
    template = (CHART / "templates" / "_helpers.tpl").read_text()
    whole = [s for s in AGENT_SECTIONS if s != "kafka"]  # (kafka's: agent_kafka_fields)
    assert "pick $config " + " ".join(f'"{s}"' for s in whole) + ' | merge (dict "kafka" $kafka)' in template


def agent_kafka_fields() -> set[str]:
    """The fields of kafka the agent reads: those edge_agent/ names, and ktel/kafka_client.py,
    its one way to Kafka, directly or through a property or method of KafkaConfig's
    (topics: the prefix)."""
    fields = set(config.KafkaConfig.model_fields)
    sources = [*sorted((ROOT / "edge_agent").glob("*.py")), ROOT / "ktel" / "kafka_client.py"]
    named = set(re.findall(r"\.(\w+)\b", "".join(p.read_text() for p in sources)))
    read = fields & named
    for name, member in vars(config.KafkaConfig).items():
        function = member.fget if isinstance(member, property) else member
        if name in named and inspect.isfunction(function):
            read |= fields & set(re.findall(r"self\.(\w+)", inspect.getsource(function)))
    return read


def test_the_agent_reads_kafkas_connection_and_prefix_alone() -> None:
    """What holds ktel.agentKafkaFields to the code: a field the agent reads left out of it
    would leave the agents on the old value after an upgrade, one it does not read would
    roll every node's agent for nothing."""
    read = agent_kafka_fields()
    assert {"bootstrap", "prefix", "security_protocol", "ssl_cafile", "sasl_password_file"} <= read
    assert not read & {"raw_partitions", "output_partitions", "replication_factor", "principals"}


# (A field holding a secret is refused in config: it comes from a Secret, never the ConfigMap.)
@pytest.mark.parametrize(
    "field",
    sorted(f for f, m in config.KafkaConfig.model_fields.items() if m.json_schema_extra != config.SECRET),
)
def test_a_kafka_field_rolls_the_agents_only_when_they_read_it(field) -> None:
    model = config.KafkaConfig.model_fields[field]
    sub, default = model.annotation, model.default
    if isinstance(sub, type) and issubclass(sub, BaseModel):  # a section of its own: one of its fields
        field, default = f"{field}.{next(iter(sub.model_fields))}", "x"
    # Another value of the field's type (partitions stay above the default replicas).
    value = {True: "false", False: "true"}.get(default) if isinstance(default, bool) else None
    value = value or (str(default * 2) if isinstance(default, int | float) else "changed")
    agent, _ = config_checksums()
    agent_after, _ = config_checksums(f"config.kafka.{field}={value}")
    assert (agent_after != agent) is (field.split(".")[0] in agent_kafka_fields())


def test_probes_and_services_are_on_the_port_each_process_serves(rendered) -> None:
    cfg = toml_config(rendered)
    services = {s["metadata"]["name"]: s for s in of_kind(rendered, "Service")}
    for w in workloads(rendered):
        [c] = w["spec"]["template"]["spec"]["containers"]
        section, field = port_setting(c["args"])
        # The pull exporter's second port: its pull endpoint, the fleet's series.
        pull = [{"name": "pull", "containerPort": cfg["pull"]["port"]}] if c["args"][-1] == "pull" else []
        assert c["ports"] == [{"name": "metrics", "containerPort": cfg[section][field]}, *pull]
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
        assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["KTEL_SERVICE__METRICS_BIND"] == "0.0.0.0"
        assert env["KTEL_CONFIG"] == "/etc/ktel/ktel.toml"
        if w["kind"] == "DaemonSet":
            continue  # (the agents are scraped as pods: PodMonitor)
        svc = services[w["metadata"]["name"]]
        assert svc["spec"]["selector"] == w["spec"]["selector"]["matchLabels"]
        assert svc["spec"]["ports"] == [
            {"name": "metrics", "port": cfg[section][field], "targetPort": "metrics"},
            *({"name": p["name"], "port": p["containerPort"], "targetPort": p["name"]} for p in pull),
        ]
    assert cfg["pull"]["host"] == "0.0.0.0"  # reachable through its Service


def startup_probes(*sets: str) -> dict[str, dict[str, Any]]:
    """Each workload's startup probe, by its name."""
    return {
        w["metadata"]["name"]: w["spec"]["template"]["spec"]["containers"][0]["startupProbe"]
        for w in workloads(render(sets=sets))
    }


def test_the_agents_startup_budget_is_its_own_to_raise() -> None:
    """The agent answers /healthz once BCC compiled every probe, and a pod past its
    startup budget is restarted to compile again: agent.startupProbe raises the agent's
    budget over probes.startup's, leaving the other pods' as they were."""
    default = startup_probes()
    assert {p["periodSeconds"] * p["failureThreshold"] for p in default.values()} == {300}
    raised = startup_probes("agent.startupProbe.failureThreshold=90")
    agent = next(name for name in raised if name.endswith("-agent"))
    assert raised[agent] == {**default[agent], "failureThreshold": 90}
    assert {n: p for n, p in raised.items() if n != agent} == {n: p for n, p in default.items() if n != agent}
    # probes.startup still sets every pod's, the agent's with it unless it has its own.
    shared = startup_probes("probes.startup.failureThreshold=45")
    assert {p["failureThreshold"] for p in shared.values()} == {45}


def test_the_servers_listen_on_every_ipv6_address_where_config_asks(tmp_path, monkeypatch) -> None:
    """An IPv6-only cluster probes and scrapes a pod at its IPv6 address alone: there
    config.service.metrics_bind and config.pull.host take ::, which every pod then
    serves on. The chart's 0.0.0.0 overrode both, so no pod there was ever probed alive."""
    for name in [n for n in os.environ if n.startswith("KTEL_")]:
        monkeypatch.delenv(name)
    objs = render(sets=("config.service.metrics_bind=::", "config.pull.host=::"))
    pods = workloads(objs) + of_kind(objs, "Job")
    assert {w["kind"] for w in pods} == {"DaemonSet", "Deployment", "Job"}
    for w in pods:
        [c] = w["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["KTEL_SERVICE__METRICS_BIND"] == "::", w["metadata"]["name"]
    monkeypatch.setenv("KTEL_SERVICE__METRICS_BIND", "::")
    cfg = config.load(config_file(objs, tmp_path))
    assert (cfg.service.metrics_bind, cfg.pull.host) == ("::", "::")


@pytest.mark.parametrize("field", ["service.metrics_bind", "pull.host"])
@pytest.mark.parametrize("address", ["127.0.0.1", "::1", "10.0.0.7"])
def test_an_address_a_pod_is_not_reached_at_is_refused(field, address) -> None:
    """Loopback is reached from nowhere else, and a pod's own address is not known
    before it runs: either would leave the pods unprobed and unscraped."""
    res = run_helm("template", "ktel", str(CHART), "--set-string", f"config.{field}={address}")
    assert res.returncode != 0
    assert f"config.{field} = {address}: give 0.0.0.0" in res.stderr


def test_default_runs_the_fused_worker_and_every_exporter() -> None:
    objs = render()
    args = sorted(
        tuple(d["spec"]["template"]["spec"]["containers"][0]["args"]) for d in of_kind(objs, "Deployment")
    )
    assert args == [("export", "otlp"), ("export", "pull"), ("export", "remote-write"), ("process", "all")]
    assert not of_kind(objs, "ServiceMonitor")
    assert not of_kind(objs, "PrometheusRule")
    assert [cm["metadata"]["name"] for cm in of_kind(objs, "ConfigMap")] == [
        "ktel-config",
        "ktel-topics-config",
    ]
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    images = {c["image"] for w in workloads(objs) for c in w["spec"]["template"]["spec"]["containers"]}
    assert images == {f"ktel:{app_version}"}  # the tag defaults to the chart's appVersion


def test_the_pull_endpoint_has_the_memory_its_default_bound_takes() -> None:
    """The pull endpoint's series and a scrape of them take up to pull.max_series_bytes
    of its memory (1.25 GiB by default, and at least: one snapshot the wire takes may),
    the process under 200 MiB besides. With the 1 GiB of the other exporters, any writer
    of ktel.metrics filling it killed it, and again each time it read them back."""
    containers = {
        tuple(c["args"]): c
        for d in of_kind(render(), "Deployment")
        for c in d["spec"]["template"]["spec"]["containers"]
    }
    units = {"Mi": 1 << 20, "Gi": 1 << 30}
    resources = containers[("export", "pull")]["resources"]
    limit, request = (
        int(m[:-2]) * units[m[-2:]] for m in (resources[k]["memory"] for k in ("limits", "requests"))
    )
    assert limit > 1.2 * (config.PullConfig().max_series_bytes + (200 << 20))
    # What it was measured to take full (bench/RESULTS.md, "Pull endpoint memory": the
    # series and a scrape up to 1,181 MiB, the process 70 to 100 MiB besides), and its
    # bound: with a request of 256 MiB it was scheduled where that memory was not, and
    # evicted first from a node short of memory.
    assert limit >= request >= config.PullConfig().max_series_bytes + (100 << 20) >= (1181 + 100) << 20
    assert containers[("export", "otlp")]["resources"]["limits"]["memory"] == "1Gi"  # (the others' own)


def enrich_metadata_mounts(objs: list[dict[str, Any]]) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """Each Deployment mounting enrich's metadata file: (its mount, its volume)."""
    out = {}
    for d in of_kind(objs, "Deployment"):
        spec = d["spec"]["template"]["spec"]
        [c] = spec["containers"]
        mounts = [m for m in c["volumeMounts"] if m["name"] == "enrich-metadata"]
        volumes = [v for v in spec["volumes"] if v["name"] == "enrich-metadata"]
        assert len(mounts) == len(volumes) <= 1
        if mounts:
            out[d["metadata"]["name"]] = (mounts[0], volumes[0])
    return out


@pytest.mark.parametrize("source", ["content", "configMap"])
@pytest.mark.parametrize("fused", [True, False])
def test_enrichs_metadata_file_is_mounted_where_enrich_runs(source, fused, tmp_path, monkeypatch) -> None:
    """process.enrichMetadata mounts the file in the workers whose process runs enrich,
    alone, and names it in enrich.metadata_file; with `content`, the chart's own
    ConfigMap holds it as it is, a feed enrich reads whole."""
    from processors.enrich_core import feed_entries, load_metadata

    for name in [n for n in os.environ if n.startswith("KTEL_")]:
        monkeypatch.delenv(name)
    values = yaml.safe_load(FULL.read_text())["process"]["enrichMetadata"]
    feed = tmp_path / "feed.jsonl"
    feed.write_text(values["content"])
    setting = (
        ("--set-file", f"process.enrichMetadata.content={feed}")
        if source == "content"
        else ("--set", "process.enrichMetadata.configMap=cluster-pods")
    )
    res = run_helm("template", "ktel", str(CHART), "--set", f"process.fused={str(fused).lower()}", *setting)
    assert res.returncode == 0, res.stderr
    objs = [d for d in yaml.safe_load_all(res.stdout) if d]
    path = Path(toml_config(objs)["enrich"]["metadata_file"])
    assert config.load(config_file(objs, tmp_path)).enrich.metadata_file == path
    mounts = enrich_metadata_mounts(objs)
    processes = {
        d["metadata"]["name"]: d["spec"]["template"]["spec"]["containers"][0]["args"][1]
        for d in of_kind(objs, "Deployment")
        if d["spec"]["template"]["spec"]["containers"][0]["args"][0] == "process"
    }
    assert set(mounts) == {name for name, p in processes.items() if "enrich" in PROCESSES[p]} != set()
    name = "ktel-enrich-metadata" if source == "content" else "cluster-pods"
    for mount, volume in mounts.values():
        # A directory, never a subPath, which the kubelet would leave as it was when the
        # ConfigMap changes.
        assert mount == {"name": "enrich-metadata", "mountPath": str(path.parent), "readOnly": True}
        assert volume["configMap"] == {"name": name, "items": [{"key": path.name, "path": path.name}]}
    made = [cm for cm in of_kind(objs, "ConfigMap") if cm["metadata"]["name"] == "ktel-enrich-metadata"]
    if source == "content":
        [cm] = made
        assert cm["data"] == {path.name: values["content"]}
        metadata, errors = load_metadata(cm["data"][path.name])
        assert not errors and feed_entries(metadata) == 2
    else:
        assert not made  # (the operator's, which the chart leaves alone)


def test_no_metadata_file_unless_given() -> None:
    objs = render()
    assert "enrich" not in toml_config(objs)
    assert not enrich_metadata_mounts(objs)


def test_a_change_to_the_metadata_file_restarts_no_pod(full) -> None:
    """enrich reads the file again when it changes (processors/enrich_core.py, MetadataFile)
    and the kubelet updates the mounted ConfigMap in place: a restart would only cost the
    workers a rebalance and their tables rebuilt from their changelogs."""
    templates = {w["metadata"]["name"]: w["spec"]["template"] for w in workloads(full)}
    changed = render(FULL, sets=("process.enrichMetadata.content=other",))
    assert {w["metadata"]["name"]: w["spec"]["template"] for w in workloads(changed)} == templates
    [cm] = [cm for cm in of_kind(changed, "ConfigMap") if cm["metadata"]["name"] == "ktel-enrich-metadata"]
    assert cm["data"] == {"metadata.jsonl": "other"}


def test_a_metadata_file_from_both_content_and_a_config_map_is_refused() -> None:
    res = run_helm(
        "template",
        "ktel",
        str(CHART),
        "--set",
        "process.enrichMetadata.content=x",
        "--set",
        "process.enrichMetadata.configMap=cluster-pods",
    )
    assert res.returncode != 0
    assert "process.enrichMetadata: give either content" in res.stderr


# The metadata file given each way process.enrichMetadata takes it.
METADATA_FROM = {
    "content": "process.enrichMetadata.content=x",
    "configMap": "process.enrichMetadata.configMap=pods",
}


def render_metadata_key(source: str, key: str) -> subprocess.CompletedProcess[str]:
    """`helm template` of the chart with the metadata file from ``source`` (a key of
    ``METADATA_FROM``) under ``key``, given as a string."""
    given = METADATA_FROM[source]
    return run_helm(
        "template", "ktel", str(CHART), "--set", given, "--set-string", f"process.enrichMetadata.key={key}"
    )


@pytest.mark.parametrize("source", list(METADATA_FROM))
def test_a_metadata_key_that_reads_as_a_number_is_still_a_string(source) -> None:
    """A key YAML would read as a number or a boolean, written unquoted, made a volume's
    item a number, which Kubernetes refuses."""
    for key in ("2024", "on"):
        res = render_metadata_key(source, key)
        assert res.returncode == 0, res.stderr
        objs = [d for d in yaml.safe_load_all(res.stdout) if d]
        mounts = enrich_metadata_mounts(objs)
        assert mounts
        for _, volume in mounts.values():
            assert volume["configMap"]["items"] == [{"key": key, "path": key}]
        for obj in objs:
            kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)
        made = [cm for cm in of_kind(objs, "ConfigMap") if cm["metadata"]["name"] == "ktel-enrich-metadata"]
        assert [cm["data"] for cm in made] == ([{key: "x"}] if source == "content" else [])


@pytest.mark.parametrize("key", ["", "pods/metadata.jsonl", "..data", ".", "my pods.jsonl", "a" * 254])
def test_a_metadata_key_no_config_map_may_hold_is_refused(key) -> None:
    """Kubernetes would refuse the chart's ConfigMap, or start no worker that runs enrich
    (its item naming a key no ConfigMap holds), with no word of process.enrichMetadata."""
    for source in METADATA_FROM:
        res = render_metadata_key(source, key)
        assert res.returncode != 0
        assert "process.enrichMetadata.key" in res.stderr, res.stderr


def test_full_values_run_each_stage_with_its_replicas(full) -> None:
    values = yaml.safe_load(FULL.read_text())
    by_args = {
        tuple(d["spec"]["template"]["spec"]["containers"][0]["args"]): d for d in of_kind(full, "Deployment")
    }
    stages = {args[1]: d["spec"]["replicas"] for args, d in by_args.items() if args[0] == "process"}
    assert stages == {s: values["process"]["stages"][s]["replicas"] for s in PROCESSES if s != "all"}
    assert by_args[("export", "remote-write")]["spec"]["replicas"] == 3
    image = by_args[("process", "dedupe")]["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == "registry.example.com/ktel:0.1.0-test"


def test_each_deployment_has_a_disruption_budget(rendered) -> None:
    budgets = {p["metadata"]["name"]: p for p in of_kind(rendered, "PodDisruptionBudget")}
    for d in of_kind(rendered, "Deployment"):
        assert budgets[d["metadata"]["name"]]["spec"]["selector"] == d["spec"]["selector"]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_unready_pods_never_block_a_drain_where_kubernetes_allows_it(version) -> None:
    """A pod that never gets ready must not hold a node's drain up: on Kubernetes 1.27 and
    later every budget lets such pods go (unhealthyPodEvictionPolicy); 1.25 and 1.26 get
    budgets without the field, valid there."""
    objs = render(FULL, kube=version)
    budgets = of_kind(objs, "PodDisruptionBudget")
    assert len(budgets) == len(of_kind(objs, "Deployment"))
    for pdb in budgets:
        kubernetes_validate.validate(pdb, version, strict=True)
        policy = pdb["spec"].get("unhealthyPodEvictionPolicy")
        assert policy == (None if version == "1.25.0" else "AlwaysAllow"), pdb["metadata"]["name"]


@pytest.mark.parametrize(
    ("sets", "hint"),
    [
        (("process.replicas=7",), "process.replicas = 7 is more than the 6 partitions of ktel.raw"),
        (
            ("process.fused=false", "process.stages.enrich.replicas=9", "config.kafka.raw_partitions=8"),
            "set process.stages.enrich.replicas to 8 at most, or raise config.kafka.raw_partitions",
        ),
        (
            ("exporters.remoteWrite.replicas=7",),
            "set exporters.remoteWrite.replicas to 6 at most, or raise config.kafka.output_partitions",
        ),
        # Three topics: ktel.spans, ktel.logs and ktel.metrics.
        (("exporters.otlp.replicas=19",), "set exporters.otlp.replicas to 18 at most"),
    ],
)
def test_more_replicas_than_partitions_is_refused_with_the_fix(sets, hint) -> None:
    argv = ["template", "ktel", str(CHART)] + [a for s in sets for a in ("--set", s)]
    res = run_helm(*argv)
    assert res.returncode != 0
    assert hint in res.stderr


def operating_section(title: str) -> str:
    """A section of docs/operating.md, from its heading to the next of its level."""
    text = (ROOT / "docs" / "operating.md").read_text()
    [section] = re.findall(rf"^## {re.escape(title)}\n(.*?)(?=^## )", text, re.M | re.S)
    return section


@pytest.mark.parametrize(
    ("sets", "setting"),
    [
        (("process.replicas=7",), "kafka.raw_partitions"),
        (("exporters.otlp.replicas=19",), "kafka.output_partitions"),
    ],
)
def test_more_replicas_than_partitions_points_to_what_grows_the_topics(sets, setting) -> None:
    """`ktel topics`, the topics Job, creates a topic but grows none that exists (ktel/topics.py:
    it names the topic and exits 1). The refusal said to raise the setting "and run `ktel
    topics`", which over existing topics failed the upgrade in the Job: it now says so and
    points to docs/operating.md's steps, which grow every topic the setting sizes with
    Kafka's own tool (and, for ktel.raw's, every stage's table changelog)."""
    res = run_helm("template", "ktel", str(CHART), *(a for s in sets for a in ("--set", s)))
    assert res.returncode != 0
    assert f"or raise config.{setting}: the topics Job creates topics with it, but grows none" in res.stderr
    assert 'grow them first, as docs/operating.md says ("Adding partitions")' in res.stderr
    section = operating_section("Adding partitions")
    assert f"**`{setting}`**" in section and "--alter --topic" in section
    sized = [s.name for s in topics.specs(config.Config()) if s.setting == setting]
    assert sized and all(f"`{name}`" in section for name in sized), sized
    if setting == "kafka.raw_partitions":  # the stages keeping a table: their changelogs too
        for stage in ("all", "dedupe", "enrich", "aggregate"):
            assert f"`{changelog_topic(config.Config().kafka.topics, stage)}`" in section


def test_replicas_up_to_the_partitions_are_accepted() -> None:
    defaults = config.KafkaConfig()  # the chart assumes ktel's own defaults
    objs = render(
        sets=(
            f"process.replicas={defaults.raw_partitions}",
            f"exporters.remoteWrite.replicas={defaults.output_partitions}",
            f"exporters.otlp.replicas={3 * defaults.output_partitions}",
            # No consumer group: each pull endpoint reads every partition.
            f"exporters.pull.replicas={defaults.output_partitions + 1}",
        )
    )
    replicas = {d["metadata"]["name"]: d["spec"]["replicas"] for d in of_kind(objs, "Deployment")}
    assert replicas == {
        "ktel-process-all": defaults.raw_partitions,
        "ktel-export-remote-write": defaults.output_partitions,
        "ktel-export-otlp": 3 * defaults.output_partitions,
        "ktel-export-pull": defaults.output_partitions + 1,
    }
    full = render(FULL, sets=("process.stages.aggregate.replicas=12",))  # raw_partitions: 12
    assert 12 in [d["spec"]["replicas"] for d in of_kind(full, "Deployment")]


# Kubernetes' rules: an object's name (RFC 1123 label: Services' are one; 63 at most), a
# label's value (63 at most).
DNS_LABEL = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")
LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?")


@pytest.mark.parametrize("values", [[], ["-f", str(FULL)]], ids=["default", "full"])
def test_names_and_labels_stay_valid_with_the_longest_release_name(values) -> None:
    release = "telemetry-" + "x" * 42 + "a"  # 53: the longest name helm accepts
    enable = ("serviceMonitor", "prometheusRule", "dashboards")
    res = run_helm(
        "template", release, str(CHART), *values, *(a for e in enable for a in ("--set", f"{e}.enabled=true"))
    )
    assert res.returncode == 0, res.stderr
    objs = [d for d in yaml.safe_load_all(res.stdout) if d]
    names = [o["metadata"]["name"] for o in objs]
    assert any(n.endswith("-export-remote-write") for n in names)  # the longest suffix is there
    assert len({(o["kind"], o["metadata"]["name"]) for o in objs}) == len(objs)  # none collide
    for obj in objs:
        name = obj["metadata"]["name"]
        assert len(name) <= 63 and DNS_LABEL.fullmatch(name), name
        pod_labels = obj.get("spec", {}).get("template", {}).get("metadata", {}).get("labels", {})
        for value in [*obj["metadata"]["labels"].values(), *pod_labels.values()]:
            assert LABEL_VALUE.fullmatch(str(value)), (name, value)


# full-values.yaml's scrape job: interval, scrapeTimeout, honorLabels.
FULL_SCRAPE = {"interval": "15s", "scrapeTimeout": "10s", "honorLabels": True}


def test_the_service_monitor_scrapes_every_service_and_the_pod_monitor_every_agent(full) -> None:
    """The agents are found as pods: a Service's endpoints hold at most 1,000 of them, and
    the ServiceMonitor would have scraped no more of a larger fleet's agents."""
    [sm] = of_kind(full, "ServiceMonitor")
    assert sm["metadata"]["labels"]["release"] == "prometheus"
    assert sm["spec"]["endpoints"] == [{"port": "metrics", **FULL_SCRAPE}]
    # A worker holding thousands of hosts serves hundreds of thousands of samples
    # (docs/operating.md): the limit is the operator's to size.
    assert sm["spec"]["sampleLimit"] == 600000
    services = of_kind(full, "Service")
    assert {s["metadata"]["name"] for s in services} == {
        d["metadata"]["name"] for d in of_kind(full, "Deployment")
    }
    for svc in services:
        assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
        extra = ["pull"] if svc["metadata"]["name"] == "ktel-export-pull" else []
        assert [p["name"] for p in svc["spec"]["ports"]] == ["metrics", *extra]
    [pm] = of_kind(full, "PodMonitor")
    assert pm["metadata"]["labels"]["release"] == "prometheus"
    assert pm["spec"]["podMetricsEndpoints"] == [{"port": "metrics", **FULL_SCRAPE}]
    assert pm["spec"]["sampleLimit"] == 600000
    agent = the_agent(full)["spec"]["template"]
    assert pm["spec"]["selector"]["matchLabels"].items() <= agent["metadata"]["labels"].items()
    assert [p["name"] for p in agent["spec"]["containers"][0]["ports"]] == ["metrics"]
    for other in of_kind(full, "Deployment"):
        assert (
            not pm["spec"]["selector"]["matchLabels"].items()
            <= other["spec"]["template"]["metadata"]["labels"].items()
        )
    assert not of_kind(render(FULL, sets=("agent.enabled=false",)), "PodMonitor")


def test_the_service_monitor_scrapes_the_fleets_series_only_when_asked(full) -> None:
    """By default only self-metrics: the kernel series remote-write sends are not scraped
    from the pull endpoint a second time."""
    cfg = toml_config(full)
    services = {s["metadata"]["name"]: s for s in of_kind(full, "Service")}
    by_port = {p["name"]: p["port"] for p in services["ktel-export-pull"]["spec"]["ports"]}
    assert by_port == {"metrics": cfg["pull"]["metrics_port"], "pull": cfg["pull"]["port"]}
    assert cfg["pull"]["metrics_port"] != cfg["pull"]["port"]
    [sm] = of_kind(full, "ServiceMonitor")
    assert [e["port"] for e in sm["spec"]["endpoints"]] == ["metrics"]
    sets = ("serviceMonitor.scrapePullEndpoint=true", "exporters.pull.replicas=1")
    [sm] = of_kind(render(FULL, sets=sets), "ServiceMonitor")
    assert sm["spec"]["endpoints"] == [{"port": "metrics", **FULL_SCRAPE}, {"port": "pull", **FULL_SCRAPE}]


def test_scraping_the_pull_endpoint_of_more_than_one_replica_is_refused(full) -> None:
    """Each pull replica serves every series of the fleet, and Prometheus scrapes each pod
    behind the Service: with full values' two, every kernel series was stored twice, apart
    by their instance and pod labels, and every sum over them (the dashboards' files
    created, KtelOomKills) counted it twice."""
    [pull] = [d for d in of_kind(full, "Deployment") if d["metadata"]["name"] == "ktel-export-pull"]
    assert pull["spec"]["replicas"] == 2
    res = run_helm(
        "template", "ktel", str(CHART), "-f", str(FULL), "--set", "serviceMonitor.scrapePullEndpoint=true"
    )
    assert res.returncode != 0
    assert (
        "serviceMonitor.scrapePullEndpoint with exporters.pull.replicas = 2: each pull endpoint" in res.stderr
    )
    assert "set exporters.pull.replicas to 1 with it" in res.stderr
    # Without the pull endpoint's scrape, or without the pull endpoint, its replicas are the
    # endpoint's users' (copies behind its Service).
    render(FULL)
    render(FULL, sets=("serviceMonitor.scrapePullEndpoint=true", "exporters.pull.enabled=false"))


def test_the_service_monitor_leaves_what_is_unset_to_prometheus() -> None:
    """Unset, the scrape timeout and sample limit are Prometheus' own (the ServiceMonitor
    does not name them), and so is the interval once emptied."""
    [sm] = of_kind(render(sets=("serviceMonitor.enabled=true",)), "ServiceMonitor")
    assert sm["spec"]["endpoints"] == [{"port": "metrics", "interval": "30s", "honorLabels": True}]
    assert "sampleLimit" not in sm["spec"]
    sets = (
        "serviceMonitor.enabled=true",
        "serviceMonitor.interval=",
        "serviceMonitor.scrapePullEndpoint=true",
    )
    [sm] = of_kind(render(sets=sets), "ServiceMonitor")
    assert sm["spec"]["endpoints"] == [
        {"port": "metrics", "honorLabels": True},
        {"port": "pull", "honorLabels": True},
    ]


@pytest.mark.parametrize(
    ("timeout", "interval"), [("30s", "30s"), ("1m30s", "2m"), ("500ms", "1s"), ("59m59s", "1h")]
)
def test_a_scrape_timeout_up_to_the_interval_is_accepted(timeout, interval) -> None:
    sets = ("serviceMonitor.enabled=true", f"serviceMonitor.interval={interval}")
    [sm] = of_kind(render(sets=(*sets, f"serviceMonitor.scrapeTimeout={timeout}")), "ServiceMonitor")
    assert sm["spec"]["endpoints"][0]["scrapeTimeout"] == timeout


@pytest.mark.parametrize(
    ("timeout", "interval", "hint"),
    [
        # Prometheus refuses a scrape job whose timeout is longer than its interval.
        ("1m", "30s", "serviceMonitor.scrapeTimeout = 1m is longer than serviceMonitor.interval = 30s"),
        ("30500ms", "30s", "serviceMonitor.scrapeTimeout = 30500ms is longer than"),
        ("1h", "59m59s", "serviceMonitor.scrapeTimeout = 1h is longer than"),
        ("30", "1m", "serviceMonitor.scrapeTimeout = 30 is not a Prometheus duration"),
        ("10s", "1.5m", "serviceMonitor.interval = 1.5m is not a Prometheus duration"),
    ],
)
def test_a_scrape_timeout_past_the_interval_is_refused(timeout, interval, hint) -> None:
    res = run_helm(
        "template",
        "ktel",
        str(CHART),
        "--set",
        "serviceMonitor.enabled=true",
        "--set",
        f"serviceMonitor.interval={interval}",
        "--set",
        f"serviceMonitor.scrapeTimeout={timeout}",
    )
    assert res.returncode != 0
    assert hint in res.stderr


def test_the_prometheus_rule_holds_ktels_rules_as_they_are(full) -> None:
    """The PrometheusRule's groups are deploy/prometheus/ktel-rules.yml's, the file
    promtool tests and the local Prometheus loads, with the alerts' own templates
    ({{ $labels.host_id }}) left for Prometheus, not taken by helm."""
    [rule] = of_kind(full, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["spec"] == {"groups": yaml.safe_load(RULES.read_text())["groups"]}
    assert "{{ $labels.host_id }}" in json.dumps(rule["spec"])
    # What the Prometheus object's ruleSelector asks for (full-values.yaml's).
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_the_agent_down_alert_finds_the_chart_s_agent_pod(full) -> None:
    """KtelAgentDown names the agent's pod by the DaemonSet's selector labels (but the
    release's, which the alert cannot know) on the node whose machine ID the host id is,
    the one the chart mounts as the agent's /etc/machine-id: the way to look on
    Kubernetes, next to the systemd unit's."""
    [alert] = [
        r
        for g in yaml.safe_load(RULES.read_text())["groups"]
        for r in g["rules"]
        if r.get("alert") == "KtelAgentDown"
    ]
    description = " ".join(alert["annotations"]["description"].split())
    labels = the_agent(full)["spec"]["selector"]["matchLabels"]
    selector = ",".join(f"{k}={v}" for k, v in labels.items() if k != "app.kubernetes.io/instance")
    assert f"kubectl get pods -A -l {selector} --field-selector spec.nodeName=" in description
    assert ".status.nodeInfo.machineID | grep {{ $labels.host_id }}" in description
    assert "systemctl status ktel-agent" in description
    [volume] = [
        v for v in the_agent(full)["spec"]["template"]["spec"]["volumes"] if v["name"] == "machine-id"
    ]
    assert volume["hostPath"]["path"] == "/etc/machine-id"


def test_the_dashboards_config_map_holds_each_dashboard_as_it_is(full) -> None:
    """One key per dashboard of deploy/grafana/dashboards, its JSON unchanged, labelled
    for Grafana's dashboard sidecar and annotated as full-values.yaml asks."""
    cm = dashboards_config_map(full)
    assert cm["data"] == {path.name: path.read_text() for path in DASHBOARDS}
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "ktel"}
    # Kubernetes refuses a ConfigMap whose data passes 1 MiB (the schema does not say so).
    assert sum(len(v.encode()) for v in cm["data"].values()) < 1 << 20


def test_the_dashboards_carry_the_sidecars_default_label_and_string_values() -> None:
    [cm] = [
        o
        for o in of_kind(render(sets=("dashboards.enabled=true",)), "ConfigMap")
        if "ktel.toml" not in o["data"]
    ]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"  # the sidecar's default label
    assert "annotations" not in cm["metadata"]
    # A label or annotation given as a number (--set) is a string all the same: Kubernetes
    # refuses any other.
    objs = render(
        sets=(
            "dashboards.enabled=true",
            "dashboards.labels.grafana_dashboard=1",
            "dashboards.annotations.x=2",
        )
    )
    cm = dashboards_config_map(objs)
    assert (cm["metadata"]["labels"]["grafana_dashboard"], cm["metadata"]["annotations"]["x"]) == ("1", "2")
    kubernetes_validate.validate(cm, kubernetes_validate.latest_version(), strict=True)


@pytest.mark.parametrize(
    ("value", "kind"), [("serviceMonitor", "ServiceMonitor"), ("prometheusRule", "PrometheusRule")]
)
def test_the_labels_a_selector_asks_for_are_strings(value, kind) -> None:
    """The labels a Prometheus object's serviceMonitorSelector or ruleSelector asks for,
    given as a number or boolean (--set), are strings all the same: Kubernetes refuses
    any other in an object's metadata, which is every object's (the Operator's CRDs' too)."""
    sets = (f"{value}.enabled=true", f"{value}.labels.tier=1", f"{value}.labels.team=true")
    [obj] = of_kind(render(sets=sets), kind)
    assert {k: obj["metadata"]["labels"][k] for k in ("tier", "team")} == {"tier": "1", "team": "true"}
    meta = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj["metadata"]}
    kubernetes_validate.validate(meta, kubernetes_validate.latest_version(), strict=True)


def test_pod_labels_and_annotations_are_strings() -> None:
    """podLabels and podAnnotations given as a number or boolean (--set) are strings all
    the same, in every pod the chart makes: Kubernetes refuses any other, and a DaemonSet,
    Deployment or Job with one fails the whole install."""
    objs = render(sets=("podLabels.tier=1", "podAnnotations.team=true", "podAnnotations.cost=2"))
    pods = workloads(objs) + of_kind(objs, "Job")
    assert {w["kind"] for w in pods} == {"DaemonSet", "Deployment", "Job"}
    for w in pods:
        meta = w["spec"]["template"]["metadata"]
        assert meta["labels"]["tier"] == "1"
        assert {k: meta["annotations"][k] for k in ("team", "cost")} == {"team": "true", "cost": "2"}
        kubernetes_validate.validate(w, kubernetes_validate.latest_version(), strict=True)


def test_the_packaged_chart_carries_the_rules_and_dashboards(tmp_path) -> None:
    """`helm package` copies what the chart's links point to: the archive installs
    without the repository around it."""
    res = run_helm("package", str(CHART), "-d", str(tmp_path))
    assert res.returncode == 0, res.stderr
    [archive] = tmp_path.glob("ktel-*.tgz")
    argv = [
        "template",
        "ktel",
        str(archive),
        "--set",
        "prometheusRule.enabled=true",
        "--set",
        "dashboards.enabled=true",
    ]
    res = run_helm(*argv)
    assert res.returncode == 0, res.stderr
    objs = [d for d in yaml.safe_load_all(res.stdout) if d]
    [rule] = of_kind(objs, "PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]
    assert dashboards_config_map(objs)["data"] == {path.name: path.read_text() for path in DASHBOARDS}


@pytest.mark.parametrize(
    ("value", "left_out", "hint"),
    [
        (
            "prometheusRule",
            "ktel-rules.yml",
            "files/ktel-rules.yml (a link to deploy/prometheus/ktel-rules.yml) holds no rule groups",
        ),
        (
            "dashboards",
            "dashboards",
            "files/dashboards (a link to deploy/grafana/dashboards) holds no dashboard",
        ),
    ],
)
def test_a_chart_copied_without_what_its_links_point_to_is_refused(tmp_path, value, left_out, hint) -> None:
    """A copy of the chart's directory alone (the links left dangling) renders no empty
    PrometheusRule or ConfigMap: helm says what is missing."""
    copy = tmp_path / "ktel"
    shutil.copytree(CHART, copy, ignore=lambda _dir, names: [n for n in names if n == left_out])
    res = run_helm("template", "ktel", str(copy), "--set", f"{value}.enabled=true")
    assert res.returncode != 0
    assert hint in res.stderr


def test_secrets_come_from_secrets_never_the_config_map(full) -> None:
    for cm in of_kind(full, "ConfigMap"):  # the release's, the topics hook's copy, the dashboards
        text = "".join(cm["data"].values())
        assert "password =" not in text and "headers" not in text
    cfg = toml_config(full)
    assert cfg["kafka"]["sasl_password_file"] == f"{SECRETS_DIR}/kafka/password"
    by_name = {
        d["metadata"]["name"].removeprefix("ktel-"): d["spec"]["template"]["spec"]
        for d in workloads(full) + of_kind(full, "Job")
    }
    for name, pod in by_name.items():
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["kafka-sasl"]["secret"]["secretName"] == "ktel-kafka"
        assert volumes["kafka-tls"]["secret"]["secretName"] == "ktel-kafka-tls"
        [c] = pod["containers"]
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert mounts[f"{SECRETS_DIR}/kafka"] == "kafka-sasl"
        from_secrets = {
            e["name"]: e["valueFrom"] for e in c["env"] if "secretKeyRef" in e.get("valueFrom", {})
        }
        assert from_secrets == {
            "export-otlp": {"KTEL_OTLP__HEADERS": {"secretKeyRef": {"name": "ktel-otlp", "key": "headers"}}},
            "export-remote-write": {
                "KTEL_REMOTE_WRITE__HEADERS": {
                    "secretKeyRef": {"name": "ktel-remote-write-headers", "key": "headers"}
                }
            },
        }.get(name, {}), name
        has_rw = any(v.get("secret", {}).get("secretName") == "ktel-remote-write" for v in volumes.values())
        assert has_rw == (name == "export-remote-write")
        has_otlp = any(v.get("secret", {}).get("secretName") == "ktel-otlp-token" for v in volumes.values())
        assert has_otlp == (name == "export-otlp")
        if has_otlp:
            assert mounts["/etc/ktel/secrets/otlp"] == "otlp-credentials"


def kafka_identity(pod: dict[str, Any]) -> tuple[str | None, dict[str, Any] | None]:
    """A pod's SASL user from its environment, and its Kafka password's Secret volume."""
    [c] = pod["containers"]
    users = [e["value"] for e in c["env"] if e["name"] == "KTEL_KAFKA__SASL_USERNAME"]
    [volume] = [v["secret"] for v in pod["volumes"] if v["name"] == "kafka-sasl"] or [None]
    if volume:
        assert {m["name"]: m["mountPath"] for m in c["volumeMounts"]}["kafka-sasl"] == f"{SECRETS_DIR}/kafka"
    return (users[0] if users else None), volume


def test_each_role_can_have_its_own_kafka_identity() -> None:
    """`ktel acls` grants a principal per role: the agent, the processors and the exporters
    each log in as their own user, with their own password, where kafkaIdentities says."""
    assert "sasl_username" in config.KafkaConfig.model_fields  # what KTEL_KAFKA__SASL_USERNAME sets
    objs = render(
        FULL,
        sets=(
            "kafkaIdentities.agent.saslUsername=ktel-node",
            "kafkaIdentities.agent.secretName=ktel-kafka-agent",
            "kafkaIdentities.agent.key=pw",
            "kafkaIdentities.exporter.saslUsername=ktel-exporter",
        ),
    )
    password = toml_config(objs)["kafka"]["sasl_password_file"]
    assert password == f"{SECRETS_DIR}/kafka/password"
    shared = {
        "secretName": "ktel-kafka",
        "items": [{"key": "password", "path": "password"}],
        "defaultMode": 0o400,
    }
    for w in workloads(objs):
        user, volume = kafka_identity(w["spec"]["template"]["spec"])
        role = w["metadata"]["name"].removeprefix("ktel-").split("-")[0]
        if role == "agent":
            assert (user, volume) == (
                "ktel-node",
                {
                    "secretName": "ktel-kafka-agent",
                    "items": [{"key": "pw", "path": "password"}],
                    "defaultMode": 0o400,
                },
            )
        elif role == "process":
            assert (user, volume) == (None, shared)  # config.kafka.sasl_username and the shared Secret
        else:
            assert (user, volume) == ("ktel-exporter", shared), w["metadata"]["name"]


def test_kafka_identities_without_a_shared_password_need_one_for_every_role() -> None:
    roles = ("agent", "processor", "exporter", "admin")
    objs = render(sets=tuple(f"kafkaIdentities.{r}.secretName=ktel-kafka-{r}" for r in roles))
    assert toml_config(objs)["kafka"]["sasl_password_file"] == f"{SECRETS_DIR}/kafka/password"
    for w in workloads(objs) + of_kind(objs, "Job"):
        _, volume = kafka_identity(w["spec"]["template"]["spec"])
        role = (
            "agent"
            if w["kind"] == "DaemonSet"
            else "admin"
            if w["kind"] == "Job"
            else "processor"
            if "process" in w["metadata"]["name"]
            else "exporter"
        )
        assert volume and volume["secretName"] == f"ktel-kafka-{role}"
    res = run_helm(
        "template", "ktel", str(CHART), "--set", "kafkaIdentities.agent.secretName=ktel-kafka-agent"
    )
    assert res.returncode != 0
    assert "agent have a password Secret and admin, exporter, processor none" in res.stderr
    assert "give every role the release runs its secretName, or set secrets.kafkaSaslPassword" in res.stderr


@pytest.mark.parametrize(
    ("off", "roles"),
    [
        # Topics created beforehand (`ktel topics`): no admin runs.
        ("topicsJob.enabled=false", ("agent", "processor", "exporter")),
        ("agent.enabled=false", ("processor", "exporter", "admin")),
    ],
)
def test_a_role_the_release_does_not_run_needs_no_password(off, roles, tmp_path, monkeypatch) -> None:
    """Without a shared password, only the roles whose pods the release runs need their
    own: with topicsJob off, the admin's was demanded though nothing logs in as it."""
    for name in [n for n in os.environ if n.startswith("KTEL_")]:
        monkeypatch.delenv(name)
    objs = render(
        sets=(
            off,
            "config.kafka.security_protocol=SASL_SSL",
            "config.kafka.sasl_username=ktel",
            *(f"kafkaIdentities.{r}.secretName=ktel-kafka-{r}" for r in roles),
        )
    )
    pods = workloads(objs) + of_kind(objs, "Job")
    assert pods
    for w in pods:
        _, volume = kafka_identity(w["spec"]["template"]["spec"])
        assert volume and volume["secretName"] in {f"ktel-kafka-{r}" for r in roles}, w["metadata"]["name"]
    assert config.load(config_file(objs, tmp_path)).kafka.password() == "x"


@pytest.mark.parametrize(
    ("protocol", "off", "roles"),
    [
        ("SASL_SSL", None, "admin, agent, exporter, processor"),
        ("SASL_PLAINTEXT", "topicsJob.enabled=false", "agent, exporter, processor"),
        ("SASL_SSL", "agent.enabled=false", "admin, exporter, processor"),
    ],
)
def test_a_sasl_login_without_a_password_secret_is_refused(
    protocol, off, roles, tmp_path, monkeypatch
) -> None:
    """The pods get the Kafka password from a Secret alone (the chart sets no
    KTEL_KAFKA__SASL_PASSWORD): without secrets.kafkaSaslPassword or a Secret of each
    running role's, the release installed and every pod stopped at start, ktel refusing
    its config for want of a password no value of the chart could give."""
    for name in [n for n in os.environ if n.startswith("KTEL_")]:
        monkeypatch.delenv(name)
    sets = ("config.kafka.sasl_username=ktel", *([off] if off else []))
    sasl = (*sets, f"config.kafka.security_protocol={protocol}")
    res = run_helm("template", "ktel", str(CHART), *(a for s in sasl for a in ("--set", s)))
    assert res.returncode != 0
    assert f"config.kafka.security_protocol = {protocol} logs in with a password" in res.stderr
    assert "set secrets.kafkaSaslPassword (secretName, key), shared by every role, or " in res.stderr
    assert f"kafkaIdentities.<role>.secretName for each role the release runs ({roles})" in res.stderr
    # What the pods met instead: ktel's own refusal, of a setting the chart cannot give.
    path = config_file(render(sets=(*sets, "config.kafka.security_protocol=SSL")), tmp_path)
    path.write_text(path.read_text().replace('"SSL"', f'"{protocol}"'))
    with pytest.raises(
        config.ConfigError, match=r"\(KTEL_KAFKA__SASL_PASSWORD\) and kafka.sasl_password_file"
    ):
        config.load(path)
    # Either Secret is the way: the shared one, or every running role's own.
    render(sets=(*sasl, "secrets.kafkaSaslPassword.secretName=ktel-kafka"))
    render(sets=(*sasl, *(f"kafkaIdentities.{r}.secretName=ktel-kafka-{r}" for r in roles.split(", "))))


def test_ktel_topics_runs_before_every_install_and_upgrade_with_the_releases_config(full) -> None:
    """`helm install` alone gives the workers and exporters their topics: a hook Job runs
    `ktel topics` first, as the admin identity, reading a ConfigMap made before it (hook
    weight) that holds the release's own ktel.toml."""
    [job] = of_kind(full, "Job")
    [cm] = [o for o in hooks(full) if o["kind"] == "ConfigMap"]
    annotations = {o["kind"]: o["metadata"]["annotations"] for o in (job, cm)}
    for kind in ("Job", "ConfigMap"):
        assert annotations[kind]["helm.sh/hook"] == "pre-install,pre-upgrade"
        assert annotations[kind]["helm.sh/hook-delete-policy"] == "before-hook-creation"
    assert int(annotations["ConfigMap"]["helm.sh/hook-weight"]) < int(
        annotations["Job"]["helm.sh/hook-weight"]
    )
    assert cm["data"] == config_map(full)["data"]
    pod = job["spec"]["template"]["spec"]
    [c] = pod["containers"]
    assert c["args"] == ["topics"] and pod["restartPolicy"] == "Never"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["config"]["configMap"]["name"] == cm["metadata"]["name"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["KTEL_CONFIG"] == "/etc/ktel/ktel.toml"
    assert {m["name"]: m["mountPath"] for m in c["volumeMounts"]}["config"] == "/etc/ktel/ktel.toml"
    # So it creates the topics as the workers expect them (full values: 12 raw partitions;
    # that the release's ktel.toml loads, test_the_rendered_config_loads_with_ktels_own_loader).
    assert tomllib.loads(cm["data"]["ktel.toml"])["kafka"]["raw_partitions"] == 12

    objs = render(FULL, sets=("kafkaIdentities.admin.saslUsername=ktel-admin",))
    [job] = of_kind(objs, "Job")
    user, _volume = kafka_identity(job["spec"]["template"]["spec"])
    assert user == "ktel-admin"
    assert of_kind(render(sets=("topicsJob.enabled=false",)), "Job") == []


# Every field ktel/config.py marks SECRET (`ktel config` masks it), and the value of the
# chart's `secrets` that gives it instead of the ConfigMap.
SECRET_FIELDS = {
    "kafka.sasl_password": "secrets.kafkaSaslPassword",
    "remote_write.basic_auth_password": "secrets.remoteWrite",
    "remote_write.headers": "secrets.remoteWriteHeaders",
    "otlp.headers": "secrets.otlpHeaders",
}
SECRET = "hunter2-token"


def test_the_chart_knows_every_secret_field_of_ktels_config() -> None:
    marked = {
        f"{section}.{name}"
        for section, model in config.Config.model_fields.items()
        for name, field in (model.annotation.model_fields.items() if model.annotation else [])
        if field.json_schema_extra == config.SECRET
    }
    assert marked == set(SECRET_FIELDS)


@pytest.mark.parametrize("field", SECRET_FIELDS)
def test_a_secret_in_config_is_refused_with_where_it_goes(field) -> None:
    section, name = field.split(".")
    annotation = config.Config.model_fields[section].annotation
    assert annotation is not None
    is_map = "dict" in str(annotation.model_fields[name].annotation)
    value = {"x-api-key": SECRET} if is_map else SECRET
    res = run_helm("template", "ktel", str(CHART), "--set-json", f"config.{field}={json.dumps(value)}")
    assert res.returncode != 0
    assert f"config.{field} (" in res.stderr
    assert "goes in a Secret, not in the ConfigMap" in res.stderr
    assert f": {SECRET_FIELDS[field]}, " in res.stderr
    assert SECRET not in res.stderr


def test_a_host_id_in_config_is_refused() -> None:
    """Every node's agent reads the one ConfigMap: an agent.host_id there made every node
    the same host (processors/dedupe_core.py counts host conflicts), their series,
    heartbeats and processes one host's."""
    res = run_helm("template", "ktel", str(CHART), "--set-string", "config.agent.host_id=3f2a9c")
    assert res.returncode != 0
    assert "config.agent.host_id = 3f2a9c names one host, and every node's agent reads" in res.stderr
    assert "/etc/machine-id" in res.stderr


def test_a_host_name_in_config_is_refused() -> None:
    """The DaemonSet gives each agent its node's name (KTEL_AGENT__HOST_NAME from
    spec.nodeName), over any agent.host_name in the one ConfigMap: one given there was
    silently never used."""
    res = run_helm("template", "ktel", str(CHART), "--set-string", "config.agent.host_name=node-7")
    assert res.returncode != 0
    assert "config.agent.host_name = node-7 would name every node alike" in res.stderr
    assert "spec.nodeName" in res.stderr
    assert "leave it unset" in res.stderr


def test_a_malformed_section_in_config_is_refused_with_the_fix() -> None:
    res = run_helm("template", "ktel", str(CHART), "--set", "config.kafka=oops")
    assert res.returncode != 0
    assert "every entry of config is a section" in res.stderr


def test_the_headers_from_secrets_are_the_settings_ktel_reads(full, tmp_path, monkeypatch) -> None:
    """What each exporter gets from a Secret as an environment variable sets the field the
    chart refuses in the ConfigMap."""
    for name in [n for n in os.environ if n.startswith("KTEL_")]:
        monkeypatch.delenv(name)
    given = {"x-api-key": SECRET}
    names = set()
    for d in of_kind(full, "Deployment"):
        [c] = d["spec"]["template"]["spec"]["containers"]
        for e in c["env"]:
            if "secretKeyRef" in e.get("valueFrom", {}):
                names.add(e["name"])
                monkeypatch.setenv(e["name"], json.dumps(given))
    assert names == {"KTEL_OTLP__HEADERS", "KTEL_REMOTE_WRITE__HEADERS"}
    cfg = config.load(config_file(full, tmp_path))
    assert cfg.otlp.headers == given
    assert cfg.remote_write.headers == given


def test_the_remote_write_password_comes_from_its_secret_as_a_file(tmp_path, monkeypatch) -> None:
    """What the refusal of remote_write.basic_auth_password points at: secrets.remoteWrite
    mounted in the remote-write exporter, where basic_auth_password_file names a key of it."""
    for name in [n for n in os.environ if n.startswith("KTEL_")]:
        monkeypatch.delenv(name)
    mount = f"{SECRETS_DIR}/remote-write"
    objs = render(
        sets=(
            "secrets.remoteWrite.secretName=ktel-remote-write",
            "config.remote_write.basic_auth_username=ktel",
            f"config.remote_write.basic_auth_password_file={mount}/password",
        )
    )
    [d] = [d for d in of_kind(objs, "Deployment") if d["metadata"]["name"] == "ktel-export-remote-write"]
    pod = d["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    [c] = pod["containers"]
    [volume] = [volumes[m["name"]] for m in c["volumeMounts"] if m["mountPath"] == mount]
    assert volume["secret"]["secretName"] == "ktel-remote-write"
    path = config_file(objs, tmp_path)
    (tmp_path / "secrets" / "remote-write").mkdir(parents=True)
    (tmp_path / "secrets" / "remote-write" / "password").write_text(SECRET + "\n")
    assert config.load(path).remote_write.password() == SECRET


def test_the_rendered_config_loads_with_ktels_own_loader(rendered, tmp_path, monkeypatch) -> None:
    for name in [n for n in os.environ if n.startswith("KTEL_")]:
        monkeypatch.delenv(name)
    path = config_file(rendered, tmp_path)
    text = path.read_text()
    cfg = config.load(path)
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert cfg.agent.metrics_port == values["ports"]["agent"]
    assert cfg.pull.port == values["ports"]["pull"]
    assert cfg.process.data_dir == Path("/var/lib/ktel/processor")
    if "sasl_password_file" in text:
        assert cfg.kafka.security_protocol == "SASL_SSL"
        assert cfg.kafka.password() == "x"
        assert cfg.aggregate.window_seconds == 15
        assert cfg.agent.redact[0].replacement == "/home/***"
        assert cfg.agent.sample_every == {"syscall_latency": 10}
    else:
        assert cfg.kafka.bootstrap == values["config"]["kafka"]["bootstrap"]

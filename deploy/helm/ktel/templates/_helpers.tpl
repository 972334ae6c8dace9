{{/*
Names and labels. The fullname is cut to 43 characters: with the longest suffix the
chart adds, "-export-remote-write" (20), a name stays within Kubernetes' 63.
*/}}
{{- define "ktel.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 43 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 43 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "ktel.selectorLabels" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "ktel.labels" -}}
{{ include "ktel.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
{{- end -}}

{{/*
Labels or annotations a user gives (a map), every value a string: Kubernetes takes no
other, and a number or boolean in values (`--set x=1` gives a number) would make the
object invalid.
*/}}
{{- define "ktel.stringMap" -}}
{{- range $key, $value := . }}
{{ $key | quote }}: {{ toString $value | quote }}
{{- end }}
{{- end -}}

{{/*
A pod's nodeSelector: the nodes a value (a map) selects, of the Linux ones alone. ktel
runs on Linux only, and the agent tolerates every taint: in a cluster with Windows nodes
its pods landed on them, never started, and held every rollout of the DaemonSet up there
(an unavailable pod takes maxUnavailable's one place).
*/}}
{{- define "ktel.nodeSelector" -}}
nodeSelector:
  {{- include "ktel.stringMap" (merge (deepCopy (. | default dict)) (dict "kubernetes.io/os" "linux")) | trim | nindent 2 }}
{{- end -}}

{{/*
Where a pod may run, from its values (agent, process, exporters, topicsJob): the Linux
nodes its nodeSelector selects (ktel.nodeSelector), the taints its tolerations allow, and
its priorityClassName (unset: the cluster's default), which lets the scheduler make room
for it on a full node.
*/}}
{{- define "ktel.placement" -}}
{{ include "ktel.nodeSelector" .nodeSelector }}
{{- with .tolerations }}
tolerations: {{ toYaml . | nindent 2 }}
{{- end }}
{{- with .priorityClassName }}
priorityClassName: {{ . | quote }}
{{- end }}
{{- end -}}

{{- define "ktel.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/*
ktel's configuration: the user's `config` with what the chart decides laid over it
(the ports the probes and Services use, where the volumes are mounted).
*/}}
{{- define "ktel.config" -}}
{{- $v := .Values -}}
{{- $forced := dict
  "agent" (dict "metrics_port" $v.ports.agent "state_dir" "/var/lib/ktel/agent" "cgroup_root" "/host/sys/fs/cgroup")
  "process" (dict "metrics_port" $v.ports.process "data_dir" "/var/lib/ktel/processor")
  "remote_write" (dict "metrics_port" $v.ports.remoteWrite)
  "otlp" (dict "metrics_port" $v.ports.otlp)
  "pull" (dict "port" $v.ports.pull "metrics_port" $v.ports.pullMetrics "host" (include "ktel.listenAddress" (dict "root" . "field" "pull.host")))
-}}
{{- /* The roles whose pods this release runs: a role it does not run (the admin's with
topicsJob off) needs no password. */ -}}
{{- $exporters := or $v.exporters.remoteWrite.enabled $v.exporters.otlp.enabled $v.exporters.pull.enabled -}}
{{- $running := dict "agent" $v.agent.enabled "processor" true "exporter" $exporters "admin" $v.topicsJob.enabled -}}
{{- $roleSecrets := list -}}
{{- $without := list -}}
{{- range $role, $id := $v.kafkaIdentities -}}
{{- if get $running $role -}}
{{- if $id.secretName }}{{ $roleSecrets = append $roleSecrets $role }}{{ else }}{{ $without = append $without $role }}{{ end -}}
{{- end -}}
{{- end -}}
{{- if and $roleSecrets $without (not $v.secrets.kafkaSaslPassword.secretName) -}}
{{- fail (printf "kafkaIdentities: %s have a password Secret and %s none; give every role the release runs its secretName, or set secrets.kafkaSaslPassword for the others" (join ", " $roleSecrets) (join ", " $without)) -}}
{{- end -}}
{{- if or $v.secrets.kafkaSaslPassword.secretName $roleSecrets -}}
{{- $_ := set $forced "kafka" (dict "sasl_password_file" (printf "/etc/ktel/secrets/kafka/%s" $v.secrets.kafkaSaslPassword.key)) -}}
{{- end -}}
{{- with include "ktel.enrichMetadata" . | fromJson -}}
{{- $_ := set $forced "enrich" (dict "metadata_file" .file) -}}
{{- end -}}
{{- /* dns_latency's uprobe is on a file, and sees only the processes mapping it: the
agent's own libc is the image's, which none of the node's processes map. The node's is
mounted where agent.libcHostPath says (agent-daemonset.yaml), and named here. */ -}}
{{- with dig "agent" "libc_path" nil $v.config -}}
{{- fail (printf "config.agent.libc_path = %v names a file in the agent's container, whose own libc is the image's, not the node's: set agent.libcHostPath to the node's libc (its path on the node), which the chart mounts and names in agent.libc_path" .) -}}
{{- end -}}
{{- with $v.agent.libcHostPath -}}
{{- $_ := set $forced.agent "libc_path" (printf "/host/libc/%s" (base .)) -}}
{{- else -}}
{{- if and $v.agent.enabled (has "dns_latency" (dig "agent" "probes" list $v.config)) -}}
{{- fail "config.agent.probes has dns_latency, whose uprobe would be on the libc of the agent's image, which none of the node's processes map: set agent.libcHostPath to the node's libc (e.g. /lib/x86_64-linux-gnu/libc.so.6 on Debian and Ubuntu, /lib64/libc.so.6 on RHEL and Amazon Linux); it then sees the processes using that libc, not containers with their own" -}}
{{- end -}}
{{- end -}}
{{- range $section, $fields := $v.config -}}
{{- if not (kindIs "map" $fields) -}}
{{- fail (printf "config.%s: every entry of config is a section of ktel's TOML (a map of fields), e.g. config.kafka.bootstrap" $section) -}}
{{- end -}}
{{- end -}}
{{- /* A SASL login needs a password, which the pods get from a Secret alone: the chart
sets no KTEL_KAFKA__SASL_PASSWORD. Without one the release installed, and every pod
stopped at start on a config ktel refuses. */ -}}
{{- $protocol := toString (dig "kafka" "security_protocol" "" $v.config) -}}
{{- if and (hasPrefix "SASL_" $protocol) (not $v.secrets.kafkaSaslPassword.secretName) (not $roleSecrets) -}}
{{- $roles := list -}}
{{- range $role := keys $running | sortAlpha }}{{ if get $running $role }}{{ $roles = append $roles $role }}{{ end }}{{ end -}}
{{- fail (printf "config.kafka.security_protocol = %s logs in with a password, which the pods get from a Secret alone (the chart sets no KTEL_KAFKA__SASL_PASSWORD), and none is given: set secrets.kafkaSaslPassword (secretName, key), shared by every role, or kafkaIdentities.<role>.secretName for each role the release runs (%s)" $protocol (join ", " $roles)) -}}
{{- end -}}
{{- range $s := include "ktel.secretFields" . | fromYamlArray -}}
{{- if dig $s.section $s.field nil $v.config -}}
{{- $how := $s.instead | default (printf "its key given to exporters.%s as %s" $s.exporter (include "ktel.secretEnvName" $s)) -}}
{{- fail (printf "config.%s.%s (%s) goes in a Secret, not in the ConfigMap, which anyone allowed to read the namespace's ConfigMaps can read: secrets.%s, %s" $s.section $s.field $s.what $s.value $how) -}}
{{- end -}}
{{- end -}}
{{- /* One ConfigMap is every node's: one host id in it would be the whole fleet's. */ -}}
{{- with dig "agent" "host_id" nil $v.config -}}
{{- fail (printf "config.agent.host_id = %v names one host, and every node's agent reads this config: leave it unset, and each agent takes its node's /etc/machine-id (mounted from the node)" .) -}}
{{- end -}}
{{- /* Each agent's host.name is its node's, given by the DaemonSet's env
(KTEL_AGENT__HOST_NAME from spec.nodeName), which a value here would never override. */ -}}
{{- with dig "agent" "host_name" nil $v.config -}}
{{- fail (printf "config.agent.host_name = %v would name every node alike, as every node's agent reads this config, and the chart gives each agent its node's name instead (spec.nodeName, as KTEL_AGENT__HOST_NAME), over this value: leave it unset" .) -}}
{{- end -}}
{{- $config := mustMergeOverwrite (deepCopy $v.config) $forced -}}
{{- include "ktel.wholeNumbers" $config -}}
{{- toToml $config -}}
{{- end -}}

{{/*
Of ktel's config, what the edge agent reads: its own section, the service's, and of
kafka's the fields of ktel/kafka_client.py (the connection and credentials every client
takes) and the topics' prefix; not the partitions, retention, replication or principals,
which `ktel topics` and `ktel acls` alone read. The chart's tests derive this list from
edge_agent/ and ktel/kafka_client.py and hold it to them. As JSON, for the agents'
checksum/config: a change to another field (a topic's partitions, an exporter's URL)
leaves every node's agent running.
*/}}
{{- define "ktel.agentKafkaFields" -}}
- bootstrap
- prefix
- security_protocol
- sasl_mechanism
- sasl_username
- sasl_password
- sasl_password_file
- ssl_cafile
- ssl_certfile
- ssl_keyfile
- ssl_check_hostname
{{- end -}}

{{- define "ktel.agentConfig" -}}
{{- $config := include "ktel.config" . | fromToml -}}
{{- $all := get $config "kafka" | default dict -}}
{{- $kafka := dict -}}
{{- range $f := include "ktel.agentKafkaFields" . | fromYamlArray -}}
{{- if hasKey $all $f }}{{ $_ := set $kafka $f (get $all $f) }}{{ end -}}
{{- end -}}
{{- pick $config "agent" "service" | merge (dict "kafka" $kafka) | toJson -}}
{{- end -}}

{{/*
Every field of ktel's config that holds a secret (those ktel/config.py marks SECRET; the
chart's tests hold the two to the same list). Each is refused in `config` and given from
the Secret of secrets.<value> instead: with `exporter`, the Secret's key becomes the
field's environment variable (KTEL_<SECTION>__<FIELD>) in that exporter; else mounted as
a file, as `instead` says.
*/}}
{{- define "ktel.secretFields" -}}
- section: kafka
  field: sasl_password
  what: the Kafka password
  value: kafkaSaslPassword
  instead: mounted in every pod as the file kafka.sasl_password_file names (or a role's own, kafkaIdentities.<role>.secretName)
- section: remote_write
  field: basic_auth_password
  what: the remote-write password
  value: remoteWrite
  instead: its key mounted under secrets.remoteWrite.mountPath and named by config.remote_write.basic_auth_password_file
- section: remote_write
  field: headers
  what: headers often carry tokens
  value: remoteWriteHeaders
  exporter: remoteWrite
- section: otlp
  field: headers
  what: headers often carry tokens
  value: otlpHeaders
  exporter: otlp
{{- end -}}

{{/* The environment variable ktel reads a field from (KTEL_, then section__field). */}}
{{- define "ktel.secretEnvName" -}}
KTEL_{{ upper .section }}__{{ upper .field }}
{{- end -}}

{{/*
The secrets a workload (workload: its entry in workloads.yaml, whose `remoteWrite` or
`otlp` says which exporter it is) gets from Secrets as environment variables.
*/}}
{{- define "ktel.secretEnv" -}}
{{- $root := .root -}}
{{- $w := .workload -}}
{{- range $s := include "ktel.secretFields" $root | fromYamlArray -}}
{{- $secret := get $root.Values.secrets $s.value -}}
{{- if and $s.exporter (get $w $s.exporter) $secret.secretName }}
- name: {{ include "ktel.secretEnvName" $s }}
  valueFrom:
    secretKeyRef:
      name: {{ $secret.secretName }}
      key: {{ $secret.key }}
{{ end -}}
{{- end -}}
{{- end -}}

{{/*
Helm reads every number in values as a float: a whole one is made an integer again in
place (in maps and lists of maps), so the TOML says `port = 9465`, not `9465.0`.
*/}}
{{- define "ktel.wholeNumbers" -}}
{{- $m := . -}}
{{- range $k, $v := $m -}}
{{- if and (kindIs "float64" $v) (eq $v (floor $v)) -}}
{{- $_ := set $m $k (int64 $v) -}}
{{- else if kindIs "map" $v -}}
{{- include "ktel.wholeNumbers" $v -}}
{{- else if kindIs "slice" $v -}}
{{- $items := list -}}
{{- range $item := $v -}}
{{- if kindIs "map" $item -}}{{- include "ktel.wholeNumbers" $item -}}{{- end -}}
{{- $items = append $items (ternary (int64 $item) $item (and (kindIs "float64" $item) (eq $item (floor $item)))) -}}
{{- end -}}
{{- $_ := set $m $k $items -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
Where a server of every pod listens (field: service.metrics_bind or pull.host): every
address of the pod, for the kubelet's probes, the Services and Prometheus (ktel's default
is loopback only). 0.0.0.0 (IPv4) unless config gives :: (IPv6, and IPv4 where the node
has it), which an IPv6-only cluster needs: its probes and Services reach a pod at its IPv6
address alone. Any other is refused: a pod's own address is not known here, and loopback
is reached from nowhere else.
*/}}
{{- define "ktel.listenAddress" -}}
{{- $section := get (.root.Values.config | default dict) (splitList "." .field | first) -}}
{{- $given := "0.0.0.0" -}}
{{- if kindIs "map" $section -}}
{{- $given = get $section (splitList "." .field | last) | default $given -}}
{{- end -}}
{{- if not (has (toString $given) (list "0.0.0.0" "::")) -}}
{{- fail (printf "config.%s = %v: give 0.0.0.0 (every IPv4 address of the pod, the default) or :: (every IPv6 address, and the IPv4 ones where the node has them: an IPv6-only cluster needs it), where the kubelet's probes, the Services and Prometheus reach the pod" .field $given) -}}
{{- end -}}
{{- $given -}}
{{- end -}}

{{/* Environment every ktel container gets. */}}
{{- define "ktel.env" -}}
- name: KTEL_CONFIG
  value: /etc/ktel/ktel.toml
# The self-metrics, /healthz and /readyz listen on every address of the pod (ktel.listenAddress).
- name: KTEL_SERVICE__METRICS_BIND
  value: {{ include "ktel.listenAddress" (dict "root" . "field" "service.metrics_bind") | quote }}
{{- end -}}

{{/*
A role's Kafka identity (role: agent, processor or exporter, as `ktel acls` names them):
its SASL user (KTEL_KAFKA__SASL_USERNAME, over config.kafka.sasl_username) and the
Secret of its password, mounted where kafka.sasl_password_file says; each unset in
kafkaIdentities.<role> is the one every role shares.
*/}}
{{- define "ktel.kafkaEnv" -}}
{{- with (get .root.Values.kafkaIdentities .role).saslUsername }}
- name: KTEL_KAFKA__SASL_USERNAME
  value: {{ . | quote }}
{{- end }}
{{- end -}}

{{- define "ktel.kafkaPasswordSecret" -}}
{{- $shared := .root.Values.secrets.kafkaSaslPassword -}}
{{- $id := get .root.Values.kafkaIdentities .role -}}
{{- if $id.secretName -}}
{{- toJson (dict "secretName" $id.secretName "key" ($id.key | default $shared.key) "path" $shared.key) -}}
{{- else if $shared.secretName -}}
{{- toJson (dict "secretName" $shared.secretName "key" $shared.key "path" $shared.key) -}}
{{- else -}}
{{- toJson dict -}}
{{- end -}}
{{- end -}}

{{/*
process.enrichMetadata as JSON: configMap (the ConfigMap to mount: the release's own
with `content`), key, dir (where it is mounted) and file (enrich.metadata_file); {}
without one. Mounted as a directory, never by subPath, which the kubelet would not
update when the ConfigMap changes.
*/}}
{{- define "ktel.enrichMetadata" -}}
{{- $m := .Values.process.enrichMetadata -}}
{{- if and $m.content $m.configMap -}}
{{- fail "process.enrichMetadata: give either content (the chart makes its ConfigMap) or configMap (one that exists), not both" -}}
{{- end -}}
{{- $name := $m.configMap -}}
{{- if $m.content }}{{ $name = printf "%s-enrich-metadata" (include "ktel.fullname" .) }}{{ end -}}
{{- if $name -}}
{{- /* Kubernetes' rule for a ConfigMap's key: one the chart's ConfigMap may not hold is
refused with it, and one no ConfigMap holds starts no worker that runs enrich. */ -}}
{{- $key := toString $m.key -}}
{{- if or (not (regexMatch "^[-._a-zA-Z0-9]+$" $key)) (gt (len $key) 253) (eq $key ".") (hasPrefix ".." $key) -}}
{{- fail (printf "process.enrichMetadata.key = %q is no ConfigMap key: give at most 253 letters, digits, '-', '_' and '.', neither '.' nor starting with '..' (e.g. metadata.jsonl)" $key) -}}
{{- end -}}
{{- $dir := "/etc/ktel/enrich-metadata" -}}
{{- dict "configMap" $name "key" $key "dir" $dir "file" (printf "%s/%s" $dir $key) | toJson -}}
{{- else -}}
{}
{{- end -}}
{{- end -}}

{{/* Mounts and volumes every ktel container gets: the config, /tmp, Kafka's secrets. */}}
{{- define "ktel.commonMounts" -}}
{{- $v := .root.Values -}}
- name: config
  mountPath: /etc/ktel/ktel.toml
  subPath: ktel.toml
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- if (include "ktel.kafkaPasswordSecret" . | fromJson).secretName }}
- name: kafka-sasl
  mountPath: /etc/ktel/secrets/kafka
  readOnly: true
{{- end }}
{{- if $v.secrets.kafkaTls.secretName }}
- name: kafka-tls
  mountPath: {{ $v.secrets.kafkaTls.mountPath }}
  readOnly: true
{{- end }}
{{- end -}}

{{/* configMap: the ConfigMap of ktel.toml, if not the release's `…-config`. */}}
{{- define "ktel.commonVolumes" -}}
{{- $v := .root.Values -}}
- name: config
  configMap:
    name: {{ .configMap | default (printf "%s-config" (include "ktel.fullname" .root)) }}
- name: tmp
  emptyDir: {}
{{- with (include "ktel.kafkaPasswordSecret" . | fromJson) }}
{{- if .secretName }}
- name: kafka-sasl
  secret:
    secretName: {{ .secretName }}
    items:
      - key: {{ .key }}
        path: {{ .path }}
    defaultMode: 0400
{{- end }}
{{- end }}
{{- if $v.secrets.kafkaTls.secretName }}
- name: kafka-tls
  secret:
    secretName: {{ $v.secrets.kafkaTls.secretName }}
    defaultMode: 0400
{{- end }}
{{- end -}}

{{/*
A Prometheus duration (the Prometheus Operator's pattern: 1m30s, 500ms) in milliseconds,
to compare two; value: the duration, setting: the value that gave it, named if refused.
*/}}
{{- define "ktel.durationMs" -}}
{{- if not (regexMatch "^(0|([0-9]+y)?([0-9]+w)?([0-9]+d)?([0-9]+h)?([0-9]+m)?([0-9]+s)?([0-9]+ms)?)$" (toString .value)) -}}
{{- fail (printf "%s = %v is not a Prometheus duration, e.g. 30s or 1m30s" .setting .value) -}}
{{- end -}}
{{- $unit := dict "y" 31536000000 "w" 604800000 "d" 86400000 "h" 3600000 "m" 60000 "s" 1000 "ms" 1 -}}
{{- $total := 0 -}}
{{- /* "ms" first: 1m30s is 1m and 30s, 500ms is not 500m. */ -}}
{{- range $part := regexFindAll "[0-9]+(ms|[ywdhms])" (toString .value) -1 -}}
{{- $u := regexFind "[a-z]+$" $part -}}
{{- $total = add $total (mul (trimSuffix $u $part | atoi) (get $unit $u)) -}}
{{- end -}}
{{- $total -}}
{{- end -}}

{{/* A ServiceMonitor endpoint's interval and scrapeTimeout, those set (serviceMonitor). */}}
{{- define "ktel.scrapeTiming" -}}
{{- with .interval }}interval: {{ . }}{{ end }}
{{- with .scrapeTimeout }}
scrapeTimeout: {{ . }}
{{- end }}
{{- end -}}

{{/* Probes on the process's own port: /healthz (alive) and /readyz (ready to serve). */}}
{{- define "ktel.probes" -}}
startupProbe:
  httpGet: {path: /healthz, port: metrics}
  {{- toYaml .probes.startup | nindent 2 }}
livenessProbe:
  httpGet: {path: /healthz, port: metrics}
  {{- toYaml .probes.liveness | nindent 2 }}
readinessProbe:
  httpGet: {path: /readyz, port: metrics}
  {{- toYaml .probes.readiness | nindent 2 }}
{{- end -}}

{{/* The security context of every container but the agent's: nothing but its own files. */}}
{{- define "ktel.restrictedSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

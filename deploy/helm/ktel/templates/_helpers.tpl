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
  "pull" (dict "port" $v.ports.pull "metrics_port" $v.ports.pullMetrics "host" "0.0.0.0")
-}}
{{- $roleSecrets := list -}}
{{- range $role, $id := $v.kafkaIdentities -}}
{{- if $id.secretName }}{{ $roleSecrets = append $roleSecrets $role }}{{ end -}}
{{- end -}}
{{- if and $roleSecrets (not $v.secrets.kafkaSaslPassword.secretName) (lt (len $roleSecrets) (len $v.kafkaIdentities)) -}}
{{- fail (printf "kafkaIdentities: %s have a password Secret and the other roles none; give every role its secretName, or set secrets.kafkaSaslPassword for the others" (join ", " $roleSecrets)) -}}
{{- end -}}
{{- if or $v.secrets.kafkaSaslPassword.secretName $roleSecrets -}}
{{- $_ := set $forced "kafka" (dict "sasl_password_file" (printf "/etc/ktel/secrets/kafka/%s" $v.secrets.kafkaSaslPassword.key)) -}}
{{- end -}}
{{- range $section, $fields := $v.config -}}
{{- if not (kindIs "map" $fields) -}}
{{- fail (printf "config.%s: every entry of config is a section of ktel's TOML (a map of fields), e.g. config.kafka.bootstrap" $section) -}}
{{- end -}}
{{- end -}}
{{- if dig "otlp" "headers" nil $v.config -}}
{{- fail "config.otlp.headers: OTLP headers carry tokens; give them in a Secret (secrets.otlpHeaders), not in the ConfigMap" -}}
{{- end -}}
{{- if dig "kafka" "sasl_password" nil $v.config -}}
{{- fail "config.kafka.sasl_password: give the Kafka password in a Secret (secrets.kafkaSaslPassword), not in the ConfigMap" -}}
{{- end -}}
{{- $config := mustMergeOverwrite (deepCopy $v.config) $forced -}}
{{- include "ktel.wholeNumbers" $config -}}
{{- toToml $config -}}
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

{{/* Environment every ktel container gets. */}}
{{- define "ktel.env" -}}
- name: KTEL_CONFIG
  value: /etc/ktel/ktel.toml
# The self-metrics, /healthz and /readyz listen on every address of the pod, for the
# kubelet's probes and Prometheus (ktel's default is loopback only).
- name: KTEL_SERVICE__METRICS_BIND
  value: "0.0.0.0"
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

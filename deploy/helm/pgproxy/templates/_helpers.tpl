{{- define "pgproxy.name" -}}
{{- if eq .Values.mode "sidecar" }}{{ .Values.app.name }}{{ else }}{{ .Release.Name }}{{ end }}
{{- end }}

{{- define "pgproxy.labels" -}}
app.kubernetes.io/name: {{ include "pgproxy.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end }}

{{- define "pgproxy.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pgproxy.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "pgproxy.secretName" -}}
{{- .Values.existingSecret | default (printf "%s-pgproxy" .Release.Name) }}
{{- end }}

{{/* The pgproxy container, the same in both modes. */}}
{{- define "pgproxy.container" -}}
name: pgproxy
image: "{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}"
imagePullPolicy: {{ .Values.image.pullPolicy }}
args: ["-c", "/etc/pgproxy/pgproxy.toml"]
ports:
  {{- if ne .Values.mode "sidecar" }}
  - name: postgresql
    containerPort: {{ .Values.config.listen_port }}
  {{- end }}
  - name: metrics
    containerPort: {{ .Values.config.metrics_port }}
startupProbe:
  httpGet:
    path: /healthz
    port: metrics
  periodSeconds: 1
  failureThreshold: 30
readinessProbe:
  httpGet:
    path: /readyz
    port: metrics
  periodSeconds: 5
livenessProbe:
  httpGet:
    path: /healthz
    port: metrics
  periodSeconds: 10
  failureThreshold: 3
resources:
  {{- toYaml .Values.resources | nindent 2 }}
securityContext:
  runAsUser: 10001
  runAsGroup: 10001
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities:
    drop: ["ALL"]
volumeMounts:
  - name: pgproxy-config
    mountPath: /etc/pgproxy
    readOnly: true
  - name: pgproxy-secret
    mountPath: /etc/pgproxy/secret
    readOnly: true
{{- end }}

{{- define "pgproxy.volumes" -}}
- name: pgproxy-config
  configMap:
    name: {{ .Release.Name }}-pgproxy
- name: pgproxy-secret
  secret:
    secretName: {{ include "pgproxy.secretName" . }}
{{- end }}

{{/* One TOML value. Helm reads every number in values as a float: whole ones are
     written as integers (pgproxy's ports and sizes are integers). */}}
{{- define "pgproxy.tomlValue" -}}
{{- if kindIs "string" . }}{{ toJson . }}
{{- else if kindIs "bool" . }}{{ . }}
{{- else if kindIs "slice" . }}[{{ range $index, $item := . }}{{ if $index }}, {{ end }}{{ include "pgproxy.tomlValue" $item }}{{ end }}]
{{- else if eq (float64 .) (floor .) }}{{ int64 . }}
{{- else }}{{ . }}
{{- end }}
{{- end }}

{{/* pgproxy.toml from a map: its plain keys, then each table of tables (databases, users). */}}
{{- define "pgproxy.toml" -}}
{{- range $key, $value := . }}
{{- if not (kindIs "map" $value) }}
{{ $key }} = {{ include "pgproxy.tomlValue" $value }}
{{- end }}
{{- end }}
{{- range $table, $entries := . }}
{{- if kindIs "map" $entries }}
{{- range $name, $entry := $entries }}

[{{ $table }}.{{ toJson $name }}]
{{- range $key, $value := $entry }}
{{ $key }} = {{ include "pgproxy.tomlValue" $value }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

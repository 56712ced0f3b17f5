{{/* Names and labels. */}}
{{- define "flotilla.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "flotilla.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* <fullname>-<suffix>, within 63 characters. */}}
{{- define "flotilla.component" -}}
{{- printf "%s-%s" (include "flotilla.fullname" .root | trunc (int (sub 62 (len .suffix)))) .suffix | trimSuffix "-" -}}
{{- end -}}

{{- define "flotilla.selectorLabels" -}}
app.kubernetes.io/name: {{ include "flotilla.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "flotilla.labels" -}}
{{ include "flotilla.selectorLabels" . }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" | trunc 63 }}
{{- end -}}

{{- define "flotilla.standalone" -}}
{{- if eq .Values.mode "standalone" }}true{{ end -}}
{{- end -}}

{{/* The pod's service account in sidecar mode, CA's in standalone mode. */}}
{{- define "flotilla.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "flotilla.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Flotilla's own service account in standalone mode. */}}
{{- define "flotilla.flotillaServiceAccountName" -}}
{{- if .Values.flotilla.serviceAccount.create -}}
{{- default (include "flotilla.component" (dict "root" . "suffix" "server")) .Values.flotilla.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.flotilla.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* How many Flotilla processes run at once. */}}
{{- define "flotilla.replicas" -}}
{{- if include "flotilla.standalone" . }}{{ .Values.flotilla.replicas }}{{ else }}{{ .Values.autoscaler.replicas }}{{ end -}}
{{- end -}}

{{/* Whether Flotilla talks to the Kubernetes API at all (then it needs a token). */}}
{{- define "flotilla.needsApi" -}}
{{- if or .Values.flotilla.nodeCleanup.enabled .Values.flotilla.priorityExpander.enabled (gt (int (include "flotilla.replicas" .)) 1) }}true{{ end -}}
{{- end -}}

{{- define "flotilla.image" -}}
{{- printf "%s:%s" .Values.flotilla.image.repository (default .Chart.AppVersion .Values.flotilla.image.tag) -}}
{{- end -}}

{{/* host:port, with brackets for IPv6. */}}
{{- define "flotilla.hostPort" -}}
{{- if contains ":" .host }}{{ printf "[%s]:%v" .host .port }}{{ else }}{{ printf "%s:%v" .host .port }}{{ end -}}
{{- end -}}

{{- define "flotilla.serviceHost" -}}
{{- printf "%s.%s.svc" (include "flotilla.component" (dict "root" . "suffix" "server")) .Release.Namespace -}}
{{- end -}}

{{- define "flotilla.tlsServerSecret" -}}
{{- if .Values.tls.certManager.enabled }}{{ include "flotilla.component" (dict "root" . "suffix" "server-tls") }}{{ else }}{{ .Values.tls.serverSecret }}{{ end -}}
{{- end -}}

{{- define "flotilla.tlsClientSecret" -}}
{{- if .Values.tls.certManager.enabled }}{{ include "flotilla.component" (dict "root" . "suffix" "autoscaler-tls") }}{{ else }}{{ .Values.tls.clientSecret }}{{ end -}}
{{- end -}}

{{/* Fails early, with the fix in the message, on combinations the schema cannot express. */}}
{{- define "flotilla.validate" -}}
{{- if and (not (include "flotilla.standalone" .)) (not .Values.autoscaler.enabled) -}}
{{- fail "autoscaler.enabled=false needs mode=standalone: in sidecar mode Flotilla only serves the cluster-autoscaler in its own pod" -}}
{{- end -}}
{{- if include "flotilla.standalone" . -}}
{{- if and (not .Values.tls.certManager.enabled) (not .Values.tls.serverSecret) -}}
{{- fail "mode=standalone needs mutual TLS: set tls.serverSecret (and tls.clientSecret for the chart's cluster-autoscaler), or tls.certManager.enabled=true" -}}
{{- end -}}
{{- if and .Values.autoscaler.enabled (not .Values.tls.certManager.enabled) (not .Values.tls.clientSecret) -}}
{{- fail "mode=standalone with autoscaler.enabled needs tls.clientSecret (cluster-autoscaler's client certificate), or tls.certManager.enabled=true" -}}
{{- end -}}
{{- end -}}
{{- if not .Values.flotilla.configToml -}}
{{- if not .Values.flotilla.config.cluster_name -}}
{{- fail "flotilla.config.cluster_name is not set: give Flotilla a configuration (flotilla.config, or flotilla.configToml); examples/helm/ has one per cloud" -}}
{{- end -}}
{{- if hasKey .Values.flotilla.config "server" -}}
{{- fail "flotilla.config.server is set by the chart: use flotilla.grpcPort, flotilla.httpPort, flotilla.bindAddress, flotilla.shutdownGraceSeconds and tls.*" -}}
{{- end -}}
{{- else if regexMatch "(?m)^\\s*(\\[\\s*server\\s*[.\\]]|server\\s*[.=])" .Values.flotilla.configToml -}}
{{- fail "flotilla.configToml must not contain [server]: the chart appends it (use flotilla.grpcPort, flotilla.httpPort, flotilla.bindAddress, flotilla.shutdownGraceSeconds and tls.*)" -}}
{{- end -}}
{{- end -}}

{{/*
TOML rendering. Helm's toToml writes every number as a float (values are parsed as JSON, so
`max_size: 3` arrives as 3.0), and Flotilla's integer keys refuse floats; these templates write
integral numbers as integers, strings as JSON strings (valid TOML basic strings), maps inside
arrays as inline tables, and nested maps as [dotted.tables]. Nulls are left out.
*/}}
{{- define "flotilla.toml.key" -}}
{{- if regexMatch "^[A-Za-z0-9_-]+$" . }}{{ . }}{{ else }}{{ toJson . }}{{ end -}}
{{- end -}}

{{- define "flotilla.toml.value" -}}
{{- $v := . -}}
{{- if kindIs "string" $v }}{{ toJson $v }}
{{- else if kindIs "bool" $v }}{{ $v }}
{{- else if or (kindIs "float64" $v) (kindIs "float32" $v) }}{{ if eq (float64 (int64 $v)) (float64 $v) }}{{ int64 $v }}{{ else }}{{ $v }}{{ end }}
{{- else if kindIs "slice" $v }}[{{ range $i, $e := $v }}{{ if $i }}, {{ end }}{{ include "flotilla.toml.value" $e }}{{ end }}]
{{- else if kindIs "map" $v }}{ {{- range $i, $k := keys $v | sortAlpha }}{{ if $i }},{{ end }} {{ include "flotilla.toml.key" $k }} = {{ include "flotilla.toml.value" (index $v $k) }}{{ end }} }
{{- else }}{{ $v }}
{{- end -}}
{{- end -}}

{{- define "flotilla.toml.table" -}}
{{- $path := .path -}}
{{- $m := .map -}}
{{- $scalars := 0 -}}
{{- range $k := keys $m | sortAlpha }}{{ $v := index $m $k }}
{{- if not (or (kindIs "map" $v) (kindIs "invalid" $v)) }}{{ $scalars = add1 $scalars }}{{ end }}
{{- end }}
{{- if and $path (or $scalars (empty $m)) }}

[{{ join "." $path }}]
{{- end }}
{{- range $k := keys $m | sortAlpha }}{{ $v := index $m $k }}
{{- if not (or (kindIs "map" $v) (kindIs "invalid" $v)) }}
{{ include "flotilla.toml.key" $k }} = {{ include "flotilla.toml.value" $v }}
{{- end }}
{{- end }}
{{- range $k := keys $m | sortAlpha }}{{ $v := index $m $k }}
{{- if kindIs "map" $v }}
{{- include "flotilla.toml.table" (dict "path" (append $path (include "flotilla.toml.key" $k)) "map" $v) }}
{{- end }}
{{- end }}
{{- end -}}

{{/* The [server] table the chart owns. */}}
{{- define "flotilla.serverTable" -}}
{{- $grpcHost := ternary .Values.flotilla.bindAddress "127.0.0.1" (eq .Values.mode "standalone") -}}
{{- $server := dict
  "grpc_listen" (include "flotilla.hostPort" (dict "host" $grpcHost "port" .Values.flotilla.grpcPort))
  "http_listen" (include "flotilla.hostPort" (dict "host" .Values.flotilla.bindAddress "port" .Values.flotilla.httpPort))
  "shutdown_grace" (printf "%ds" (int .Values.flotilla.shutdownGraceSeconds)) -}}
{{- if include "flotilla.standalone" . -}}
{{- $_ := set $server "tls" (dict "cert_file" "/etc/flotilla/tls/tls.crt" "key_file" "/etc/flotilla/tls/tls.key" "client_ca_file" "/etc/flotilla/tls/ca.crt") -}}
{{- end -}}
{{- include "flotilla.toml.table" (dict "path" (list "server") "map" $server) -}}
{{- end -}}

{{/* flotilla.toml: the user's configuration and the chart's [server] table. */}}
{{- define "flotilla.configToml" -}}
{{- if .Values.flotilla.configToml -}}
{{ .Values.flotilla.configToml | trimSuffix "\n" }}
{{ include "flotilla.serverTable" . }}
{{- else -}}
{{- include "flotilla.toml.table" (dict "path" (list) "map" .Values.flotilla.config) | trimPrefix "\n" }}
{{ include "flotilla.serverTable" . }}
{{- end }}
{{ end -}}

{{/* CA's cloud-config. */}}
{{- define "flotilla.cloudConfig" -}}
{{- if include "flotilla.standalone" . -}}
address: {{ printf "%s:%v" (include "flotilla.serviceHost" .) .Values.flotilla.grpcPort | quote }}
cert: /etc/cluster-autoscaler/tls/tls.crt
key: /etc/cluster-autoscaler/tls/tls.key
cacert: /etc/cluster-autoscaler/tls/ca.crt
{{- else -}}
address: {{ printf "127.0.0.1:%v" .Values.flotilla.grpcPort | quote }}
{{- end }}
grpc_timeout: {{ .Values.autoscaler.grpcTimeout }}
{{ end -}}

{{/* Env entries from existing Secrets: NAME -> {name, key}. */}}
{{- define "flotilla.secretEnv" -}}
{{- range $var, $ref := . }}
- name: {{ $var }}
  valueFrom:
    secretKeyRef:
      name: {{ required (printf "secretEnv.%s.name is required" $var) $ref.name }}
      key: {{ required (printf "secretEnv.%s.key is required" $var) $ref.key }}
{{- end }}
{{- end -}}

{{/* The Flotilla container (both modes). */}}
{{- define "flotilla.container" -}}
- name: flotilla
  image: {{ include "flotilla.image" . }}
  imagePullPolicy: {{ .Values.flotilla.image.pullPolicy }}
  args: [serve, --config, /etc/flotilla/flotilla.toml]
  env:
    - name: POD_NAME
      valueFrom: {fieldRef: {fieldPath: metadata.name}}
    - name: POD_NAMESPACE
      valueFrom: {fieldRef: {fieldPath: metadata.namespace}}
    {{- include "flotilla.secretEnv" .Values.flotilla.secretEnv | nindent 4 }}
    {{- with .Values.flotilla.env }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with .Values.flotilla.envFrom }}
  envFrom:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  ports:
    - name: flotilla
      containerPort: {{ .Values.flotilla.httpPort }}
    {{- if include "flotilla.standalone" . }}
    - name: grpc
      containerPort: {{ .Values.flotilla.grpcPort }}
    {{- end }}
  livenessProbe:
    {{- toYaml .Values.flotilla.livenessProbe | nindent 4 }}
  readinessProbe:
    {{- toYaml .Values.flotilla.readinessProbe | nindent 4 }}
  resources:
    {{- toYaml .Values.flotilla.resources | nindent 4 }}
  securityContext:
    {{- toYaml .Values.flotilla.securityContext | nindent 4 }}
  volumeMounts:
    - name: flotilla-config
      mountPath: /etc/flotilla/flotilla.toml
      subPath: flotilla.toml
      readOnly: true
    - name: flotilla-tmp
      mountPath: /tmp
    {{- if include "flotilla.standalone" . }}
    - name: flotilla-tls
      mountPath: /etc/flotilla/tls
      readOnly: true
    {{- end }}
    {{- range $name, $v := .Values.flotilla.extraVolumeSecrets }}
    - name: {{ $name }}
      mountPath: {{ required (printf "flotilla.extraVolumeSecrets.%s.mountPath is required" $name) $v.mountPath }}
      readOnly: true
    {{- end }}
    {{- with .Values.flotilla.extraVolumeMounts }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end -}}

{{- define "flotilla.volumes" -}}
- name: flotilla-config
  configMap:
    name: {{ include "flotilla.component" (dict "root" . "suffix" "config") }}
- name: flotilla-tmp
  emptyDir: {}
{{- if include "flotilla.standalone" . }}
- name: flotilla-tls
  secret:
    secretName: {{ include "flotilla.tlsServerSecret" . }}
{{- end }}
{{- range $name, $v := .Values.flotilla.extraVolumeSecrets }}
- name: {{ $name }}
  secret:
    secretName: {{ required (printf "flotilla.extraVolumeSecrets.%s.name is required" $name) $v.name }}
    {{- with $v.items }}
    items:
      {{- toYaml . | nindent 6 }}
    {{- end }}
{{- end }}
{{- with .Values.flotilla.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The cluster-autoscaler container (both modes). */}}
{{- define "flotilla.autoscalerContainer" -}}
- name: cluster-autoscaler
  image: {{ printf "%s:%s" .Values.autoscaler.image.repository .Values.autoscaler.image.tag }}
  imagePullPolicy: {{ .Values.autoscaler.image.pullPolicy }}
  command:
    - ./cluster-autoscaler
    - --cloud-provider=externalgrpc
    - --cloud-config=/etc/cluster-autoscaler/cloud-config.yaml
    - --namespace={{ .Release.Namespace }}
    {{- range $key, $value := .Values.autoscaler.extraArgs }}
    {{- if kindIs "invalid" $value }}
    - --{{ $key | mustRegexFind "^[^_]+" }}
    {{- else }}
    - --{{ $key | mustRegexFind "^[^_]+" }}={{ $value }}
    {{- end }}
    {{- end }}
    {{- range .Values.autoscaler.customArgs }}
    - {{ . }}
    {{- end }}
  env:
    - name: POD_NAMESPACE
      valueFrom: {fieldRef: {fieldPath: metadata.namespace}}
    - name: SERVICE_ACCOUNT
      valueFrom: {fieldRef: {fieldPath: spec.serviceAccountName}}
    {{- include "flotilla.secretEnv" .Values.autoscaler.secretEnv | nindent 4 }}
    {{- with .Values.autoscaler.env }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  ports:
    - name: autoscaler
      containerPort: 8085
  livenessProbe:
    httpGet: {path: /health-check, port: autoscaler}
  resources:
    {{- toYaml .Values.autoscaler.resources | nindent 4 }}
  securityContext:
    {{- toYaml .Values.autoscaler.securityContext | nindent 4 }}
  volumeMounts:
    - name: cloud-config
      mountPath: /etc/cluster-autoscaler/cloud-config.yaml
      subPath: cloud-config.yaml
      readOnly: true
    {{- if include "flotilla.standalone" . }}
    - name: autoscaler-tls
      mountPath: /etc/cluster-autoscaler/tls
      readOnly: true
    {{- end }}
{{- end -}}

{{- define "flotilla.autoscalerVolumes" -}}
- name: cloud-config
  configMap:
    name: {{ include "flotilla.component" (dict "root" . "suffix" "cloud-config") }}
{{- if include "flotilla.standalone" . }}
- name: autoscaler-tls
  secret:
    secretName: {{ include "flotilla.tlsClientSecret" . }}
{{- end }}
{{- end -}}

{{/* Scheduling and security for every pod. */}}
{{- define "flotilla.podCommon" -}}
{{- with .Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

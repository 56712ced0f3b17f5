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

{{/* Whether the Flotilla replicas elect a leader (more than one runs). */}}
{{- define "flotilla.leaderElection" -}}
{{- if gt (int (include "flotilla.replicas" .)) 1 }}true{{ end -}}
{{- end -}}

{{/* Whether Flotilla talks to the Kubernetes API at all (then it needs a token). */}}
{{- define "flotilla.needsApi" -}}
{{- if or .Values.flotilla.nodeCleanup.enabled .Values.flotilla.priorityExpander.enabled (include "flotilla.leaderElection" .) }}true{{ end -}}
{{- end -}}

{{/*
The tables the chart owns besides [server], from its values, as YAML: [priority_expander] in
the release namespace (CA's --namespace, where the chart's Role lets Flotilla write the
ConfigMap) and [leader_election] on the Lease the chart's Role names.
*/}}
{{- define "flotilla.chartTables" -}}
{{- $t := dict -}}
{{- if .Values.flotilla.priorityExpander.enabled -}}
{{- $_ := set $t "priority_expander" (dict "namespace" .Release.Namespace) -}}
{{- end -}}
{{- if include "flotilla.leaderElection" . -}}
{{- $v := .Values.flotilla.leaderElection -}}
{{- $le := dict "enabled" true "namespace" .Release.Namespace "lease_name" $v.leaseName -}}
{{- with $v.leaseDuration }}{{ $_ := set $le "lease_duration" . }}{{ end -}}
{{- with $v.renewDeadline }}{{ $_ := set $le "renew_deadline" . }}{{ end -}}
{{- with $v.retryPeriod }}{{ $_ := set $le "retry_period" . }}{{ end -}}
{{- $_ := set $t "leader_election" $le -}}
{{- end -}}
{{- toYaml $t -}}
{{- end -}}

{{/* flotilla.config with node_cleanup = true on every cloud that does not set it, when flotilla.nodeCleanup.enabled. */}}
{{- define "flotilla.userConfig" -}}
{{- $c := deepCopy .Values.flotilla.config -}}
{{- if .Values.flotilla.nodeCleanup.enabled -}}
{{- range $name, $cloud := (get $c "clouds" | default dict) -}}
{{- if and (kindIs "map" $cloud) (not (hasKey $cloud "node_cleanup")) }}{{ $_ := set $cloud "node_cleanup" true }}{{ end -}}
{{- end -}}
{{- end -}}
{{- toYaml $c -}}
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
{{- range $table, $values := dict "leader_election" "flotilla.leaderElection.* (the chart elects a leader when more than one Flotilla runs)" "priority_expander" "flotilla.priorityExpander.enabled (the chart writes it for the release namespace)" -}}
{{- if hasKey $.Values.flotilla.config $table -}}
{{- fail (printf "flotilla.config.%s is set by the chart: use %s" $table $values) -}}
{{- end -}}
{{- end -}}
{{- $c := .Values.flotilla.config -}}
{{- $cleanup := list -}}
{{- range $name, $cloud := (get $c "clouds" | default dict) -}}
{{- if and (kindIs "map" $cloud) (get $cloud "node_cleanup") }}{{ $cleanup = append $cleanup $name }}{{ end -}}
{{- end -}}
{{- if and $cleanup (not .Values.flotilla.nodeCleanup.enabled) -}}
{{- fail (printf "flotilla.config.clouds.%s.node_cleanup needs flotilla.nodeCleanup.enabled=true, which grants Flotilla the right to delete Nodes (and sets node_cleanup on every cloud)" (first $cleanup)) -}}
{{- end -}}
{{- range $name, $group := (get $c "groups" | default dict) -}}
{{- if and (kindIs "map" $group) (get $group "warm_pool") (not $.Values.flotilla.nodeCleanup.enabled) -}}
{{- fail (printf "flotilla.config.groups.%s.warm_pool needs flotilla.nodeCleanup.enabled=true: a stopped machine's Node must be removed, or cluster-autoscaler counts it as NotReady" $name) -}}
{{- end -}}
{{- end -}}
{{- else -}}
{{- $toml := .Values.flotilla.configToml -}}
{{- if regexMatch "(?m)^\\s*(\\[\\s*server\\s*[.\\]]|server\\s*[.=])" $toml -}}
{{- fail "flotilla.configToml must not contain [server]: the chart appends it (use flotilla.grpcPort, flotilla.httpPort, flotilla.bindAddress, flotilla.shutdownGraceSeconds and tls.*)" -}}
{{- end -}}
{{- if regexMatch "(?m)^\\s*(\\[\\s*leader_election\\s*[.\\]]|leader_election\\s*[.=])" $toml -}}
{{- fail "flotilla.configToml must not contain [leader_election]: the chart appends it when more than one Flotilla runs (use flotilla.leaderElection.*)" -}}
{{- end -}}
{{- if regexMatch "(?m)^\\s*(\\[\\s*priority_expander\\s*[.\\]]|priority_expander\\s*[.=])" $toml -}}
{{- fail "flotilla.configToml must not contain [priority_expander]: the chart appends it for the release namespace (use flotilla.priorityExpander.enabled=true)" -}}
{{- end -}}
{{- $cleanup := regexMatch "node_cleanup\\s*=\\s*true" $toml -}}
{{- if and $cleanup (not .Values.flotilla.nodeCleanup.enabled) -}}
{{- fail "flotilla.configToml sets node_cleanup = true: set flotilla.nodeCleanup.enabled=true too, which grants Flotilla the right to delete Nodes" -}}
{{- end -}}
{{- if and .Values.flotilla.nodeCleanup.enabled (not $cleanup) -}}
{{- fail "flotilla.nodeCleanup.enabled=true but flotilla.configToml sets node_cleanup = true on no cloud: add it to each [clouds.NAME] whose Nodes Flotilla should remove" -}}
{{- end -}}
{{- end -}}
{{- if and (not (include "flotilla.standalone" .)) (gt (int .Values.autoscaler.replicas) 1) -}}
{{- fail "autoscaler.replicas > 1 needs mode=standalone: in sidecar mode each cluster-autoscaler talks only to the Flotilla in its own pod, and CA's leader and Flotilla's could be in different pods. Run mode=standalone with flotilla.replicas > 1 (Flotilla elects a leader) and autoscaler.replicas as you like" -}}
{{- end -}}
{{- if .Values.flotilla.priorityExpander.enabled -}}
{{- $expander := get .Values.autoscaler.extraArgs "expander" -}}
{{- if and $expander (not (has "priority" (splitList "," (toString $expander)))) -}}
{{- fail (printf "flotilla.priorityExpander.enabled=true but autoscaler.extraArgs.expander is %q: cluster-autoscaler reads the ConfigMap Flotilla writes only with the priority expander (--expander=priority, or a chain such as priority,least-waste)" (toString $expander)) -}}
{{- end -}}
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
{{- $tables := include "flotilla.chartTables" . | fromYaml -}}
{{- if .Values.flotilla.configToml -}}
{{ .Values.flotilla.configToml | trimSuffix "\n" }}
{{- include "flotilla.toml.table" (dict "path" (list) "map" $tables) }}
{{ include "flotilla.serverTable" . }}
{{- else -}}
{{- include "flotilla.toml.table" (dict "path" (list) "map" (merge $tables (include "flotilla.userConfig" . | fromYaml))) | trimPrefix "\n" }}
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
    {{- if and .Values.flotilla.priorityExpander.enabled (not (hasKey .Values.autoscaler.extraArgs "expander")) }}
    - --expander=priority
    {{- end }}
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

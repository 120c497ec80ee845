{{/* Names and labels shared by every object. */}}
{{- define "moerge.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "moerge.fullname" -}}
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

{{- define "moerge.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "moerge.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "moerge.selectorLabels" -}}
app.kubernetes.io/name: {{ include "moerge.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "moerge.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Service (and Deployment) name of one expert: call with (list $ $expertName). */}}
{{- define "moerge.expertName" -}}
{{- $root := index . 0 -}}
{{- printf "%s-expert-%s" (include "moerge.fullname" $root) (index . 1) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Whether the gateway sends the experts a key (given, generated, or from an existing Secret). */}}
{{- define "moerge.hasBackendKey" -}}
{{- if or .Values.apiKeys.backendKey .Values.apiKeys.existingSecret .Values.apiKeys.generateBackendKey -}}true{{- end -}}
{{- end -}}

{{/* The backend key: the given one, else the one an earlier release stored, else a new random one. */}}
{{- define "moerge.backendKey" -}}
{{- if .Values.apiKeys.backendKey -}}
{{- .Values.apiKeys.backendKey -}}
{{- else -}}
{{- $old := lookup "v1" "Secret" .Release.Namespace (include "moerge.secretName" .) -}}
{{- if and $old $old.data (index $old.data "backend-api-key") -}}
{{- index $old.data "backend-api-key" | b64dec -}}
{{- else -}}
{{- randAlphaNum 48 -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Writable folders under a read-only root filesystem, and the environment that points caches there. */}}
{{- define "moerge.scratchMounts" -}}
- name: tmp
  mountPath: /tmp
- name: cache
  mountPath: /home/moerge/.cache
{{- end -}}

{{- define "moerge.scratchEnv" -}}
- name: HOME
  value: /home/moerge
- name: XDG_CONFIG_HOME
  value: /home/moerge/.cache/config
- name: TRITON_CACHE_DIR
  value: /home/moerge/.cache/triton
- name: VLLM_NO_USAGE_STATS
  value: "1"
{{- end -}}

{{- define "moerge.secretName" -}}
{{- default (printf "%s-keys" (include "moerge.fullname" .)) .Values.apiKeys.existingSecret -}}
{{- end -}}

{{- define "moerge.metricsAnnotations" -}}
{{- if .root.Values.metrics.podAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .port | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- end -}}

{{- define "moerge.modelVolume" -}}
- name: models
{{- if eq .Values.modelVolume.type "hostPath" }}
  hostPath:
    path: {{ .Values.modelVolume.hostPath }}
    type: Directory
{{- else }}
  persistentVolumeClaim:
    claimName: {{ .Values.modelVolume.claimName }}
    readOnly: true
{{- end }}
{{- end -}}

{{/* The generated `moerge serve` config: values.gateway.config plus server (host, port, metrics_port
     generated; docs off unless gateway.config.server.docs says otherwise), experts, auth, decision_log. */}}
{{- define "moerge.serveConfig" -}}
{{- $cfg := deepCopy .Values.gateway.config -}}
{{- $server := merge (dict "host" "0.0.0.0" "port" (int .Values.gateway.port) "metrics_port" (int .Values.gateway.metricsPort)) (default (dict) (index $cfg "server")) (dict "docs" false) -}}
{{- $_ := set $cfg "server" $server -}}
{{- $experts := dict -}}
{{- range .Values.experts -}}
{{- $e := merge (deepCopy .) (deepCopy $.Values.expertDefaults) -}}
{{- $entry := dict "backend" "openai" "model" .name "url" (printf "http://%s:%d/v1" (include "moerge.expertName" (list $ .name)) (int $e.port)) -}}
{{- if .fallback }}{{- $_ := set $entry "fallback" .fallback -}}{{- end -}}
{{- if .description }}{{- $_ := set $entry "description" .description -}}{{- end -}}
{{- if include "moerge.hasBackendKey" $ }}{{- $_ := set $entry "api_key_env" "MOERGE_BACKEND_API_KEY" -}}{{- end -}}
{{- $_ := set $experts .name $entry -}}
{{- end -}}
{{- $_ := set $cfg "experts" $experts -}}
{{- if .Values.apiKeys.clients -}}
{{- $keys := dict -}}
{{- range $name, $k := .Values.apiKeys.clients -}}
{{- $entry := omit $k "key" -}}
{{- if $k.key }}{{- $_ := set $entry "sha256" (sha256sum $k.key) -}}{{- end -}}
{{- $_ := set $keys $name $entry -}}
{{- end -}}
{{- $_ := set $cfg "auth" (dict "keys" $keys) -}}
{{- end -}}
{{- if .Values.decisionLog.enabled -}}
{{- $_ := set $cfg "decision_log" (merge (dict "enabled" true "url_env" "MOERGE_DECISION_LOG_URL") (default (dict) (index $cfg "decision_log"))) -}}
{{- end -}}
{{- toYaml $cfg -}}
{{- end -}}

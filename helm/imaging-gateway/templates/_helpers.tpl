{{- define "imaging-gateway.fullname" -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "imaging-gateway.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}

{{- define "imaging-gateway.selector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* A value as TOML: a map as an inline table (quoted keys), anything else as JSON, which
     is TOML for strings, numbers, booleans and arrays of them. */}}
{{- define "imaging-gateway.toml" -}}
{{- if kindIs "map" . -}}
{ {{- range $i, $key := keys . | sortAlpha }}{{ if $i }},{{ end }} {{ toJson $key }} = {{ include "imaging-gateway.toml" (get $ $key) }}{{ end }} }
{{- else -}}
{{- toJson . -}}
{{- end -}}
{{- end -}}

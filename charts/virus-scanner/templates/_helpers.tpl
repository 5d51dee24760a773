{{- define "vs.name" -}}virus-scanner{{- end -}}

{{- define "vs.fullname" -}}
{{- if contains "virus-scanner" .Release.Name -}}{{ .Release.Name | trunc 40 | trimSuffix "-" }}{{- else -}}{{ printf "%s-virus-scanner" .Release.Name | trunc 40 | trimSuffix "-" }}{{- end -}}
{{- end -}}

{{- define "vs.labels" -}}
app.kubernetes.io/name: {{ include "vs.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "vs.selector" -}}
app.kubernetes.io/name: {{ include "vs.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "vs.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "vs.redisHost" -}}
{{- if eq .Values.redis.mode "bundled" -}}
{{ include "vs.fullname" . }}-redis.{{ .Release.Namespace }}.svc
{{- else -}}
{{ required "redis.external.host is required when redis.mode=external" .Values.redis.external.host }}
{{- end -}}
{{- end -}}

{{- define "vs.redisPort" -}}
{{- if eq .Values.redis.mode "bundled" -}}6379{{- else -}}{{ .Values.redis.external.port }}{{- end -}}
{{- end -}}

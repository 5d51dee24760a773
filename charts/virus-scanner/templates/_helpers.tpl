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

{{/*
clamd.conf of the consumers' clamd, mounted over the clamav/clamav image's
/etc/clamav/clamd.conf (clamd reads nothing else). The image's stock file is the sample
with only the sockets, user and log set; those are kept, since the image's entrypoint waits
for the local socket and freshclam (NotifyClamd) and clamdcheck.sh reach clamd through them.
*/}}
{{- define "vs.clamdConf" -}}
{{- $body := int .Values.consumer.maxScanSizeMB -}}
# Rendered by the virus-scanner chart from its values; do not edit in place.
LocalSocket /tmp/clamd.sock
# /tmp is an emptyDir shared with the consumer only, which connects as another uid and hands
# clamd the body's descriptor (FILDES) instead of streaming it.
LocalSocketMode 666
TCPSocket 3310
User clamav
LogFile /var/log/clamav/clamd.log
LogTime yes
# The consumer hands clamd bodies of up to consumer.maxScanSizeMB (MAX_SCAN_SIZE_MB); none
# of them may be cut short by a smaller clamd limit. MaxScanSize also counts an archive's
# unpacked contents: four times the body, clamd's own default ratio.
MaxFileSize {{ $body }}M
StreamMaxLength {{ $body }}M
PCREMaxFileSize {{ $body }}M
MaxScanSize {{ min 4095 (mul 4 $body) }}M
# Without these clamd answers OK for what it did not scan: data past a limit and encrypted
# archives and documents. With them it reports Heuristics.Limits.Exceeded.* and
# Heuristics.Encrypted.*, which the consumer turns into an unscannable verdict.
HeuristicAlerts yes
AlertExceedsMax yes
AlertEncrypted yes
AlertEncryptedArchive yes
AlertEncryptedDoc yes
{{- end -}}

{{/* Tenants on the bundled Redis: TLS, ACL users, secrets kept by the operator. */}}
{{- define "vs.redisAcl" -}}
{{- if and (eq .Values.redis.mode "bundled") .Values.redis.tenantUsers -}}true{{- end -}}
{{- end -}}

{{- define "asyncproc.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "asyncproc.fullname" -}}
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

{{- define "asyncproc.selectorLabels" -}}
app.kubernetes.io/name: {{ include "asyncproc.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "asyncproc.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "asyncproc.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "asyncproc.secretName" -}}
{{- default (include "asyncproc.fullname" .) .Values.redis.existingSecret -}}
{{- end -}}

{{- define "asyncproc.grace" -}}
{{- $drain := int (default 30 (index .Values.config "shutdown-grace-period")) -}}
{{- if .Values.terminationGracePeriodSeconds -}}
{{- if le (int .Values.terminationGracePeriodSeconds) $drain -}}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be larger than config.shutdown-grace-period (%d)" (int .Values.terminationGracePeriodSeconds) $drain) -}}
{{- end -}}
{{- .Values.terminationGracePeriodSeconds -}}
{{- else -}}
{{- add $drain 30 -}}
{{- end -}}
{{- end -}}

{{- define "asyncproc.gatewayTokenSecret" -}}
{{- if .Values.gateway.existingSecret -}}
{{- .Values.gateway.existingSecret -}}
{{- else if .Values.gateway.token -}}
{{- printf "%s-gateway" (include "asyncproc.fullname" .) -}}
{{- end -}}
{{- end -}}

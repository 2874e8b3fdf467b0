{{/* Names, labels and shared pod fragments. */}}

{{- define "convstate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "convstate.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "convstate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels: stable across upgrades, so never add a changing value here. */}}
{{- define "convstate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "convstate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "convstate.labels" -}}
helm.sh/chart: {{ include "convstate.chart" . }}
{{ include "convstate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: convstate
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "convstate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "convstate.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "convstate.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/* The backend convstate forwards to: the in-chart reference backend when it is enabled. */}}
{{- define "convstate.backendUrl" -}}
{{- if .Values.referenceBackend.enabled }}
{{- printf "http://%s-refbackend:%d" (include "convstate.fullname" .) (int .Values.referenceBackend.port) }}
{{- else }}
{{- required "config.backendUrl is required (the vLLM Service or the llm-d gateway)" .Values.config.backendUrl }}
{{- end }}
{{- end }}

{{/* What the pod waits for between SIGTERM and SIGKILL: endpoint removal, then the service's drain. */}}
{{- define "convstate.terminationGracePeriodSeconds" -}}
{{- add .Values.preStopSleepSeconds .Values.config.shutdownGraceSeconds .Values.terminationMarginSeconds }}
{{- end }}

{{- define "convstate.podSecurityContext" -}}
{{- toYaml .Values.podSecurityContext }}
{{- end }}

{{- define "convstate.securityContext" -}}
{{- toYaml .Values.securityContext }}
{{- end }}

{{/* The database URL, from an existing Secret: the only environment the migration Job gets. */}}
{{- define "convstate.databaseEnv" -}}
- name: CONVSTATE_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ required "database.existingSecret is required: a Secret holding the Postgres URL" .Values.database.existingSecret }}
      key: {{ .Values.database.secretKey }}
{{- end }}

{{/* Everything the server reads from Secrets: the database URL and extra entries. (API keys live hashed
in the database, created with `convstate keys create`; no key material is mounted.) */}}
{{- define "convstate.secretEnv" -}}
{{ include "convstate.databaseEnv" . }}
{{- range .Values.secretEnv }}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ .secretName }}
      key: {{ .secretKey }}
{{- end }}
{{- end }}

{{- define "convstate.tmpVolume" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmpSizeLimit }}
{{- end }}

{{- define "convstate.tmpMount" -}}
- name: tmp
  mountPath: /tmp
{{- end }}

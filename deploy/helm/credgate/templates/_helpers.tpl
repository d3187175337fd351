{{/* Chart name, truncated to the 63 characters Kubernetes allows in a name. */}}
{{- define "credgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: the release name, with the chart name unless it already contains it. */}}
{{- define "credgate.fullname" -}}
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

{{- define "credgate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "credgate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "credgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: gateway
{{- end }}

{{- define "credgate.labels" -}}
helm.sh/chart: {{ include "credgate.chart" . }}
app.kubernetes.io/name: {{ include "credgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: credgate
{{- end }}

{{- define "credgate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "credgate.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "credgate.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "credgate.scheme" -}}
{{- if .Values.tls.enabled }}https{{ else }}http{{ end }}
{{- end }}

{{- define "credgate.publicUrl" -}}
{{- if .Values.publicUrl }}
{{- .Values.publicUrl }}
{{- else }}
{{- printf "%s://%s.%s.svc:%d" (include "credgate.scheme" .) (include "credgate.fullname" .) .Release.Namespace (int .Values.service.port) }}
{{- end }}
{{- end }}

{{/* Where the gateway's files are mounted (the image's HOME is /tmp). */}}
{{- define "credgate.kekDir" -}}/var/run/credgate/kek{{- end }}
{{- define "credgate.kekSecretDir" -}}/var/run/credgate/kek-secret{{- end }}
{{- define "credgate.tlsDir" -}}/etc/credgate/tls{{- end }}
{{- define "credgate.clientCADir" -}}/etc/credgate/client-ca{{- end }}
{{- define "credgate.configDir" -}}/etc/credgate/config{{- end }}

{{/*
Refuse values the gateway cannot run with, with one clear message each.
*/}}
{{- define "credgate.validate" -}}
{{- if eq .Values.kek.source "kms" }}
{{- fail (printf "kek.source=kms (kms.provider=%q): credgate cannot read its KEK from a KMS yet; it reads it only from a file (kek.source=file, CREDGATE_KEK_FILE) or from CREDGATE_KEK (kek.source=env). Keep the KEK in a Secret and set kek.source to file or env." .Values.kms.provider) }}
{{- end }}
{{- if and (ne .Values.kek.source "kms") (not .Values.kek.existingSecret) }}
{{- fail "kek.existingSecret is required: the name of the Secret holding the KEK (create it with `credgate keys generate --out kek` and `kubectl create secret generic NAME --from-file=kek=kek`)" }}
{{- end }}
{{- if and (not .Values.database.existingSecret) (not .Values.database.url) }}
{{- fail "set database.existingSecret (a Secret holding the PostgreSQL URL) or database.url: every replica must share one PostgreSQL database" }}
{{- end }}
{{- if and .Values.database.url (hasPrefix "sqlite" .Values.database.url) }}
{{- fail "database.url: SQLite cannot be shared by several replicas; use PostgreSQL" }}
{{- end }}
{{- if and .Values.tls.enabled (not .Values.tls.existingSecret) }}
{{- fail "tls.enabled needs tls.existingSecret (a kubernetes.io/tls Secret)" }}
{{- end }}
{{- if and (or .Values.tls.clientCA.existingSecret .Values.tls.requireClientCert .Values.tls.clientSubjects) (not .Values.tls.enabled) }}
{{- fail "client certificates (tls.clientCA, tls.requireClientCert, tls.clientSubjects) need tls.enabled" }}
{{- end }}
{{- if and (or .Values.tls.requireClientCert .Values.tls.clientSubjects) (not .Values.tls.clientCA.existingSecret) }}
{{- fail "tls.requireClientCert and tls.clientSubjects need tls.clientCA.existingSecret to verify client certificates against" }}
{{- end }}
{{- if le (int .Values.terminationGracePeriodSeconds) (add (int .Values.preStopSleepSeconds) 10) }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must exceed preStopSleepSeconds (%d) + the gateway's 10 s drain" (int .Values.terminationGracePeriodSeconds) (int .Values.preStopSleepSeconds)) }}
{{- end }}
{{- end }}

{{/* A setting's value as an environment variable: JSON for maps and lists, whole numbers without an exponent. */}}
{{- define "credgate.envValue" -}}
{{- $v := . }}
{{- if or (kindIs "map" $v) (kindIs "slice" $v) }}
{{- toJson $v }}
{{- else if and (kindIs "float64" $v) (eq $v (float64 (int64 $v))) }}
{{- int64 $v }}
{{- else }}
{{- $v }}
{{- end }}
{{- end }}

{{/* The probe handler: HTTP(S) GET of a path, or a TCP check when every client must present a certificate. */}}
{{- define "credgate.probeHandler" -}}
{{- if .root.Values.tls.requireClientCert }}
tcpSocket:
  port: http
{{- else }}
httpGet:
  path: {{ .path }}
  port: http
  scheme: {{ include "credgate.scheme" .root | upper }}
{{- end }}
{{- end }}

{{/* CREDGATE_DATABASE_URL, from the Secret or the value. */}}
{{- define "credgate.databaseEnv" -}}
- name: CREDGATE_DATABASE_URL
{{- if .Values.database.existingSecret }}
  valueFrom:
    secretKeyRef:
      name: {{ .Values.database.existingSecret }}
      key: {{ .Values.database.key }}
{{- else }}
  value: {{ .Values.database.url | quote }}
{{- end }}
{{- end }}

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
{{- define "credgate.vaultTokenDir" -}}/var/run/credgate/vault-token{{- end }}
{{- define "credgate.vaultCADir" -}}/etc/credgate/vault-ca{{- end }}
{{- define "credgate.tlsDir" -}}/etc/credgate/tls{{- end }}
{{- define "credgate.clientCADir" -}}/etc/credgate/client-ca{{- end }}
{{- define "credgate.configDir" -}}/etc/credgate/config{{- end }}

{{/*
Refuse values the gateway cannot run with, with one clear message each.
*/}}
{{- define "credgate.validate" -}}
{{- if and (has .Values.kek.source (list "file" "env")) (not .Values.kek.existingSecret) }}
{{- fail "kek.existingSecret is required: the name of the Secret holding the KEK (create it with `credgate keys generate --out kek` and `kubectl create secret generic NAME --from-file=kek=kek`)" }}
{{- end }}
{{- if and (eq .Values.kek.source "aws-kms") (not .Values.kek.aws.keyId) }}
{{- fail "kek.source=aws-kms needs kek.aws.keyId: the KMS key (key id, key ARN, alias/NAME or alias ARN) that wraps the KEK" }}
{{- end }}
{{- if and (eq .Values.kek.source "vault-transit") (or (not .Values.kek.vault.url) (not .Values.kek.vault.key) (not .Values.kek.vault.tokenSecret)) }}
{{- fail "kek.source=vault-transit needs kek.vault.url, kek.vault.key and kek.vault.tokenSecret (a Secret holding a token that may read, encrypt and decrypt with that transit key)" }}
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
{{- $allowed := splitList " " (include "credgate.settingsAllowlist" .) }}
{{- range $name, $_ := .Values.config }}
{{- if not (has $name $allowed) }}
{{- fail (printf "config.%s: not a setting the chart passes through (see values.schema.json); the KEK, database URL, bootstrap token and TLS come from their own values" $name) }}
{{- end }}
{{- end }}
{{- range .Values.extraEnv }}
{{- $var := upper (toString .name) }}
{{- if and (hasPrefix "CREDGATE_" $var) (not (has (lower (trimPrefix "CREDGATE_" $var)) $allowed)) }}
{{- fail (printf "extraEnv: %s is not a setting extraEnv may set; the KEK, database URL, bootstrap token and TLS come only from their own values (kek, database, bootstrapToken, tls)" .name) }}
{{- end }}
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
{{/*
A probe of .path. Under tls.requireClientCert the kubelet, which has no client certificate,
can't do an HTTPS GET: the probe runs deploy/healthcheck.py in the container, which asks the
gateway's plain-HTTP health listener on the pod's loopback (CREDGATE_HEALTH_LISTEN).
*/}}
{{- define "credgate.probeHandler" -}}
{{- if .root.Values.tls.requireClientCert }}
exec:
  command: ["python", "/usr/local/lib/credgate/healthcheck.py", {{ .path | quote }}]
{{- else }}
httpGet:
  path: {{ .path }}
  port: http
  scheme: {{ include "credgate.scheme" .root | upper }}
{{- end }}
{{- end }}

{{/* The Secret holding the database URL: database.existingSecret, or the chart's own (from database.url). */}}
{{- define "credgate.databaseSecret" -}}
{{- default (printf "%s-database-url" (include "credgate.fullname" . | trunc 50 | trimSuffix "-")) .Values.database.existingSecret }}
{{- end }}

{{/* CREDGATE_DATABASE_URL, always from a Secret: never a password in clear in a pod spec. */}}
{{- define "credgate.databaseEnv" -}}
- name: CREDGATE_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "credgate.databaseSecret" . }}
      key: {{ if .Values.database.existingSecret }}{{ .Values.database.key }}{{ else }}url{{ end }}
{{- end }}

{{/*
The settings allowlist: the gateway settings `config`, `configFile` and CREDGATE_* names in
`extraEnv` may set (values.schema.json's config enum; tests/deploy/test_helm.py keeps the two
equal). Everything else (the KEK, the database URL, the bootstrap token, TLS files, dev mode,
the data dir) comes only from the chart's own values.
*/}}
{{- define "credgate.settingsAllowlist" -}}
login_issuer login_client_id login_scopes console console_session_seconds console_reauth_seconds console_reveal_seconds audit_wait_seconds audit_checkpoint_every rate_per_address burst_per_address rate_per_principal burst_per_principal rate_per_action max_header_bytes max_concurrency workers keep_alive_seconds log_format log_level max_body_bytes page_size_max reaper_enabled reaper_interval_seconds reaper_leader_ttl_seconds pending_timeout_seconds delivery_deadline_seconds target_timeout_seconds target_pool_size target_pool_wait_seconds target_pool_idle_seconds revoke_backoff_base_seconds revoke_backoff_cap_seconds stuck_after_attempts material_cache_seconds database_pool_size database_connect_timeout_seconds database_statement_timeout_seconds cache_stale_seconds run_token_max_ttl_seconds trusted_proxies audit_checkpoint_seconds audit_refusal_window_seconds audit_refusal_first audit_refusal_table_size audit_retention_days audit_archive_dir audit_retention_check_seconds kek_kms_timeout_seconds kek_check_seconds kek_kms_grace_seconds backend_timeout_seconds tls_reload_check_seconds tls_refused_log_seconds
{{- end }}

{{/* Names ---------------------------------------------------------------- */}}

{{- define "seckill.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "seckill.fullname" -}}
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

{{/* Cluster-scoped objects are shared by every namespace: prefix the namespace. */}}
{{- define "seckill.clusterName" -}}
{{- printf "%s-%s" .Release.Namespace (include "seckill.fullname" .) | trunc 253 | trimSuffix "-" }}
{{- end }}

{{- define "seckill.operatorServiceAccount" -}}
{{- printf "%s-operator" (include "seckill.fullname" .) }}
{{- end }}

{{/* Pods that need no Kubernetes API access run under this one (no token). */}}
{{- define "seckill.workloadServiceAccount" -}}
{{- printf "%s-workload" (include "seckill.fullname" .) }}
{{- end }}

{{- define "seckill.redisBundledName" -}}
{{- printf "%s-redis" (include "seckill.fullname" .) }}
{{- end }}

{{/* Labels --------------------------------------------------------------- */}}

{{- define "seckill.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "seckill.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: seckill
{{- end }}

{{/* Usage: include "seckill.selectorLabels" (dict "root" $ "component" "command") */}}
{{- define "seckill.selectorLabels" -}}
app.kubernetes.io/name: {{ include "seckill.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Full labels of a component's objects and pods. */}}
{{- define "seckill.componentLabels" -}}
{{ include "seckill.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* The NetworkPolicy of the bundled Redis admits pods with this label only. */}}
{{- define "seckill.redisClientLabel" -}}
seckill.io/redis-client: "true"
{{- end }}

{{/* Images --------------------------------------------------------------- */}}

{{/* Usage: include "seckill.image" (dict "image" .Values.image "default" .Chart.AppVersion) */}}
{{- define "seckill.image" -}}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository (toString (default .default .image.tag)) }}
{{- end }}
{{- end }}

{{/* Redis ---------------------------------------------------------------- */}}

{{/* Exactly one Redis must be chosen; a clear message otherwise. */}}
{{- define "seckill.redisChoice" -}}
{{- $r := .Values.redis }}
{{- $n := 0 }}
{{- if $r.url }}{{ $n = add1 $n }}{{ end }}
{{- if $r.cluster.nodes }}{{ $n = add1 $n }}{{ end }}
{{- if $r.bundled.enabled }}{{ $n = add1 $n }}{{ end }}
{{- if eq $n 0 }}
{{- fail "seckill: no Redis configured. Set redis.url (external Redis, password in redis.existingSecret), redis.cluster.nodes (external Redis Cluster) or redis.bundled.enabled=true (evaluation only). Example: --set redis.url=redis://redis.example:6379" }}
{{- else if gt $n 1 }}
{{- fail "seckill: choose exactly one of redis.url, redis.cluster.nodes and redis.bundled.enabled" }}
{{- end }}
{{- if and $r.tls.enabled $r.url (not (hasPrefix "rediss://" $r.url)) }}
{{- fail "seckill: redis.tls.enabled applies to redis.cluster.nodes; for redis.url use a rediss:// URL" }}
{{- end }}
{{- if and $r.bundled.enabled $r.existingSecret }}
{{- fail "seckill: redis.existingSecret is for an external Redis; the bundled one uses a generated Secret" }}
{{- end }}
{{- end }}

{{/* TCP ports the workers and operator open to Redis (for egress rules). */}}
{{- define "seckill.redisPorts" -}}
{{- $r := .Values.redis }}
{{- $ports := list }}
{{- if $r.bundled.enabled }}
{{- $ports = append $ports 6379 }}
{{- else if $r.url }}
{{- $host := (urlParse $r.url).host }}
{{- $parts := splitList ":" $host }}
{{- if and (gt (len $parts) 1) (regexMatch "^[0-9]+$" (last $parts)) }}
{{- $ports = append $ports (atoi (last $parts)) }}
{{- else }}
{{- $ports = append $ports 6379 }}
{{- end }}
{{- else }}
{{- range $r.cluster.nodes }}
{{- $parts := splitList ":" (toString .) }}
{{- if and (gt (len $parts) 1) (regexMatch "^[0-9]+$" (last $parts)) }}
{{- $ports = append $ports (atoi (last $parts)) }}
{{- else }}
{{- $ports = append $ports 6379 }}
{{- end }}
{{- end }}
{{- end }}
{{- toJson (uniq $ports) }}
{{- end }}

{{/* Environment of every container that talks to Redis (CLI contract). */}}
{{- define "seckill.redisEnv" -}}
{{- $r := .Values.redis }}
{{- if $r.bundled.enabled }}
- name: SECKILL_REDIS_URL
  value: {{ printf "redis://%s.%s.svc:6379" (include "seckill.redisBundledName" .) .Release.Namespace | quote }}
- name: SECKILL_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "seckill.redisBundledName" . }}
      key: redis-password
{{- else }}
{{- if $r.url }}
- name: SECKILL_REDIS_URL
  value: {{ $r.url | quote }}
{{- else }}
- name: SECKILL_REDIS_CLUSTER_NODES
  value: {{ join "," $r.cluster.nodes | quote }}
{{- if $r.tls.enabled }}
- name: SECKILL_REDIS_TLS
  value: "true"
{{- end }}
{{- end }}
{{- if $r.username }}
- name: SECKILL_REDIS_USERNAME
  value: {{ $r.username | quote }}
{{- end }}
{{- if $r.existingSecret }}
- name: SECKILL_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $r.existingSecret }}
      key: {{ $r.existingSecretPasswordKey }}
{{- end }}
{{- if $r.tls.caSecret }}
- name: SECKILL_REDIS_CA_CERT
  value: {{ printf "/etc/seckill/redis-ca/%s" $r.tls.caSecretKey | quote }}
{{- end }}
{{- end }}
- name: SECKILL_REDIS_TIMEOUT_MS
  value: {{ $r.timeoutMs | int64 | quote }}
{{- if or $r.bundled.enabled $r.url }}
- name: SECKILL_REDIS_READ_MODEL_DB
  value: {{ $r.readModelDb | int64 | quote }}
{{- end }}
- name: SECKILL_LOG_FORMAT
  value: {{ .Values.logFormat | quote }}
{{- end }}

{{- define "seckill.redisCaVolumeMounts" -}}
{{- if and (not .Values.redis.bundled.enabled) .Values.redis.tls.caSecret }}
- name: redis-ca
  mountPath: /etc/seckill/redis-ca
  readOnly: true
{{- end }}
{{- end }}

{{- define "seckill.redisCaVolumes" -}}
{{- if and (not .Values.redis.bundled.enabled) .Values.redis.tls.caSecret }}
- name: redis-ca
  secret:
    secretName: {{ .Values.redis.tls.caSecret }}
    defaultMode: 0444
{{- end }}
{{- end }}

{{/* Hardening ------------------------------------------------------------ */}}

{{- define "seckill.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "seckill.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
privileged: false
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Usage: include "seckill.topologySpread" (dict "root" $ "component" "command") */}}
{{- define "seckill.topologySpread" -}}
- maxSkew: 1
  topologyKey: kubernetes.io/hostname
  whenUnsatisfiable: ScheduleAnyway
  labelSelector:
    matchLabels:
      {{- include "seckill.selectorLabels" . | nindent 6 }}
  matchLabelKeys: [pod-template-hash]
{{- end }}

{{/* Scheduling knobs shared by the component pod specs. Usage: include with the component values. */}}
{{- define "seckill.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{- define "seckill.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Ingress paths. Usage: include with (dict "separate" bool "path" "/api/v1" "full" fullname) */}}
{{- define "seckill.ingressPaths" -}}
{{- if .separate }}
# Ingress cannot route by method: only the customer read path, which no
# command endpoint shares, goes to the query pods. GET /api/v1/promotions/...
# shares its prefix with the grab POST and stays on the command pods.
- path: {{ printf "%s/customers" (trimSuffix "/" .path) }}
  pathType: Prefix
  backend:
    service:
      name: {{ .full }}-query
      port:
        name: http
{{- end }}
- path: {{ .path }}
  pathType: Prefix
  backend:
    service:
      name: {{ .full }}-command
      port:
        name: http
{{- end }}

{{/* NetworkPolicy fragments ------------------------------------------------ */}}
{{- define "seckill.np.dnsEgress" -}}
- ports:
    - port: 53
      protocol: UDP
    - port: 53
      protocol: TCP
  {{- with .Values.networkPolicy.dnsTo }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
{{- define "seckill.np.redisEgress" -}}
{{- if .Values.redis.bundled.enabled }}
- to:
    - podSelector:
        matchLabels:
          {{- include "seckill.selectorLabels" (dict "root" . "component" "redis") | nindent 10 }}
  ports:
    - port: 6379
      protocol: TCP
{{- else }}
- ports:
    {{- range (include "seckill.redisPorts" . | fromJsonArray) }}
    - port: {{ . }}
      protocol: TCP
    {{- end }}
  {{- with .Values.networkPolicy.externalRedisTo }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
{{- end }}
{{- define "seckill.np.metricsIngress" -}}
{{- if .Values.networkPolicy.metricsFrom }}
ingress:
  - from:
      {{- toYaml .Values.networkPolicy.metricsFrom | nindent 6 }}
    ports:
      - port: 9090
        protocol: TCP
{{- else }}
# No scraper configured (networkPolicy.metricsFrom): no ingress at all.
ingress: []
{{- end }}
{{- end }}

{{/* Monitoring ----------------------------------------------------------- */}}

{{/* PromQL label matchers selecting this release's seckill series: the
     labels Prometheus gives the targets of the chart's ServiceMonitor (job =
     Service name), unless metricsSelector says otherwise. */}}
{{- define "seckill.metricsSelector" -}}
{{- if .Values.metricsSelector }}
{{- .Values.metricsSelector }}
{{- else }}
{{- printf "namespace=%q,job=~%q" .Release.Namespace (printf "%s-(command|query|projector-metrics|operator-metrics)" (include "seckill.fullname" .)) }}
{{- end }}
{{- end }}

{{/* kube-state-metrics series of this release's HorizontalPodAutoscalers. */}}
{{- define "seckill.hpaSelector" -}}
{{- printf "namespace=%q,horizontalpodautoscaler=~%q" .Release.Namespace (printf "%s-(command|query)" (include "seckill.fullname" .)) }}
{{- end }}

{{/* runbook_url of an alert: its section of docs/RUNBOOK.md. */}}
{{- define "seckill.runbookUrl" -}}
{{- printf "%s#%s" .root.Values.prometheusRule.runbookBaseUrl (lower .alert) }}
{{- end }}

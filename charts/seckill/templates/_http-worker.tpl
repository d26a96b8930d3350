{{/*
The command and query workers share one shape: an HTTP Deployment on port 8080
(API + /healthz /readyz /metrics), its Service, HorizontalPodAutoscaler and
PodDisruptionBudget. Usage:
  include "seckill.httpWorker" (dict "root" $ "component" "command" "values" .Values.commandWorker "noQuery" false)
*/}}
{{- define "seckill.httpWorker" -}}
{{- $root := .root }}
{{- $v := .values }}
{{- $name := printf "%s-%s" (include "seckill.fullname" $root) .component }}
{{- $sel := dict "root" $root "component" .component }}
{{- if ge (add $v.preStopSleepSeconds $v.drainTimeoutSeconds) (int $v.terminationGracePeriodSeconds) }}
{{- fail (printf "seckill: %s: preStopSleepSeconds (%v) + drainTimeoutSeconds (%v) must be less than terminationGracePeriodSeconds (%v), or in-flight requests are killed" .component $v.preStopSleepSeconds $v.drainTimeoutSeconds $v.terminationGracePeriodSeconds) }}
{{- end }}
{{- $command := eq .component "command" }}
{{- if and $command (gt (int64 $v.durable.replicas) 0) $root.Values.redis.bundled.enabled }}
{{- fail "seckill: commandWorker.durable.replicas > 0 needs a replicated Redis; the bundled Redis has no replica, so every grant would be answered 503. Set commandWorker.durable.replicas=0 or use redis.url/redis.cluster.nodes" }}
{{- end }}
{{- if and $command (gt (int64 $v.durable.replicas) 0) (ge (int64 $v.durable.timeoutMs) (int64 $root.Values.redis.timeoutMs)) }}
{{- fail (printf "seckill: commandWorker.durable.timeoutMs (%d) must be below redis.timeoutMs (%d): the durable grab's replica wait (Redis WAIT) has to fit in the Redis response timeout, or the command workers refuse to start. Lower commandWorker.durable.timeoutMs or raise redis.timeoutMs" (int64 $v.durable.timeoutMs) (int64 $root.Values.redis.timeoutMs)) }}
{{- end }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ $name }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "seckill.componentLabels" $sel | nindent 4 }}
spec:
  {{- if not $v.autoscaling.enabled }}
  replicas: {{ $v.replicas }}
  {{- end }}
  revisionHistoryLimit: 5
  selector:
    matchLabels:
      {{- include "seckill.selectorLabels" $sel | nindent 6 }}
  strategy:
    type: RollingUpdate
    rollingUpdate:
      maxUnavailable: 0
      maxSurge: 1
  template:
    metadata:
      labels:
        {{- include "seckill.componentLabels" $sel | nindent 8 }}
        {{- include "seckill.redisClientLabel" $root | nindent 8 }}
      {{- with $v.podAnnotations }}
      annotations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    spec:
      serviceAccountName: {{ include "seckill.workloadServiceAccount" $root }}
      automountServiceAccountToken: false
      {{- with (include "seckill.imagePullSecrets" $root | trim) }}
      {{- . | nindent 6 }}
      {{- end }}
      securityContext:
        {{- include "seckill.podSecurityContext" $root | nindent 8 }}
      # The worker drains in-flight requests for drainTimeoutSeconds after
      # SIGTERM; preStop + drain stay within this grace period.
      terminationGracePeriodSeconds: {{ $v.terminationGracePeriodSeconds }}
      topologySpreadConstraints:
        {{- include "seckill.topologySpread" $sel | nindent 8 }}
      {{- with (include "seckill.scheduling" $v | trim) }}
      {{- . | nindent 6 }}
      {{- end }}
      containers:
        - name: {{ .component }}
          image: {{ include "seckill.image" (dict "image" $root.Values.image "default" $root.Chart.AppVersion) }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          command: [/usr/local/bin/seckill-worker]
          args: [{{ .component }}]
          env:
            - name: POD_NAME
              valueFrom:
                fieldRef:
                  fieldPath: metadata.name
            - name: POD_NAMESPACE
              valueFrom:
                fieldRef:
                  fieldPath: metadata.namespace
            - name: SECKILL_LISTEN
              value: "0.0.0.0:8080"
            - name: SECKILL_DRAIN_TIMEOUT_SECS
              value: {{ $v.drainTimeoutSeconds | int64 | quote }}
            - name: SECKILL_MAX_CONNECTIONS
              value: {{ $v.maxConnections | int64 | quote }}
            - name: SECKILL_MAX_IN_FLIGHT
              value: {{ $v.maxInFlight | int64 | quote }}
            - name: SECKILL_HEADER_READ_TIMEOUT_MS
              value: {{ $v.headerReadTimeoutMs | int64 | quote }}
            {{- if $command }}
            - name: SECKILL_GRAB_BATCH_MAX
              value: {{ $v.grabBatchMax | int64 | quote }}
            - name: SECKILL_FINISH_SKEW_WAIT_MS
              value: {{ $v.finishSkewWaitMs | int64 | quote }}
            - name: SECKILL_RATE_LIMIT_PER_SEC
              value: {{ $v.rateLimit.perSec | quote }}
            - name: SECKILL_RATE_LIMIT_BURST
              value: {{ $v.rateLimit.burst | int64 | quote }}
            - name: SECKILL_RATE_LIMIT_KEY
              value: {{ $v.rateLimit.key | quote }}
            - name: SECKILL_TRUST_FORWARDED_FOR
              value: {{ $v.rateLimit.trustForwardedFor | toString | quote }}
            - name: SECKILL_DURABLE_REPLICAS
              value: {{ $v.durable.replicas | int64 | quote }}
            - name: SECKILL_DURABLE_TIMEOUT_MS
              value: {{ $v.durable.timeoutMs | int64 | quote }}
            {{- end }}
            {{- with $root.Values.customerIdHeader }}
            - name: SECKILL_CUSTOMER_ID_HEADER
              value: {{ . | quote }}
            {{- end }}
            {{- if .noQuery }}
            - name: SECKILL_NO_QUERY
              value: "true"
            {{- end }}
            {{- with (include "seckill.redisEnv" $root | trim) }}
            {{- . | nindent 12 }}
            {{- end }}
            {{- with $v.extraEnv }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          ports:
            - name: http
              containerPort: 8080
              protocol: TCP
          livenessProbe:
            httpGet:
              path: /healthz
              port: http
            periodSeconds: 10
            timeoutSeconds: 2
            failureThreshold: 3
          readinessProbe:
            httpGet:
              path: /readyz
              port: http
            periodSeconds: 5
            timeoutSeconds: 2
            failureThreshold: 2
          lifecycle:
            preStop:
              # Native sleep action: the image has no shell. Gives the
              # endpoints controller and the proxies time to drop this pod
              # before SIGTERM starts the drain.
              sleep:
                seconds: {{ $v.preStopSleepSeconds }}
          resources:
            {{- toYaml $v.resources | nindent 12 }}
          securityContext:
            {{- include "seckill.containerSecurityContext" $root | nindent 12 }}
          {{- $mounts := include "seckill.redisCaVolumeMounts" $root }}
          {{- if $mounts }}
          volumeMounts:
            {{- $mounts | nindent 12 }}
          {{- end }}
      {{- $volumes := include "seckill.redisCaVolumes" $root }}
      {{- if $volumes }}
      volumes:
        {{- $volumes | nindent 8 }}
      {{- end }}
---
apiVersion: v1
kind: Service
metadata:
  name: {{ $name }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "seckill.componentLabels" $sel | nindent 4 }}
    seckill.io/metrics: "true"
spec:
  type: {{ $v.service.type }}
  selector:
    {{- include "seckill.selectorLabels" $sel | nindent 4 }}
  ports:
    - name: http
      port: {{ $v.service.port }}
      targetPort: http
      protocol: TCP
{{- if $v.autoscaling.enabled }}
---
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ $name }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "seckill.componentLabels" $sel | nindent 4 }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ $name }}
  minReplicas: {{ $v.autoscaling.minReplicas }}
  maxReplicas: {{ $v.autoscaling.maxReplicas }}
  metrics:
    - type: Resource
      resource:
        name: cpu
        target:
          type: Utilization
          averageUtilization: {{ $v.autoscaling.targetCPUUtilizationPercentage }}
  behavior:
    scaleUp:
      # A flash sale ramps in seconds: scale up fast, down slowly.
      stabilizationWindowSeconds: 0
      policies:
        - type: Percent
          value: 100
          periodSeconds: 15
    scaleDown:
      stabilizationWindowSeconds: 300
{{- end }}
{{- if $v.pdb.enabled }}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ $name }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "seckill.componentLabels" $sel | nindent 4 }}
spec:
  maxUnavailable: {{ $v.pdb.maxUnavailable }}
  selector:
    matchLabels:
      {{- include "seckill.selectorLabels" $sel | nindent 6 }}
{{- end }}
{{- end }}

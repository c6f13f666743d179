{{/* Names: KubeRay derives service and pod names from the RayService name, so keep it short. */}}
{{- define "motionserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" }}
{{- end }}

{{- define "motionserve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "motionserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "motionserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "motionserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "motionserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "motionserve.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "motionserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "motionserve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "motionserve.serveServiceName" -}}
{{- printf "%s-serve-svc" (include "motionserve.fullname" .) }}
{{- end }}

{{- define "motionserve.apiKeySecretName" -}}
{{- default (printf "%s-api-keys" (include "motionserve.fullname" .)) .Values.auth.existingSecret }}
{{- end }}

{{- define "motionserve.authEnabled" -}}
{{- if or .Values.auth.existingSecret .Values.auth.apiKeys }}true{{ end }}
{{- end }}

{{/*
Recursive merge of .src into .dst, in place: maps merge key by key, anything else (lists,
scalars, null) replaces. Unlike sprig's mergeOverwrite it also applies 0, false and "".
*/}}
{{- define "motionserve.deepMerge" -}}
{{- $dst := .dst }}
{{- range $key, $value := .src }}
{{- if and (kindIs "map" $value) (hasKey $dst $key) (kindIs "map" (get $dst $key)) }}
{{- include "motionserve.deepMerge" (dict "dst" (get $dst $key) "src" $value) }}
{{- else }}
{{- $_ := set $dst $key $value }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The Serve deploy config (serveConfigV2): files/serve/<serve.config>.yaml, a byte-identical copy
of serve/configs/<config>.yaml, with serve.appArgs merged into the application's args and
serve.deploymentOverrides into the named deployments.
*/}}
{{- define "motionserve.serveConfig" -}}
{{- $path := printf "files/serve/%s.yaml" .Values.serve.config }}
{{- $raw := .Files.Get $path }}
{{- if not $raw }}
{{- fail (printf "%s is missing from the chart: run `make chart-sync`" $path) }}
{{- end }}
{{- $config := fromYaml $raw }}
{{- if hasKey $config "Error" }}
{{- fail (printf "%s does not parse: %s" $path $config.Error) }}
{{- end }}
{{- $overrides := deepCopy .Values.serve.deploymentOverrides }}
{{- range $app := $config.applications }}
{{- include "motionserve.deepMerge" (dict "dst" $app.args "src" (deepCopy $.Values.serve.appArgs)) }}
{{- range $deployment := $app.deployments }}
{{- if hasKey $overrides $deployment.name }}
{{- include "motionserve.deepMerge" (dict "dst" $deployment "src" (get $overrides $deployment.name)) }}
{{- $_ := unset $overrides $deployment.name }}
{{- end }}
{{- end }}
{{- end }}
{{- if $overrides }}
{{- fail (printf "serve.deploymentOverrides names deployments that %s does not have: %s" $path (keys $overrides | sortAlpha | join ", ")) }}
{{- end }}
{{- toYaml $config }}
{{- end }}

{{/* Spot / on-demand node selectors and tolerations of .capacity ("spot" or "on-demand"). */}}
{{- define "motionserve.capacityPreset" -}}
{{- $presets := dict
  "karpenter" (dict
    "spot" (dict "key" "karpenter.sh/capacity-type" "value" "spot" "taint" true)
    "on-demand" (dict "key" "karpenter.sh/capacity-type" "value" "on-demand" "taint" false))
  "gke" (dict
    "spot" (dict "key" "cloud.google.com/gke-spot" "value" "true" "taint" true)
    "on-demand" (dict "key" "" "value" "" "taint" false))
  "eks" (dict
    "spot" (dict "key" "eks.amazonaws.com/capacityType" "value" "SPOT" "taint" true)
    "on-demand" (dict "key" "eks.amazonaws.com/capacityType" "value" "ON_DEMAND" "taint" false))
}}
{{- $preset := dict "nodeSelector" (dict) "tolerations" (list) }}
{{- if hasKey $presets .provider }}
{{- $entry := get (get $presets .provider) .capacity }}
{{- if $entry.key }}
{{- $_ := set $preset.nodeSelector $entry.key $entry.value }}
{{- end }}
{{- if $entry.taint }}
{{- $_ := set $preset "tolerations" (list (dict "key" $entry.key "operator" "Equal" "value" $entry.value "effect" "NoSchedule")) }}
{{- end }}
{{- end }}
{{- toYaml $preset }}
{{- end }}

{{/* Environment of every Ray container (head and workers). */}}
{{- define "motionserve.env" -}}
- name: MOTIONSERVE_CACHE_DIR
  value: /var/cache/motionserve
- name: MOTIONSERVE_S3_REGION
  value: {{ .Values.s3.region | quote }}
- name: AWS_REGION
  value: {{ .Values.s3.region | quote }}
- name: AWS_DEFAULT_REGION
  value: {{ .Values.s3.region | quote }}
{{- with .Values.s3.endpointUrl }}
- name: MOTIONSERVE_S3_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- if include "motionserve.authEnabled" . }}
- name: MOTIONSERVE_API_KEYS
  valueFrom:
    secretKeyRef:
      name: {{ include "motionserve.apiKeySecretName" . }}
      key: {{ .Values.auth.secretKey }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Volumes of every Ray pod: the object store's shared memory and the model cache. */}}
{{- define "motionserve.volumes" -}}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .shmSize }}
- name: cache
  emptyDir:
    sizeLimit: {{ .cacheSize }}
{{- end }}

{{- define "motionserve.volumeMounts" -}}
- name: dshm
  mountPath: /dev/shm
- name: cache
  mountPath: /var/cache/motionserve
{{- end }}

{{/*
A worker group. Its preStop hook marks the Ray node as draining (Serve starts replacement
replicas elsewhere and sends no new requests here), then waits, bounded, until this pod's Serve
replicas are gone. "[S]erveReplica" keeps grep from matching its own command line.
*/}}
{{- define "motionserve.workerGroup" -}}
{{- $root := .root }}
{{- $group := .group }}
{{- $placement := include "motionserve.capacityPreset" (dict "provider" $root.Values.nodePlacement.provider "capacity" .capacity) | fromYaml }}
{{- $nodeSelector := merge (deepCopy $group.nodeSelector) $placement.nodeSelector }}
{{- $tolerations := concat $placement.tolerations $group.tolerations }}
{{- if .gpu }}
{{- $tolerations = append $tolerations (dict "key" "nvidia.com/gpu" "operator" "Exists" "effect" "NoSchedule") }}
{{- end }}
- groupName: {{ .name }}
  replicas: {{ $group.minReplicas }}
  minReplicas: {{ $group.minReplicas }}
  maxReplicas: {{ $group.maxReplicas }}
  {{- if $group.idleTimeoutSeconds }}
  idleTimeoutSeconds: {{ $group.idleTimeoutSeconds }}
  {{- end }}
  priority: {{ $group.priority }}
  rayStartParams:
    {{- toYaml (merge (deepCopy $group.rayStartParams) (dict "metrics-export-port" (toString $root.Values.metrics.port))) | nindent 4 }}
  template:
    metadata:
      labels:
        {{- include "motionserve.selectorLabels" $root | nindent 8 }}
        app.kubernetes.io/component: {{ printf "ray-worker-%s" .name }}
        motionserve.io/capacity-type: {{ .capacity }}
        {{- with $root.Values.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with $group.podAnnotations }}
      annotations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    spec:
      serviceAccountName: {{ include "motionserve.serviceAccountName" $root }}
      terminationGracePeriodSeconds: {{ $root.Values.drain.terminationGracePeriodSeconds }}
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $group.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: ray-worker
          image: {{ include "motionserve.image" $root }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          resources:
            {{- toYaml $group.resources | nindent 12 }}
          env:
            {{- include "motionserve.env" $root | nindent 12 }}
          ports:
            - name: serve
              containerPort: {{ $root.Values.service.port }}
            - name: metrics
              containerPort: {{ $root.Values.metrics.port }}
          lifecycle:
            preStop:
              exec:
                command:
                  - /bin/sh
                  - -c
                  - >-
                    ray drain-node --reason=DRAIN_NODE_REASON_PREEMPTION
                    --reason-message="pod $HOSTNAME is terminating"
                    --deadline-remaining-seconds={{ $root.Values.drain.terminationGracePeriodSeconds }}
                    || true;
                    waited=0;
                    while [ "$waited" -lt {{ $root.Values.drain.maxWaitSeconds }} ]
                    && grep -qs "[S]erveReplica" /proc/[0-9]*/cmdline;
                    do sleep 1; waited=$((waited + 1)); done
          volumeMounts:
            {{- include "motionserve.volumeMounts" $root | nindent 12 }}
      volumes:
        {{- include "motionserve.volumes" (dict "shmSize" $group.shmSize "cacheSize" $root.Values.cache.sizeLimit) | nindent 8 }}
{{- end }}

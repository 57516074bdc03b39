{{/* Names and labels. */}}
{{- define "ray-executor.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "ray-executor.fullname" -}}
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

{{/* Labels every object carries. */}}
{{- define "ray-executor.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "ray-executor.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: ray-executor
{{- end -}}

{{/* Selector labels of this release's pods: every podSelector carries them, so no policy or
monitor of the chart ever selects a pod it did not make. */}}
{{- define "ray-executor.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ray-executor.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* An image reference: repository@digest when a digest is given, else repository:tag. */}}
{{- define "ray-executor.image" -}}
{{- if .digest -}}
{{- printf "%s@%s" .repository .digest -}}
{{- else -}}
{{- printf "%s:%s" .repository (toString .tag) -}}
{{- end -}}
{{- end -}}

{{/* Pull policy: as given, else Always for a tag (it may move) and IfNotPresent for a digest. */}}
{{- define "ray-executor.pullPolicy" -}}
{{- .pullPolicy | default (ternary "IfNotPresent" "Always" (not (empty .digest))) -}}
{{- end -}}

{{/* Settings the chart derives itself: never in .Values.config. */}}
{{- define "ray-executor.derivedSettings" -}}
{{- list "RAY_ADDRESS" "RAY_EXECUTOR_QUEUE" "VLLM_URL" "RAY_EXECUTOR_ROUTES_FILE" "RAY_EXECUTOR_ROUTE" | toJson -}}
{{- end -}}

{{- define "ray-executor.routesFile" -}}/etc/ray-executor/routes.json{{- end -}}

{{/*
One route with everything derived from it, as JSON (include ... | fromJson):
  processes, threads, prefetch: the route's worker settings (a prefetch of 0 becomes the
    code's own default: the process's share of the route's capacity, at most 2 x threads);
  capacity: the sum of its endpoints' concurrency;
  perPod: jobs one worker pod holds (processes x prefetch), the HPA's target per pod;
  maxReplicas: ceil(capacity / perPod), at least minReplicas;
  rayAddress: given, or the head Service of the route's in-chart RayCluster;
  cluster: the merged RayCluster values (enabled false when none).
Called with (dict "root" $ "route" $route).
*/}}
{{- define "ray-executor.route" -}}
{{- $root := .root -}}
{{- $route := .route -}}
{{- $config := $root.Values.config -}}
{{- $worker := mustMergeOverwrite (deepCopy $root.Values.workerDefaults) (deepCopy ($route.worker | default dict)) -}}
{{- $processes := int (default $config.RAY_EXECUTOR_WORKER_PROCESSES $worker.processes) -}}
{{- $threads := int (default $config.RAY_EXECUTOR_WORKER_THREADS $worker.threads) -}}
{{- $prefetch := int (default $config.RAY_EXECUTOR_WORKER_PREFETCH $worker.prefetch) -}}
{{- $capacity := 0 -}}
{{- range $endpoint := $route.vllm.endpoints -}}
{{- $capacity = add $capacity (int (default $config.RAY_EXECUTOR_VLLM_CONCURRENCY $endpoint.concurrency)) -}}
{{- end -}}
{{- if le $capacity 0 -}}
{{- fail (printf "route %s: its vLLM endpoints have no concurrency (capacity 0)" $route.name) -}}
{{- end -}}
{{- if le $processes 0 -}}
{{- fail (printf "route %s: worker processes must be at least 1" $route.name) -}}
{{- end -}}
{{- if eq $prefetch 0 -}}
{{- $share := div (add $capacity (sub $processes 1)) $processes -}}
{{- $prefetch = max 1 (min (mul 2 $threads) $share) -}}
{{- end -}}
{{- $perPod := mul $processes $prefetch -}}
{{- $minReplicas := int (default 1 $worker.minReplicas) -}}
{{- $maxReplicas := max $minReplicas (div (add $capacity (sub $perPod 1)) $perPod) -}}
{{- $fullname := include "ray-executor.fullname" $root -}}
{{- $cluster := mustMergeOverwrite (deepCopy $root.Values.rayClusterDefaults) (deepCopy ($route.rayCluster | default dict)) -}}
{{- $clusterName := printf "%s-%s" $fullname $route.name | trunc 50 | trimSuffix "-" -}}
{{- $rayAddress := $route.rayAddress | default "" -}}
{{- if and (not $rayAddress) $cluster.enabled -}}
{{- $rayAddress = printf "ray://%s-head-svc.%s.svc.cluster.local:10001" $clusterName $root.Release.Namespace -}}
{{- end -}}
{{- if not $rayAddress -}}
{{- fail (printf "route %s: set rayAddress or rayCluster.enabled" $route.name) -}}
{{- end -}}
{{- $budget := int $cluster.clientConnectionBudget -}}
{{- if gt (mul $maxReplicas $processes) $budget -}}
{{- fail (printf "route %s: up to %d worker pods x %d processes = %d Ray client connections, over the budget of %d (rayClusterDefaults.clientConnectionBudget)" $route.name $maxReplicas $processes (mul $maxReplicas $processes) $budget) -}}
{{- end -}}
{{- $image := mustMergeOverwrite (deepCopy $root.Values.images.worker) (deepCopy ($worker.image | default dict)) -}}
{{- dict "name" $route.name "queue" $route.queue "rayAddress" $rayAddress "processes" $processes "threads" $threads "prefetch" $prefetch "capacity" $capacity "perPod" $perPod "minReplicas" $minReplicas "maxReplicas" $maxReplicas "clusterName" $clusterName "cluster" $cluster "image" $image "worker" $worker "firstUrl" (first $route.vllm.endpoints).url | toJson -}}
{{- end -}}

{{/* Checks of the values as a whole; included once by the ConfigMap. */}}
{{- define "ray-executor.validate" -}}
{{- $derived := include "ray-executor.derivedSettings" . | fromJsonArray -}}
{{- range $key := keys .Values.config | sortAlpha -}}
{{- if has $key $derived -}}
{{- fail (printf "config.%s: the chart derives this setting from routes; remove it from config" $key) -}}
{{- end -}}
{{- end -}}
{{- if not .Values.routes -}}
{{- fail "routes: at least one route is needed" -}}
{{- end -}}
{{- $names := list -}}
{{- $queues := list -}}
{{- $defaults := 0 -}}
{{- range $route := .Values.routes -}}
{{- if not (regexMatch "^[a-z0-9]([-a-z0-9]{0,23}[a-z0-9])?$" (toString $route.name)) -}}
{{- fail (printf "routes: name %q must be a DNS label of at most 25 characters" (toString $route.name)) -}}
{{- end -}}
{{- if has $route.name $names -}}
{{- fail (printf "routes: name %s is used twice" $route.name) -}}
{{- end -}}
{{- if has $route.queue $queues -}}
{{- fail (printf "routes: queue %s is used by two routes" $route.queue) -}}
{{- end -}}
{{- $names = append $names $route.name -}}
{{- $queues = append $queues $route.queue -}}
{{- if and $route.match $route.match.default -}}
{{- $defaults = add1 $defaults -}}
{{- end -}}
{{- end -}}
{{- if ne $defaults 1 -}}
{{- fail (printf "routes: exactly one route must have match.default: true (found %d)" $defaults) -}}
{{- end -}}
{{- if not (has .Values.autoscaling.mode (list "hpa" "keda" "none")) -}}
{{- fail (printf "autoscaling.mode: %q is not hpa, keda or none" .Values.autoscaling.mode) -}}
{{- end -}}
{{- end -}}

{{/* The default route (match.default: true), derived. */}}
{{- define "ray-executor.defaultRoute" -}}
{{- $root := . -}}
{{- range $route := .Values.routes -}}
{{- if and $route.match $route.match.default -}}
{{- include "ray-executor.route" (dict "root" $root "route" $route) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The routes file: the service's JSON shape (issue 19). */}}
{{- define "ray-executor.routesJson" -}}
{{- $root := . -}}
{{- $routes := list -}}
{{- range $route := .Values.routes -}}
{{- $info := include "ray-executor.route" (dict "root" $root "route" $route) | fromJson -}}
{{- $endpoints := list -}}
{{- range $endpoint := $route.vllm.endpoints -}}
{{- $endpoints = append $endpoints (dict "url" $endpoint.url "concurrency" (int (default $root.Values.config.RAY_EXECUTOR_VLLM_CONCURRENCY $endpoint.concurrency))) -}}
{{- end -}}
{{- $vllm := dict "endpoints" $endpoints -}}
{{- if $route.vllm.nodeResource -}}
{{- $_ := set $vllm "node_resource" $route.vllm.nodeResource -}}
{{- end -}}
{{- $routes = append $routes (dict "name" $route.name "queue" $route.queue "ray_address" $info.rayAddress "match" ($route.match | default dict) "vllm" $vllm) -}}
{{- end -}}
{{- dict "routes" $routes | toPrettyJson -}}
{{- end -}}

{{/* Pod-level security: every pod of the chart meets the "restricted" Pod Security Standard. */}}
{{- define "ray-executor.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 1000
runAsGroup: 1000
fsGroup: 1000
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "ray-executor.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 1000
runAsGroup: 1000
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* checkov checks skipped on every workload, with the reason (tests/deploy checks each
skip carries one). */}}
{{- define "ray-executor.checkovSkips" -}}
checkov.io/skip1: CKV_K8S_43=Images are pinned by digest through images.*.digest once pushed to your registry; the chart's defaults are placeholders that cannot carry a digest.
checkov.io/skip2: CKV_K8S_35=Settings are read from environment variables only (12-factor); the Secret is referenced key by key, never written into the manifest.
checkov.io/skip3: CKV_K8S_40=UID 1000 is the image's own user (docker/*.Dockerfile) and the ray user of the Ray images; the pod also runs with runAsNonRoot, no privilege escalation and no capabilities.
{{- end -}}

{{/* A secretKeyRef environment variable. (dict "name" ENV "root" $) */}}
{{- define "ray-executor.secretEnv" -}}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ .root.Values.existingSecret }}
      key: {{ .name }}
{{- end -}}

{{/* Checksum of the settings and routes: a change rolls every pod that reads them. */}}
{{- define "ray-executor.configChecksum" -}}
checksum/config: {{ include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
{{- end -}}

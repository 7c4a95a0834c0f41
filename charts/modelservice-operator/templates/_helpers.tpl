{{/* Names, labels and small shared pieces. Everything else in templates/ says what it renders. */}}

{{- define "modelservice.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* <release>-<chart>, or just the release if it already names the chart; 63 is the DNS label limit. */}}
{{- define "modelservice.fullname" -}}
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

{{/* Gateway objects: the suffix must survive truncation, so truncate the prefix. */}}
{{- define "modelservice.gatewayName" -}}
{{- printf "%s-gateway" (include "modelservice.fullname" . | trunc 55 | trimSuffix "-") }}
{{- end }}

{{/*
Cluster-scoped objects (ClusterRoles, bindings) carry the release namespace too: two releases of the same name in
two namespaces (one per tenant, with watchNamespaces) must not fight over one ClusterRole.
*/}}
{{- define "modelservice.clusterName" -}}
{{- printf "%s-%s" .Release.Namespace (include "modelservice.fullname" .) }}
{{- end }}

{{- define "modelservice.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "modelservice.imageTag" -}}
{{- .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "modelservice.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (include "modelservice.imageTag" .) }}
{{- end }}
{{- end }}

{{- define "modelservice.selectorLabels" -}}
app.kubernetes.io/name: {{ include "modelservice.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The version label tells what runs, so it follows image.tag rather than the chart. */}}
{{- define "modelservice.labels" -}}
helm.sh/chart: {{ include "modelservice.chart" . }}
{{ include "modelservice.selectorLabels" . }}
app.kubernetes.io/version: {{ include "modelservice.imageTag" . | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: modelservice
{{- end }}

{{/* Per-component labels; call with (dict "ctx" $ "component" "operator"). */}}
{{- define "modelservice.componentLabels" -}}
{{ include "modelservice.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "modelservice.componentSelectorLabels" -}}
{{ include "modelservice.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* A label map as k=v,k=v (sorted by key): a label selector on a command line. */}}
{{- define "modelservice.labelList" -}}
{{- $out := list }}
{{- range $k, $v := . }}
{{- $out = append $out (printf "%s=%s" $k $v) }}
{{- end }}
{{- join "," $out }}
{{- end }}

{{- define "modelservice.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "modelservice.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "modelservice.gatewayServiceAccountName" -}}
{{- if .Values.gateway.serviceAccount.create }}
{{- default (include "modelservice.gatewayName" .) .Values.gateway.serviceAccount.name }}
{{- else }}
{{- required "gateway.serviceAccount.name is required when gateway.serviceAccount.create is false" .Values.gateway.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* PodDisruptionBudget moved to policy/v1 in 1.21; 1.20 serves only policy/v1beta1. */}}
{{- define "modelservice.pdbApiVersion" -}}
{{- if semverCompare ">=1.21-0" .Capabilities.KubeVersion.Version -}}
policy/v1
{{- else -}}
policy/v1beta1
{{- end }}
{{- end }}

{{/* The restricted Pod Security profile, shared by the operator and the gateway. */}}
{{- define "modelservice.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "modelservice.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
runAsUser: 65532
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* serviceMonitor.enabled is true, false or "auto" (render only when the cluster has the CRD). */}}
{{- define "modelservice.serviceMonitorEnabled" -}}
{{- $v := .Values.serviceMonitor.enabled }}
{{- if eq (toString $v) "auto" }}
{{- if .Capabilities.APIVersions.Has "monitoring.coreos.com/v1/ServiceMonitor" }}true{{ end }}
{{- else if $v }}true{{ end }}
{{- end }}

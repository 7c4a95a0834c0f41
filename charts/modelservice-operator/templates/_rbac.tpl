{{/*
The exact permissions of the operator and the gateway. tests/unit/test_chart.py holds the same list: a change here
is a change of the product's security surface and must change the test too.
*/}}

{{/* Operator, namespaced resources: a ClusterRole cluster-wide, a Role per namespace with watchNamespaces. */}}
{{- define "modelservice.operatorRules" -}}
{{- /* Read-only on ModelServices: the operator never writes spec, only the status subresource. */}}
- apiGroups: ["serving.modelservice.dev"]
  resources: ["modelservices"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["serving.modelservice.dev"]
  resources: ["modelservices/status"]
  verbs: ["get", "patch"]
{{- /* Children: server-side apply is a PATCH, and needs create when it creates; no update (PUT) is ever sent. */}}
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["apps"]
  resources: ["deployments/scale"]
  verbs: ["patch"]
- apiGroups: [""]
  resources: ["services", "persistentvolumeclaims"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["autoscaling"]
  resources: ["horizontalpodautoscalers"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
{{- /* A NetworkPolicy per model (networkPolicy.enabled); watched and deleted also when off, to remove ours. */}}
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
{{- /* Pods to explain status (unschedulable, crash loops); patched only to reserve a node for a waiting pod (its
annotation, then status.nominatedNodeName: docs/gpu-pool.md). Activity Leases are the gateway's, read here. */}}
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: [""]
  resources: ["pods/status"]
  verbs: ["patch"]
- apiGroups: ["coordination.k8s.io"]
  resources: ["leases"]
  verbs: ["get", "list", "watch"]
{{- /* get: a repeated Event is counted on the existing object, which may predate this process. */}}
- apiGroups: [""]
  resources: ["events"]
  verbs: ["get", "create", "patch"]
{{- end }}

{{/* Operator, cluster-scoped: kopf checks the CRD at startup; the GPU pool planner reads Nodes (labels, taints,
allocatable GPUs) to know where a waiting model's pod fits (docs/gpu-pool.md). Always a ClusterRole. */}}
{{- define "modelservice.operatorClusterRules" -}}
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["get", "list", "watch"]
- apiGroups: [""]
  resources: ["nodes"]
  verbs: ["get", "list", "watch"]
{{- end }}

{{/* Gateway: all namespaced. It scales a model 0→1 on wake; Secrets only when it checks API keys. */}}
{{- define "modelservice.gatewayRules" -}}
- apiGroups: ["serving.modelservice.dev"]
  resources: ["modelservices"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["discovery.k8s.io"]
  resources: ["endpointslices"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["apps"]
  resources: ["deployments/scale"]
  verbs: ["get", "patch", "update"]
- apiGroups: ["coordination.k8s.io"]
  resources: ["leases"]
  verbs: ["get", "list", "watch", "create", "update", "patch"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- if .Values.gateway.apiKeys.enabled }}
{{- /* get only: the gateway fetches the Secrets that ModelServices name (and re-fetches them for rotation); it
never lists or watches Secrets, so it cannot enumerate them. */}}
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
{{- end }}
{{- end }}

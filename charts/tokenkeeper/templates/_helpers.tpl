{{- define "tokenkeeper.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "tokenkeeper.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "tokenkeeper.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "tokenkeeper.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "tokenkeeper.labels" -}}
{{ include "tokenkeeper.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* The rules the operator needs on watched namespaces. */}}
{{- define "tokenkeeper.rules" -}}
# patch: the finalizer that holds a deleted OAuth 2.0 connection until its
# tokens are revoked.
- apiGroups: [tokenkeeper.dev]
  resources: [sourceconnections]
  verbs: [get, list, watch, patch]
- apiGroups: [tokenkeeper.dev]
  resources: [sourceconnections/status]
  verbs: [get, patch, update]
# Owner references with blockOwnerDeletion need this where the
# OwnerReferencesPermissionEnforcement admission plugin runs.
- apiGroups: [tokenkeeper.dev]
  resources: [sourceconnections/finalizers]
  verbs: [update]
# get: input and managed Secrets; list/watch: metadata of referenced Secrets
# and the managed ones; create: target and state Secrets (which lets the
# operator create any Secret in a watched namespace: see README, Security);
# patch: server-side apply of the target Secret, and the state Secret with
# its resourceVersion; delete: the Secret a renamed target no longer names
# (only one the connection owns, preconditioned on its uid).
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- end -}}

{{/* Names and labels shared by every template. */}}

{{- define "instseg.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "instseg.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "instseg.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "instseg.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "instseg.selectorLabels" -}}
app.kubernetes.io/name: {{ include "instseg.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "instseg.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "instseg.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "instseg.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "instseg.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create=false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "instseg.operatorImage" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "instseg.trainerImage" -}}
{{- printf "%s:%s" .Values.trainer.image.repository (default .Chart.AppVersion .Values.trainer.image.tag) -}}
{{- end -}}

{{/* Peering objects cannot be created for a namespace glob: say so at install time. */}}
{{- define "instseg.checkNamespaces" -}}
{{- if .Values.peering.enabled -}}
{{- range .Values.watchNamespaces -}}
{{- if regexMatch "[*?\\[!]" . -}}
{{- fail (printf "watchNamespaces: %q is a glob; the chart creates a KopfPeering in each watched namespace, so list exact names or set peering.enabled=false" .) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

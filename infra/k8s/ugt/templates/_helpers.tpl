{{/* Names and labels shared by every object of the chart. */}}
{{- define "ugt.fullname" -}}
{{- printf "%s" .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "ugt.labels" -}}
app.kubernetes.io/part-of: ugt
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* selector labels of one component: include "ugt.selector" (list . "serving") */}}
{{- define "ugt.selector" -}}
app.kubernetes.io/instance: {{ (index . 0).Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{/* the component label beside "ugt.labels" (which has the instance): include "ugt.component" (list . "serving") */}}
{{- define "ugt.component" -}}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "ugt.image" -}}
{{- printf "%s:%s" .repository .tag -}}
{{- end -}}

{{/* Kafka bootstrap servers: Strimzi's bootstrap Service of the chart's cluster, or the external one. */}}
{{- define "ugt.kafkaBootstrap" -}}
{{- if .Values.kafka.enabled -}}
{{- printf "%s-kafka-bootstrap:9092" .Values.kafka.name -}}
{{- else -}}
{{- required "kafka.externalBootstrap is required when kafka.enabled is false" .Values.kafka.externalBootstrap -}}
{{- end -}}
{{- end -}}

{{- define "ugt.registryUrl" -}}
{{- printf "http://%s-schema-registry:%d/apis/ccompat/v7" (include "ugt.fullname" .) (int .Values.schemaRegistry.port) -}}
{{- end -}}

{{/* Redis URL of the jobs and serving (UGT_REDIS_URL): a Redis Cluster's nodes as redis+cluster://host:port,...
     (infra/redis_client.py opens a cluster client for it), or the standalone master. */}}
{{- define "ugt.redisUrl" -}}
{{- if eq .Values.redis.mode "cluster" -}}
{{- printf "redis+cluster://%s" (include "ugt.feastConnection" .) -}}
{{- else -}}
{{- printf "redis://%s-redis:%d/0" (include "ugt.fullname" .) (int .Values.redis.port) -}}
{{- end -}}
{{- end -}}

{{/* Feast's connection_string: every node of a Redis Cluster (the client discovers the slots), or the master. */}}
{{- define "ugt.feastConnection" -}}
{{- $root := . -}}
{{- $name := include "ugt.fullname" . -}}
{{- if eq .Values.redis.mode "cluster" -}}
{{- $nodes := list -}}
{{- range $i := until (int (mul .Values.redis.masters (add1 .Values.redis.replicasPerMaster))) -}}
{{- $nodes = append $nodes (printf "%s-redis-%d.%s-redis-headless:%d" $name $i $name (int $root.Values.redis.port)) -}}
{{- end -}}
{{- join "," $nodes -}}
{{- else -}}
{{- printf "%s-redis:%d" $name (int .Values.redis.port) -}}
{{- end -}}
{{- end -}}

{{/* The environment every UGT process reads (infra/settings.py UGT_* variables). */}}
{{- define "ugt.env" -}}
- name: UGT_KAFKA_BOOTSTRAP
  value: {{ include "ugt.kafkaBootstrap" . | quote }}
- name: UGT_REGISTRY_URL
  value: {{ include "ugt.registryUrl" . | quote }}
- name: UGT_REDIS_URL
  value: {{ include "ugt.redisUrl" . | quote }}
- name: UGT_VAR
  value: /var/ugt
{{- end -}}

{{/* The volumes that hold Feast's registry + offline files and the overriding feature_store.yaml. */}}
{{- define "ugt.feastVolumes" -}}
- name: feast-data
  persistentVolumeClaim:
    claimName: {{ .Values.feast.sharedClaim.name }}
- name: feast-config
  configMap:
    name: {{ include "ugt.fullname" . }}-feast
{{- end -}}

{{- define "ugt.feastMounts" -}}
- name: feast-data
  mountPath: /opt/ugt/feature_repo/data
  subPath: feast
- name: feast-data
  mountPath: /var/ugt
- name: feast-config
  mountPath: /opt/ugt/feature_repo/feature_store.yaml
  subPath: feature_store.yaml
{{- end -}}

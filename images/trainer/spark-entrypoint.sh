#!/usr/bin/env bash
# The Spark image's entrypoint (/opt/entrypoint.sh): Spark on Kubernetes (and so the Kubeflow Spark
# Operator) creates the driver and executor pods with only `args`, so the image's ENTRYPOINT decides how
# they start. The contract, as Spark's Kubernetes backend sets up the pods:
#   driver ARGS…  the driver pod: spark-submit in client mode (the cluster-mode submission already
#                 happened outside the pod) bound to the pod's IP, $SPARK_DRIVER_BIND_ADDRESS; ARGS are
#                 `--properties-file …/spark.properties --class org.apache.spark.deploy.PythonRunner FILE …`
#   executor      an executor pod: the JVM runs KubernetesExecutorBackend, configured by the SPARK_* env
#                 the driver puts on the pod (SPARK_DRIVER_URL, SPARK_EXECUTOR_ID, …; JVM options in
#                 SPARK_JAVA_OPT_0, _1, … in that order)
#   anything else run as given (the default command is `recsys --help`)
# SPARK_HOME is pyspark's package folder: the pip package ships Spark's bin/ scripts and jars/.
set -euo pipefail

die() {
  echo "entrypoint: $*" >&2
  exit 64
}

# The variables a branch cannot start without: Spark's Kubernetes backend always sets them, so a missing
# one means the container was started by hand or by something else; name it instead of failing in Java.
require() {
  local role="$1" var
  shift
  for var in "$@"; do
    [[ -n "${!var:-}" ]] || die "$role: $var is not set (Spark on Kubernetes sets it on the $role pod)"
  done
}

[[ -x "${SPARK_HOME:-}/bin/spark-submit" ]] || die "SPARK_HOME=${SPARK_HOME:-} has no bin/spark-submit"

# Spark mounts the pod's spark.properties (and any Hadoop config) as folders that go first on the classpath.
classpath() {
  local cp="${SPARK_CONF_DIR:-$SPARK_HOME/conf}:$SPARK_HOME/jars/*"
  if [[ -n "${HADOOP_CONF_DIR:-}" ]]; then cp="$HADOOP_CONF_DIR:$cp"; fi
  if [[ -n "${SPARK_EXTRA_CLASSPATH:-}" ]]; then cp="$cp:$SPARK_EXTRA_CLASSPATH"; fi
  if [[ -n "${SPARK_DIST_CLASSPATH:-}" ]]; then cp="$cp:$SPARK_DIST_CLASSPATH"; fi
  printf '%s' "$cp"
}

run_driver() {
  require driver SPARK_DRIVER_BIND_ADDRESS
  exec "$SPARK_HOME/bin/spark-submit" \
    --deploy-mode client \
    --conf "spark.driver.bindAddress=$SPARK_DRIVER_BIND_ADDRESS" \
    "$@"
}

run_executor() {
  require executor SPARK_DRIVER_URL SPARK_EXECUTOR_ID SPARK_EXECUTOR_CORES SPARK_EXECUTOR_MEMORY \
    SPARK_APPLICATION_ID SPARK_EXECUTOR_POD_IP
  local java="${JAVA_HOME:+$JAVA_HOME/bin/}java" opts=() var
  # SPARK_JAVA_OPT_<n>: one JVM option each (the driver's spark.executor.extraJavaOptions, Java module
  # opens included), applied in the order of n; compgen lists names only, so values keep their spaces.
  while read -r var; do
    [[ -n "$var" ]] && opts+=("${!var}")
  done < <(compgen -v SPARK_JAVA_OPT_ | sort -t_ -k4 -n)
  local args=(
    --driver-url "$SPARK_DRIVER_URL"
    --executor-id "$SPARK_EXECUTOR_ID"
    --cores "$SPARK_EXECUTOR_CORES"
    --app-id "$SPARK_APPLICATION_ID"
    --hostname "$SPARK_EXECUTOR_POD_IP"
    --resourceProfileId "${SPARK_RESOURCE_PROFILE_ID:-0}"
  )
  if [[ -n "${SPARK_EXECUTOR_POD_NAME:-}" ]]; then args+=(--podName "$SPARK_EXECUTOR_POD_NAME"); fi
  exec "$java" "${opts[@]}" "-Xms$SPARK_EXECUTOR_MEMORY" "-Xmx$SPARK_EXECUTOR_MEMORY" -cp "$(classpath)" \
    org.apache.spark.scheduler.cluster.k8s.KubernetesExecutorBackend "${args[@]}"
}

case "${1:-}" in
  driver)
    shift
    run_driver "$@"
    ;;
  executor)
    shift
    run_executor "$@"
    ;;
  "") die "no command (driver, executor, or a program to run)" ;;
  *) exec "$@" ;;
esac

#!/usr/bin/env bash
# Submit a mining run to a running Ray cluster whose nodes run the hardneg image (docker/Dockerfile or
# docker/Dockerfile.gpu), e.g. a KubeRay RayCluster, with `ray job submit` and a runtime environment.
#
#   RAY_ADDRESS=http://127.0.0.1:8265 docker/submit.sh CONFIG OUT [more `hardneg mine` options]
#
# RAY_ADDRESS  the head's dashboard (job server), e.g. after
#              `kubectl port-forward svc/<cluster>-head-svc 8265:8265`
# CONFIG       the config as the head sees it: a path in the image or on the shared volume, or, with
#              JOB_DIR set, a path relative to JOB_DIR (uploaded as the job's working directory)
# OUT          the output folder, on a filesystem every node and you can reach (the shared volume)
# JOB_DIR      optional local folder (configs, a blocklist, a custom teacher module; < 100 MiB) shipped with the job
#
# The client needs the cluster's Ray version: pip install "ray[default]==<the image's Ray version>".
# Example:  RAY_ADDRESS=http://127.0.0.1:8265 docker/submit.sh /opt/hardneg/configs/demo.yaml /data/out/demo \
#             --set embed.cache_dir=/data/cache
set -euo pipefail
: "${RAY_ADDRESS:?set RAY_ADDRESS to the dashboard address of the cluster, e.g. http://127.0.0.1:8265}"
if [ $# -lt 2 ]; then
  echo "usage: RAY_ADDRESS=http://HEAD:8265 $0 CONFIG OUT [hardneg mine options...]" >&2
  exit 2
fi
CONFIG=$1
OUT=$2
shift 2

# The runtime environment every process of the job gets (the driver on the head and the actors on the workers).
RUNTIME_ENV='{"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}}'
EXTRA=()
if [ -n "${JOB_DIR:-}" ]; then
  EXTRA+=(--working-dir "$JOB_DIR")
fi

exec ray job submit --address "$RAY_ADDRESS" --submission-id "hardneg-$(date +%Y%m%d-%H%M%S)" \
  --runtime-env-json "$RUNTIME_ENV" ${EXTRA[@]+"${EXTRA[@]}"} \
  -- hardneg mine --config "$CONFIG" --out "$OUT" --no-progress "$@"

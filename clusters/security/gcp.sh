#!/usr/bin/env bash
# One-time Google Cloud setup for clusters/gcp.yaml: a network of its own with explicit
# firewall rules, and a least-privilege service account for the workers.
#
#   PROJECT=my-project BUCKET=my-bucket SSH_SOURCE_RANGE=203.0.113.7/32 bash clusters/security/gcp.sh
#   DRY_RUN=1 PROJECT=... BUCKET=... SSH_SOURCE_RANGE=... bash clusters/security/gcp.sh   # print only
#
# Creates:
#   * VPC network `hdd-ray` (custom subnet mode: none of the default network's rules, such as
#     default-allow-internal, which opens every port to every VM of the VPC) with one subnet
#     `hdd-ray` (SUBNET_RANGE, default 10.42.0.0/20) in REGION (default us-central1);
#   * firewall rule `hdd-ray-internal`: all TCP/UDP/ICMP, but only from VMs tagged `hdd-ray` to
#     VMs tagged `hdd-ray` (the cluster's own nodes: Ray's ports, MLflow on 5000);
#   * firewall rule `hdd-ray-ssh`: TCP 22 from SSH_SOURCE_RANGE to `hdd-ray` VMs; any other
#     ingress hits the network's implied deny;
#   * service account `hdd-ray-worker` with roles/storage.objectAdmin on the campaign bucket only
#     (no project roles: no compute.admin, no other bucket).
set -euo pipefail

: "${PROJECT:?set PROJECT: the project id}"
: "${BUCKET:?set BUCKET: the GCS bucket of the campaign root and the MLflow artifacts}"
: "${SSH_SOURCE_RANGE:?set SSH_SOURCE_RANGE: the CIDR you ssh from, e.g. 203.0.113.7/32}"
if [[ "$SSH_SOURCE_RANGE" == "0.0.0.0/0" && "${ALLOW_SSH_FROM_ANYWHERE:-}" != "1" ]]; then
  echo "SSH_SOURCE_RANGE=0.0.0.0/0 opens SSH to the internet; set ALLOW_SSH_FROM_ANYWHERE=1 if you mean it" >&2
  exit 2
fi
REGION="${REGION:-us-central1}"
SUBNET_RANGE="${SUBNET_RANGE:-10.42.0.0/20}"
WORKER_SA="hdd-ray-worker@$PROJECT.iam.gserviceaccount.com"

run() {  # run a command, or only print it (one line, shell-quoted) with DRY_RUN=1
  if [[ "${DRY_RUN:-}" == "1" ]]; then
    printf '%q ' "$@"; echo
  else
    "$@"
  fi
}

run gcloud compute networks create hdd-ray --project="$PROJECT" --subnet-mode=custom
run gcloud compute networks subnets create hdd-ray --project="$PROJECT" --network=hdd-ray \
  --region="$REGION" --range="$SUBNET_RANGE"
run gcloud compute firewall-rules create hdd-ray-internal --project="$PROJECT" --network=hdd-ray \
  --direction=INGRESS --action=ALLOW --rules=tcp,udp,icmp \
  --source-tags=hdd-ray --target-tags=hdd-ray
run gcloud compute firewall-rules create hdd-ray-ssh --project="$PROJECT" --network=hdd-ray \
  --direction=INGRESS --action=ALLOW --rules=tcp:22 \
  --source-ranges="$SSH_SOURCE_RANGE" --target-tags=hdd-ray
run gcloud iam service-accounts create hdd-ray-worker --project="$PROJECT" \
  --display-name="hdd_ray workers: the campaign bucket only"
run gcloud storage buckets add-iam-policy-binding "gs://$BUCKET" \
  --member="serviceAccount:$WORKER_SA" --role=roles/storage.objectAdmin

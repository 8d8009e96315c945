#!/usr/bin/env bash
# One-time AWS setup for clusters/aws.yaml: least-privilege roles and a closed security group.
#
#   BUCKET=my-bucket SSH_SOURCE_RANGE=203.0.113.7/32 bash clusters/security/aws.sh
#   DRY_RUN=1 BUCKET=... SSH_SOURCE_RANGE=... bash clusters/security/aws.sh   # print, change nothing
#
# Creates (idempotent: existing ones are left as they are):
#   * role + instance profile `hdd-ray-worker` for every worker: read/write on the campaign
#     bucket only (aws-worker-policy.json), nothing else (no EC2, no other bucket);
#   * role + instance profile `ray-autoscaler-v1` for the head (Ray reuses one of that name):
#     Ray's AmazonEC2FullAccess to launch and stop workers, plus aws-head-policy.json: the
#     campaign bucket and iam:PassRole on the worker role only, instead of Ray's default
#     AmazonS3FullAccess;
#   * security group `hdd-ray-sg` in VPC_ID (default: the default VPC): all traffic between its
#     own members (Ray's ports, MLflow on 5000), SSH from SSH_SOURCE_RANGE, nothing else.
# Then put the printed group id into clusters/aws.yaml (REPLACE_ME_AWS_SECURITY_GROUP_ID) and the
# account id (REPLACE_ME_AWS_ACCOUNT_ID).
set -euo pipefail

: "${BUCKET:?set BUCKET: the S3 bucket of the campaign root and the MLflow artifacts}"
: "${SSH_SOURCE_RANGE:?set SSH_SOURCE_RANGE: the CIDR you ssh from, e.g. 203.0.113.7/32}"
if [[ "$SSH_SOURCE_RANGE" == "0.0.0.0/0" && "${ALLOW_SSH_FROM_ANYWHERE:-}" != "1" ]]; then
  echo "SSH_SOURCE_RANGE=0.0.0.0/0 opens SSH to the internet; set ALLOW_SSH_FROM_ANYWHERE=1 if you mean it" >&2
  exit 2
fi
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

run() {  # run a command, or only print it (one line, shell-quoted) with DRY_RUN=1
  if [[ "${DRY_RUN:-}" == "1" ]]; then
    printf '%q ' "$@"; echo
  else
    "$@"
  fi
}

if [[ "${DRY_RUN:-}" == "1" ]]; then
  ACCOUNT_ID="${ACCOUNT_ID:-123456789012}"
  VPC_ID="${VPC_ID:-vpc-dryrun}"
else
  ACCOUNT_ID="${ACCOUNT_ID:-$(aws sts get-caller-identity --query Account --output text)}"
  VPC_ID="${VPC_ID:-$(aws ec2 describe-vpcs --filters Name=isDefault,Values=true \
    --query 'Vpcs[0].VpcId' --output text)}"
fi
for f in aws-worker-policy.json aws-head-policy.json aws-trust-policy.json; do
  sed -e "s/REPLACE_ME_BUCKET/$BUCKET/g" -e "s/REPLACE_ME_AWS_ACCOUNT_ID/$ACCOUNT_ID/g" \
    "$HERE/$f" > "$WORK/$f"
done

role() {  # role NAME POLICY_FILE [MANAGED_POLICY_ARN...]: role + same-named instance profile
  local name="$1" policy="$2"; shift 2
  if [[ "${DRY_RUN:-}" == "1" ]] || ! aws iam get-role --role-name "$name" >/dev/null 2>&1; then
    run aws iam create-role --role-name "$name" \
      --assume-role-policy-document "file://$WORK/aws-trust-policy.json"
  fi
  run aws iam put-role-policy --role-name "$name" --policy-name hdd-ray-campaign-bucket \
    --policy-document "file://$WORK/$policy"
  for arn in "$@"; do
    run aws iam attach-role-policy --role-name "$name" --policy-arn "$arn"
  done
  if [[ "${DRY_RUN:-}" == "1" ]] || ! aws iam get-instance-profile --instance-profile-name "$name" >/dev/null 2>&1; then
    run aws iam create-instance-profile --instance-profile-name "$name"
    run aws iam add-role-to-instance-profile --instance-profile-name "$name" --role-name "$name"
  fi
}

role hdd-ray-worker aws-worker-policy.json
role ray-autoscaler-v1 aws-head-policy.json arn:aws:iam::aws:policy/AmazonEC2FullAccess

if [[ "${DRY_RUN:-}" == "1" ]]; then
  SG_ID=sg-dryrun
  run aws ec2 create-security-group --group-name hdd-ray-sg --vpc-id "$VPC_ID" \
    --description "hdd_ray cluster: members only, SSH from one range"
else
  SG_ID="$(aws ec2 describe-security-groups --filters Name=group-name,Values=hdd-ray-sg \
    Name=vpc-id,Values="$VPC_ID" --query 'SecurityGroups[0].GroupId' --output text)"
  if [[ "$SG_ID" == "None" || -z "$SG_ID" ]]; then
    SG_ID="$(aws ec2 create-security-group --group-name hdd-ray-sg --vpc-id "$VPC_ID" \
      --description "hdd_ray cluster: members only, SSH from one range" \
      --query GroupId --output text)"
  fi
fi
run aws ec2 authorize-security-group-ingress --group-id "$SG_ID" \
  --ip-permissions "IpProtocol=-1,UserIdGroupPairs=[{GroupId=$SG_ID}]"
run aws ec2 authorize-security-group-ingress --group-id "$SG_ID" \
  --protocol tcp --port 22 --cidr "$SSH_SOURCE_RANGE"
echo "security group: $SG_ID (clusters/aws.yaml: REPLACE_ME_AWS_SECURITY_GROUP_ID), account: $ACCOUNT_ID" >&2

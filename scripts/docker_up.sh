#!/usr/bin/env bash
# Bring up what the sandbox tests need, idempotently (run as root; CI calls it before pytest):
#   1. the Debian packages docker.io, bubblewrap, debootstrap, openssl and openssh (apt-get, only when missing);
#   2. a Docker engine: when none answers, `dockerd --iptables=false --bridge=none` in the background
#      (sandbox containers use --network none, so no bridge or NAT is needed), logging to $RLK2_DOCKERD_LOG;
#   3. the sandbox image, built offline (debootstrap + docker import) when its tag is missing.
# No registry is contacted: the image never comes from `docker pull`.
set -euo pipefail

log=${RLK2_DOCKERD_LOG:-/var/log/rlk2-dockerd.log}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python3}

if [ "$(id -u)" != 0 ]; then
  echo "docker_up.sh: must run as root" >&2
  exit 2
fi

missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v bwrap >/dev/null || missing+=(bubblewrap)
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v openssl >/dev/null || missing+=(openssl)  # the remote-engine test makes its TLS certificates with it
command -v sshd >/dev/null || [ -x /usr/sbin/sshd ] || missing+=(openssh-server)  # the ssh:// engine test runs its own sshd
command -v ssh >/dev/null || missing+=(openssh-client)
if [ ${#missing[@]} -gt 0 ]; then
  echo "docker_up.sh: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

if ! docker info >/dev/null 2>&1; then
  echo "docker_up.sh: starting dockerd (log: $log)"
  mkdir -p "$(dirname "$log")"
  nohup dockerd --iptables=false --bridge=none >>"$log" 2>&1 &
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && break
    sleep 1
  done
  if ! docker info >/dev/null 2>&1; then
    echo "docker_up.sh: dockerd did not answer within 60 s; last log lines:" >&2
    tail -n 20 "$log" >&2
    exit 1
  fi
fi
echo "docker_up.sh: engine up ($(docker version --format '{{.Server.Version}}'))"

tag=$(cd "$repo" && "$python" -c 'import sandboxes; print(sandboxes.DEFAULT_IMAGE)')
if docker image inspect "$tag" >/dev/null 2>&1; then
  echo "docker_up.sh: image $tag present"
else
  echo "docker_up.sh: building $tag offline"
  (cd "$repo" && "$python" -m sandboxes.cli build --offline)
fi

# shellcheck shell=bash
# Sourced by deploy/ci-image-test.sh (and usable by hand): a private Docker engine and a locally built
# stand-in for python:3.11-slim, for machines that reach package registries but no image registry.
#
#   source deploy/local-docker.sh
#   bn_install_tools          # apt-get install docker.io mmdebstrap when missing
#   bn_start_dockerd          # dockerd with its own roots and socket under $BN_WORK; exports DOCKER_HOST
#   bn_load_base_image        # mmdebstrap (cached tarball) + docker import as python:3.11-slim
#   ...docker build/run...
#   bn_stop_dockerd           # stop it by PID, kill what it left, unmount, remove $BN_WORK
#
# The engine never touches the host's network set-up: no iptables rules, no docker0 bridge, no IP
# forwarding change. Build and run with --network host (the container then shares the host's loopback).

BN_DOCKERD=${BN_DOCKERD:-/usr/sbin/dockerd}
BN_BASE_TAG=${BN_BASE_TAG:-python:3.11-slim}
BN_CACHE_DIR=${BN_CACHE_DIR:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/bnserve}
# The host's CA bundle (Debian's standard file): TLS from inside the container goes through the same
# certificate authorities as the host's own pip and apt.
BN_CA_BUNDLE=${BN_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}

bn_log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

bn_install_tools() {
    local need=()
    [[ -x "$BN_DOCKERD" ]] || need+=(docker.io)
    command -v mmdebstrap >/dev/null 2>&1 || need+=(mmdebstrap)
    if ((${#need[@]})); then
        bn_log "installing ${need[*]} with apt-get"
        if [[ $(id -u) -ne 0 ]]; then
            bn_log "need root to install ${need[*]}"
            return 1
        fi
        apt-get update -qq || return 1
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${need[@]}" >/dev/null || return 1
    fi
    # Debian's client (20.10) is the one that speaks BuildKit without buildx.
    [[ -x "$BN_DOCKERD" ]] && command -v docker >/dev/null 2>&1
}

bn_start_dockerd() {
    BN_WORK=$(mktemp -d /tmp/bnsd.XXXXXX)   # short: unix socket paths under it must stay < 108 bytes
    export BN_WORK
    mkdir -p "$BN_WORK/root" "$BN_WORK/exec" "$BN_WORK/client"
    echo '{}' >"$BN_WORK/daemon.json"
    bn_log "starting dockerd under $BN_WORK"
    "$BN_DOCKERD" \
        --config-file "$BN_WORK/daemon.json" \
        --data-root "$BN_WORK/root" \
        --exec-root "$BN_WORK/exec" \
        --pidfile "$BN_WORK/docker.pid" \
        --host "unix://$BN_WORK/docker.sock" \
        --iptables=false --ip-forward=false --ip-masq=false --bridge=none \
        --storage-driver overlay2 \
        >"$BN_WORK/dockerd.log" 2>&1 &
    BN_DOCKERD_PID=$!
    export BN_DOCKERD_PID
    export DOCKER_HOST="unix://$BN_WORK/docker.sock"
    export DOCKER_CONFIG="$BN_WORK/client"    # leave ~/.docker alone
    local i
    for i in $(seq 1 120); do
        if docker info >/dev/null 2>&1; then
            bn_log "dockerd ready (pid $BN_DOCKERD_PID) after $((i / 4)) s"
            return 0
        fi
        if ! kill -0 "$BN_DOCKERD_PID" 2>/dev/null; then
            bn_log "dockerd exited; its log:"
            tail -n 30 "$BN_WORK/dockerd.log" >&2
            return 1
        fi
        sleep 0.25
    done
    bn_log "dockerd did not answer within 30 s; its log:"
    tail -n 30 "$BN_WORK/dockerd.log" >&2
    return 1
}

# PIDs of processes whose command line names our work directory (dockerd's containerd and shims).
_bn_our_pids() {
    local p cmd
    for p in /proc/[0-9]*; do
        cmd=$(tr '\0' ' ' 2>/dev/null <"$p/cmdline") || continue
        [[ $cmd == *"$BN_WORK"* ]] && echo "${p#/proc/}"
    done
}

bn_stop_dockerd() {
    [[ -n "${BN_WORK:-}" && -d "$BN_WORK" ]] || return 0
    local i p
    if [[ -n "${BN_DOCKERD_PID:-}" ]] && kill -0 "$BN_DOCKERD_PID" 2>/dev/null; then
        # Containers first, so that their shims exit while dockerd still manages them.
        docker ps -aq 2>/dev/null | xargs -r docker rm -f >/dev/null 2>&1 || true
        kill -TERM "$BN_DOCKERD_PID" 2>/dev/null || true
        for i in $(seq 1 120); do
            kill -0 "$BN_DOCKERD_PID" 2>/dev/null || break
            sleep 0.25
        done
        if kill -0 "$BN_DOCKERD_PID" 2>/dev/null; then
            bn_log "dockerd did not stop within 30 s of SIGTERM: SIGKILL"
            kill -KILL "$BN_DOCKERD_PID" 2>/dev/null
        fi
        wait "$BN_DOCKERD_PID" 2>/dev/null || true
        bn_log "dockerd (pid $BN_DOCKERD_PID) exited $((i / 4)) s after SIGTERM"
    fi
    # containerd and shims that outlived dockerd: only those started under our work directory.
    for p in $(_bn_our_pids); do
        [[ $p == "$$" || $p == "$BASHPID" ]] && continue
        kill -TERM "$p" 2>/dev/null || true
    done
    sleep 0.5
    for p in $(_bn_our_pids); do
        [[ $p == "$$" || $p == "$BASHPID" ]] && continue
        kill -KILL "$p" 2>/dev/null || true
    done
    # Mounts left under the work directory (overlay layers, shm, netns), deepest first.
    local mounts
    mounts=$(awk -v w="$BN_WORK" 'index($5, w) == 1 {print $5}' /proc/self/mountinfo | sort -r)
    for p in $mounts; do
        umount "$p" 2>/dev/null || umount -l "$p" 2>/dev/null || true
    done
    if awk -v w="$BN_WORK" 'index($5, w) == 1 {found=1} END {exit !found}' /proc/self/mountinfo; then
        bn_log "warning: mounts left under $BN_WORK"
    fi
    rm -rf "$BN_WORK" 2>/dev/null || bn_log "warning: could not remove all of $BN_WORK"
    unset DOCKER_HOST DOCKER_CONFIG BN_DOCKERD_PID
    bn_log "dockerd stopped, $BN_WORK removed"
    BN_WORK=
}

# The recipe for the base image; its hash (with the CA bundle's) names the cached tarball.
_bn_base_recipe() {
    cat <<'EOF'
mmdebstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm
path-exclude /usr/share/doc/* /usr/share/man/* /usr/share/info/* /usr/share/locale/*
venv /usr/local; CA bundle -> /etc/ssl/certs + /usr/local/share/ca-certificates; v1
EOF
}

bn_base_tarball() {
    local key tar
    key=$( { _bn_base_recipe; cat "$BN_CA_BUNDLE"; } | sha256sum | cut -c1-16)
    tar="$BN_CACHE_DIR/base-bookworm-py311-$key.tar"
    if [[ -s "$tar" && -z "${BN_REBUILD_BASE:-}" ]]; then
        bn_log "base tarball cached: $tar"
        echo "$tar"
        return 0
    fi
    mkdir -p "$BN_CACHE_DIR"
    bn_log "building the base tarball with mmdebstrap (about 40 s)"
    local tmp="$tar.partial.$$"
    # /usr/local becomes a venv, as in the official image: python, python3 and pip in /usr/local/bin,
    # packages in /usr/local/lib/python3.11/site-packages, and pip installs without complaint.
    # shellcheck disable=SC2016  # "$1" in the hooks is mmdebstrap's chroot path, expanded by it
    if ! mmdebstrap --quiet --variant=minbase \
        --include=python3,python3-venv,ca-certificates \
        --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/info/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        --customize-hook='chroot "$1" python3 -m venv /usr/local' \
        --customize-hook="cp '$BN_CA_BUNDLE' \"\$1/usr/local/share/ca-certificates/host-ca-bundle.crt\"" \
        --customize-hook="cp '$BN_CA_BUNDLE' \"\$1/etc/ssl/certs/ca-certificates.crt\"" \
        --customize-hook='rm -rf "$1"/usr/local/lib/python3.11/site-packages/*/__pycache__ "$1"/var/lib/apt/lists/*' \
        --format=tar bookworm "$tmp" >&2; then
        rm -f "$tmp"
        return 1
    fi
    mv "$tmp" "$tar"
    # Older tarballs (other recipe or CA bundle) are not needed any more.
    find "$BN_CACHE_DIR" -maxdepth 1 -name 'base-bookworm-py311-*.tar' ! -name "${tar##*/}" -delete
    echo "$tar"
}

bn_load_base_image() {
    local tar ca=/etc/ssl/certs/ca-certificates.crt
    tar=$(bn_base_tarball) || return 1
    bn_log "importing $tar as $BN_BASE_TAG"
    docker import \
        --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'ENV PYTHON_VERSION=3.11' \
        --change "ENV PIP_CERT=$ca" \
        --change "ENV REQUESTS_CA_BUNDLE=$ca" \
        --change "ENV SSL_CERT_FILE=$ca" \
        --change 'CMD ["python3"]' \
        "$tar" "$BN_BASE_TAG" >/dev/null
}

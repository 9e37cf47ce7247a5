#!/usr/bin/env bash
# Does the README work on a fresh Debian 12?
#
# Builds a minimal Debian 12 root (debootstrap) and runs it as a machine of its own: its own
# network namespace, with outbound access only through slirp4netns (so the host's MariaDB on
# 127.0.0.1:3306, Postgres, Redis... are out of reach), and its own PID, mount, UTS and IPC
# namespaces (so it sees none of the host's processes, and its mounts vanish with it). Clones the
# project into it and there, as root, in the clone, runs the README's two commands:
#   1. the test command, `bash .ci/run`, which must exit 0;
#   2. the run command without Docker, `python3 airflow/run_without_docker.py` (no environment
#      variables), which must come up (the prediction service's /health on :8989, Airflow's
#      /api/v2/monitor/health on :8080); then the DAG penguins_pipeline is triggered through the
#      REST API as the UI's Trigger button does and must succeed, POST /predict must answer Gentoo
#      for a Gentoo, and SIGINT must stop the launcher within 2 minutes, leaving no process behind.
#
# It tests the repository's COMMITTED HEAD (it is cloned), not the working tree: commit first.
#
# Needs: root on a Debian 12 host; network to the package registries (Debian apt, PyPI); ~5 GB
# free under /var/tmp (a 0.4 GB cached pristine root, a working root of ~3 GB while it runs);
# ~2.5 minutes for the first debootstrap (later runs reuse the pristine root cached under
# /var/tmp/penguins-fresh/), then ~10 minutes for .ci/run and ~1 for the system run on 2 cores
# (every wait has a time limit; see below). Installs debootstrap, slirp4netns, iproute2 and git on
# the host with apt if missing. Leaves no mount, namespace or process behind, on failure or Ctrl-C
# too.
#
# Usage: sudo bash tests/fresh_machine.sh [REPO]
#   REPO  a git repository (default: the one this script lives in)
# Environment (all optional):
#   FRESH_TEST_COMMAND  the test command, run in the clone (default: bash .ci/run)
#   FRESH_RUN_COMMAND   the run command, run in the clone; one command, which is exec'ed so that
#                       the SIGINT reaches it (default: python3 airflow/run_without_docker.py)
#   FRESH_CACHE_DIR     pristine root, working roots and logs (default: /var/tmp/penguins-fresh)
#   FRESH_KEEP_ROOT=1   keep the working root's files afterwards, to look inside
#   FRESH_VERBOSE=1     show each step's output on the terminal too, not only in its log
#   FRESH_TESTS_TIMEOUT FRESH_UP_TIMEOUT FRESH_DAG_TIMEOUT FRESH_STOP_TIMEOUT   in seconds
#                       (defaults 3600, 600, 600, 120)
# Prints each step, keeps each step's log in a folder it names at the end, and ends with one line:
# `fresh machine: PASS` (exit 0) or `fresh machine: FAIL at <step>` (exit 1).

set -uo pipefail

SUITE=bookworm
INCLUDE=ca-certificates,git,curl,python3,python3-pip,python3-venv,sudo,procps
TEST_COMMAND=${FRESH_TEST_COMMAND:-bash .ci/run}
RUN_COMMAND=${FRESH_RUN_COMMAND:-python3 airflow/run_without_docker.py}
CACHE_DIR=${FRESH_CACHE_DIR:-/var/tmp/penguins-fresh}
TESTS_TIMEOUT=${FRESH_TESTS_TIMEOUT:-3600}
UP_TIMEOUT=${FRESH_UP_TIMEOUT:-600}
DAG_TIMEOUT=${FRESH_DAG_TIMEOUT:-600}
STOP_TIMEOUT=${FRESH_STOP_TIMEOUT:-120}
DAG_ID=penguins_pipeline
CLONE=/root/penguins                 # the clone, as seen inside the machine
MACHINE_NAME=penguins-fresh          # its hostname
SERVING=http://127.0.0.1:8989
AIRFLOW=http://127.0.0.1:8080
# The environment inside: a root login's on Debian; nothing of the caller's.
ROOT_ENV=(HOME=/root USER=root LOGNAME=root SHELL=/bin/bash TERM=dumb
          PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin)

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=${1:-$SCRIPT_DIR/..}
RUN_ID=$(date +%Y%m%d-%H%M%S)-$$
LOG_DIR=$CACHE_DIR/logs/$RUN_ID
MAIN_LOG=$LOG_DIR/main.log
ROOT=$CACHE_DIR/roots/$RUN_ID        # this run's copy of the pristine root
NETNS=penguins-fresh-$$

STEP=setup         # the step running now, named by the FAIL line
STEP_NO=0
STEP_LOG=/dev/null
STEP_START=$SECONDS
TIMINGS=()
BUILD=             # debootstrap's target while it runs
SLIRP_PID=
UNSHARE_PID=       # holds the machine's namespaces; its child INIT_PID is the machine's PID 1
INIT_PID=
JOB_PID=           # the command `logged` waits for
TAIL_PID=
ENTER_PID=         # the nsenter that started the launcher (its exit status is the launcher's)
LAUNCHER_PID=      # the launcher itself, inside the machine
BEFORE_LAUNCH=()   # the machine's processes already running when the launcher started
CLEANED=

# ---------------------------------------------------------------------------------------------
# Output, steps, failure

say() {
  printf '%s\n' "$*"
  printf '%s %s\n' "$(date +%T)" "$*" >>"$MAIN_LOG"
}

# step NAME [WHAT]: start a step; its commands' output goes to a numbered log of its own.
step() {
  STEP=$1
  STEP_NO=$((STEP_NO + 1))
  STEP_LOG=$LOG_DIR/$(printf '%02d' "$STEP_NO")-${STEP// /-}.log
  STEP_START=$SECONDS
  say ""
  say "== [$STEP_NO] $STEP${2:+: $2}"
  say "   log: $STEP_LOG"
}

step_done() {
  TIMINGS+=("$(printf '%5ss  %s' "$((SECONDS - STEP_START))" "$STEP")")
  say "   ok, $((SECONDS - STEP_START))s"
}

fail() {
  TIMINGS+=("$(printf '%5ss  %s  (failed)' "$((SECONDS - STEP_START))" "$STEP")")
  say "   FAILED: $*"
  if [ -s "$STEP_LOG" ]; then
    say "   --- the end of $STEP_LOG:"
    tail -n 40 "$STEP_LOG" | cut -c1-300 | sed 's/^/   | /' | tee -a "$MAIN_LOG"
  fi
  finish 1
}

# logged CMD...: run CMD with its output in the step's log (and on the terminal if verbose). As a
# background job that is waited for, because `wait` returns at once when a trapped signal comes:
# Ctrl-C cleans up now, not once CMD has finished.
logged() {
  printf '$ %s\n' "$(printf '%s ' "$@" | tr '\n' ' ' | cut -c1-300)" >>"$STEP_LOG"
  "$@" >>"$STEP_LOG" 2>&1 &
  JOB_PID=$!
  if [ "${FRESH_VERBOSE:-}" = 1 ]; then
    tail -n 0 -f --pid="$JOB_PID" "$STEP_LOG" &
    TAIL_PID=$!
  fi
  local status=0
  wait "$JOB_PID" || status=$?
  JOB_PID=
  if [ -n "$TAIL_PID" ]; then
    wait "$TAIL_PID"
    TAIL_PID=
  fi
  return "$status"
}

# ---------------------------------------------------------------------------------------------
# The machine

# git on the host, whoever owns the repository (sudo from its owner's checkout).
host_git() {
  git -c safe.directory='*' "$@"
}

# in_root CMD...: CMD inside the machine (all its namespaces, its root), as root, in a clean
# environment. nsenter forks into the PID namespace and returns CMD's exit status. ENTER is set
# once the machine runs.
ENTER=()
in_root() {
  "${ENTER[@]}" "$@"
}

# The machine's PID 1, which start_machine runs: it mounts the machine's /proc (of its own PID
# namespace), /sys, and a /dev of its own (a few device nodes, devpts, shm) in the machine's own
# mount namespace, so that nothing of it shows on the host and it all goes when the machine does;
# then, chrooted, it reaps the orphans that are reparented to it, as an init does, and exits on
# SIGTERM (which takes everything left in the machine with it).
# shellcheck disable=SC2016  # expanded by that bash, not this one
MACHINE_INIT='
set -e
root=$1
hostname "$2"
mount -t proc -o nosuid,nodev,noexec proc "$root/proc"
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$root/sys"
mount -t tmpfs -o mode=0755,nosuid tmpfs "$root/dev"
for node in null:1:3 zero:1:5 full:1:7 random:1:8 urandom:1:9 tty:5:0; do
  IFS=: read -r name major minor <<<"$node"
  mknod -m 0666 "$root/dev/$name" c "$major" "$minor"
done
mkdir "$root/dev/pts" "$root/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620,gid=5,nosuid,noexec devpts "$root/dev/pts"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$root/dev/shm"
ln -s pts/ptmx "$root/dev/ptmx"
ln -s /proc/self/fd "$root/dev/fd"
ln -s /proc/self/fd/0 "$root/dev/stdin"
ln -s /proc/self/fd/1 "$root/dev/stdout"
ln -s /proc/self/fd/2 "$root/dev/stderr"
findmnt -rn -o TARGET,FSTYPE,OPTIONS | grep "^$root"
exec chroot "$root" /usr/bin/python3 -c "
import os, signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
while True:
    try:
        os.wait()
    except ChildProcessError:
        time.sleep(1)
"
'

# The machine's processes (host PIDs), but its PID 1.
machine_pids() {
  local ns proc
  [ -n "$INIT_PID" ] && ns=$(readlink "/proc/$INIT_PID/ns/pid" 2>/dev/null) || return 0
  for proc in /proc/[0-9]*; do
    [ "${proc#/proc/}" != "$INIT_PID" ] && [ "$(readlink "$proc/ns/pid" 2>/dev/null)" = "$ns" ] \
      && echo "${proc#/proc/}"
  done
  return 0
}

# Processes chrooted into DIR (debootstrap's, while it builds).
rooted_pids() {
  local proc
  for proc in /proc/[0-9]*; do
    [ "$(readlink "$proc/root" 2>/dev/null)" = "$1" ] && echo "${proc#/proc/}"
  done
  return 0
}

describe_pids() {
  local pid
  for pid in "$@"; do
    printf '   %s %s\n' "$pid" "$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | cut -c1-150)"
  done
}

# can_connect HOST PORT [in_root]: whether a TCP connection opens within 3 s.
can_connect() {
  local probe=": </dev/tcp/$1/$2"
  if [ "${3:-}" = in_root ]; then
    in_root timeout 3 bash -c "$probe" 2>/dev/null
  else
    timeout 3 bash -c "$probe" 2>/dev/null
  fi
}

launcher_alive() {  # a zombie has exited
  [ -n "$LAUNCHER_PID" ] && ps -o stat= -p "$LAUNCHER_PID" 2>/dev/null | grep -qv '^Z'
}

# ---------------------------------------------------------------------------------------------
# Cleanup: always, once, in the reverse order of the setup

# mounts_under DIR: the host's mount points at or under DIR.
mounts_under() {
  findmnt -rn -o TARGET | awk -v dir="$1" '$0 == dir || index($0, dir "/") == 1'
}

# remove_tree DIR: unmount what is mounted under DIR, then delete it (never across a mount).
remove_tree() {
  if [ -n "$(mounts_under "$1")" ]; then
    umount -R "$1" 2>>"$MAIN_LOG" || umount -R -l "$1" 2>>"$MAIN_LOG"
  fi
  [ -z "$(mounts_under "$1")" ] && rm -rf --one-file-system "$1"
}

any_alive() {
  local pid
  for pid in "$@"; do kill -0 "$pid" 2>/dev/null && return 0; done
  return 1
}

# signal_all SIGNAL WHAT PID...: send SIGNAL, then wait up to 10 s for those processes to go.
signal_all() {
  local signal=$1 what=$2
  shift 2
  [ $# -gt 0 ] || return 0
  say "cleanup: SIG$signal to $# process(es) $what"
  describe_pids "$@" >>"$MAIN_LOG"
  kill -s "$signal" "$@" 2>/dev/null
  for _ in $(seq 20); do
    any_alive "$@" || return 0
    sleep 0.5
  done
}

stop_machine() {
  local pids
  mapfile -t pids < <(machine_pids)
  signal_all TERM "in the machine" "${pids[@]}"
  # When a PID namespace's PID 1 exits, the kernel kills everything left in it; the machine's
  # mount namespace, and so its mounts, go with the last of them.
  if [ -n "$INIT_PID" ] && kill -0 "$INIT_PID" 2>/dev/null; then
    kill -TERM "$INIT_PID"
    for _ in $(seq 10); do kill -0 "$INIT_PID" 2>/dev/null || break; sleep 0.5; done
    kill -KILL "$INIT_PID" 2>/dev/null
  fi
  for _ in $(seq 20); do [ -z "$(machine_pids)" ] && break; sleep 0.5; done
  if [ -n "$UNSHARE_PID" ]; then  # it exits once its child, PID 1, has
    for _ in $(seq 10); do kill -0 "$UNSHARE_PID" 2>/dev/null || break; sleep 0.5; done
    kill -KILL "$UNSHARE_PID" 2>/dev/null
    wait "$UNSHARE_PID" 2>/dev/null
  fi
}

cleanup() {
  [ -n "$CLEANED" ] && return
  CLEANED=1
  trap '' INT TERM HUP   # a second Ctrl-C must not cut the cleanup short
  if launcher_alive; then  # stopped the way it is meant to be, before anything harsher
    say "cleanup: SIGINT to the launcher ($LAUNCHER_PID)"
    kill -INT "$LAUNCHER_PID"
    for _ in $(seq 60); do launcher_alive || break; sleep 0.5; done
  fi
  [ -n "$JOB_PID" ] && kill "$JOB_PID" 2>/dev/null
  if [ -n "$BUILD" ]; then
    local pids
    mapfile -t pids < <(rooted_pids "$BUILD")
    signal_all KILL "in debootstrap's root" "${pids[@]}"
    [ -n "$JOB_PID" ] && wait "$JOB_PID" 2>/dev/null   # debootstrap unmounts what it mounted
    remove_tree "$BUILD"
  fi
  stop_machine
  [ -n "$TAIL_PID" ] && kill "$TAIL_PID" 2>/dev/null
  if [ -n "$SLIRP_PID" ]; then
    kill "$SLIRP_PID" 2>/dev/null
    wait "$SLIRP_PID" 2>/dev/null
  fi
  ip netns list 2>/dev/null | grep -qw "^$NETNS" && ip netns delete "$NETNS"
  [ -d "$ROOT" ] && [ "${FRESH_KEEP_ROOT:-}" != 1 ] && remove_tree "$ROOT"
}

# What the cleanup did not remove; nothing when all is gone.
leftovers() {
  [ -n "$(mounts_under "$ROOT")" ] && echo "mounts: $(mounts_under "$ROOT" | tr '\n' ' ')"
  [ -n "$BUILD" ] && [ -d "$BUILD" ] && echo "debootstrap's target $BUILD"
  ip netns list 2>/dev/null | grep -qw "^$NETNS" && echo "network namespace $NETNS"
  [ -n "$SLIRP_PID" ] && kill -0 "$SLIRP_PID" 2>/dev/null && echo "slirp4netns ($SLIRP_PID)"
  [ -n "$INIT_PID" ] && kill -0 "$INIT_PID" 2>/dev/null && echo "the machine's PID 1 ($INIT_PID)"
  [ -n "$(machine_pids)" ] && echo "processes: $(machine_pids | tr '\n' ' ')"
  [ -d "$ROOT" ] && [ "${FRESH_KEEP_ROOT:-}" != 1 ] && echo "the working root $ROOT"
  return 0
}

finish() {
  local status=$1 left line
  trap - EXIT
  cleanup
  left=$(leftovers)
  if [ -n "$left" ]; then
    say "cleanup LEFT BEHIND: $left"
    [ "$status" = 0 ] && STEP=cleanup
    status=1
  fi
  say ""
  say "Timings:"
  for line in "${TIMINGS[@]}"; do say "$line"; done
  [ "${FRESH_KEEP_ROOT:-}" = 1 ] && [ -d "$ROOT" ] && say "Root kept (unmounted): $ROOT"
  say "Logs: $LOG_DIR"
  if [ "$status" = 0 ]; then
    say "fresh machine: PASS"
  else
    say "fresh machine: FAIL at $STEP"
  fi
  exit "$status"
}

# shellcheck disable=SC2317  # called by the traps
on_signal() {
  TIMINGS+=("$(printf '%5ss  %s  (interrupted)' "$((SECONDS - STEP_START))" "$STEP")")
  say ""
  say "interrupted (SIG$1)"
  finish 1
}

# ---------------------------------------------------------------------------------------------
# The steps

check_host() {
  step "host tools"
  [ "$(id -u)" = 0 ] || fail "run as root: sudo bash $0 [REPO]"
  local -A package_of=([debootstrap]=debootstrap [slirp4netns]=slirp4netns [ip]=iproute2
                       [ss]=iproute2 [nsenter]=util-linux [unshare]=util-linux
                       [findmnt]=util-linux [git]=git)
  local tool missing=()
  for tool in "${!package_of[@]}"; do
    command -v "$tool" >/dev/null || missing+=("${package_of[$tool]}")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
    say "   installing on the host: ${missing[*]}"
    logged apt-get update || fail "apt-get update on the host"
    logged env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" \
      || fail "apt-get install ${missing[*]} on the host"
  fi
  host_git -C "$REPO" rev-parse --verify -q HEAD >/dev/null 2>&1 \
    || fail "$REPO is not a git repository with a commit"
  REPO=$(host_git -C "$REPO" rev-parse --show-toplevel)
  step_done
}

# The host's Debian mirror: the first one its apt sources name.
debian_mirror() {
  local mirror
  mirror=$(grep -hsE '^URIs:' /etc/apt/sources.list.d/*.sources | awk '$2 ~ /debian\/?$/ {print $2; exit}')
  [ -n "$mirror" ] || mirror=$(grep -hsE '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
                               | awk '$2 ~ /debian\/?$/ {print $2; exit}')
  echo "${mirror:-http://deb.debian.org/debian}"
}

# A pristine root as debootstrap makes it, kept as a tarball so that later runs skip debootstrap.
pristine_root() {
  step "pristine root"
  local mirror key
  mirror=$(debian_mirror)
  key=$(printf '%s %s %s' "$SUITE" "$INCLUDE" "$mirror" | sha256sum | cut -c1-12)
  PRISTINE=$CACHE_DIR/pristine-$SUITE-minbase-$key.tar
  if [ -s "$PRISTINE" ]; then
    say "   cached: $PRISTINE (debootstrap skipped)"
  else
    BUILD=$CACHE_DIR/build-$$
    say "   debootstrap --variant=minbase --include=$INCLUDE $SUITE ROOT $mirror"
    mkdir -p "$BUILD"
    if ! logged timeout 1800 debootstrap --variant=minbase --include="$INCLUDE" "$SUITE" "$BUILD" "$mirror"; then
      [ -f "$BUILD/debootstrap/debootstrap.log" ] && cat "$BUILD/debootstrap/debootstrap.log" >>"$STEP_LOG"
      fail "debootstrap"
    fi
    # Under another name until complete: an interrupted run must not leave a broken cache.
    logged tar --numeric-owner --xattrs --xattrs-include='*' -C "$BUILD" -cf "$PRISTINE.partial" . \
      || { rm -f "$PRISTINE.partial"; fail "tar of the pristine root"; }
    mv "$PRISTINE.partial" "$PRISTINE"
    remove_tree "$BUILD"
    BUILD=
    say "   cached for the next runs: $PRISTINE ($(du -h "$PRISTINE" | cut -f1))"
  fi
  step_done
}

unpack_root() {
  step "unpack root"
  mkdir -p "$ROOT"
  logged tar --numeric-owner --xattrs --xattrs-include='*' -C "$ROOT" -xf "$PRISTINE" \
    || fail "unpacking $PRISTINE"
  say "   $ROOT"
  step_done
}

# Only what reaching the registries needs, from the host: its CA certificates (this machine's
# egress re-signs TLS with its own CA), its apt settings and sources. And what any installed
# machine has: a hostname that resolves, and a resolver (slirp4netns's DNS forwarder).
configure_root() {
  step "configure root"
  local file
  for file in /usr/local/share/ca-certificates/*.crt; do
    [ -f "$file" ] || continue
    cp "$file" "$ROOT/usr/local/share/ca-certificates/"
    say "   CA certificate: ${file##*/}"
  done
  cp -a /etc/apt/apt.conf.d/. "$ROOT/etc/apt/apt.conf.d/"
  # The host's sources replace debootstrap's one-line sources.list (apt warns of duplicates).
  rm -f "$ROOT/etc/apt/sources.list"
  [ -f /etc/apt/sources.list ] && cp /etc/apt/sources.list "$ROOT/etc/apt/"
  for file in /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [ -f "$file" ] && cp "$file" "$ROOT/etc/apt/sources.list.d/" && say "   apt sources: ${file##*/}"
  done
  echo "$MACHINE_NAME" >"$ROOT/etc/hostname"
  printf '127.0.0.1\tlocalhost\n127.0.1.1\t%s\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' \
    "$MACHINE_NAME" >"$ROOT/etc/hosts"
  rm -f "$ROOT/etc/resolv.conf"
  echo "nameserver 10.0.2.3" >"$ROOT/etc/resolv.conf"
  step_done
}

# A network namespace of its own; slirp4netns gives it outbound access (NAT in user space) and a
# DNS forwarder at 10.0.2.3; --disable-host-loopback keeps 10.0.2.2 from reaching the host's
# loopback.
start_network() {
  step "network namespace"
  ip netns add "$NETNS" || fail "ip netns add $NETNS"
  ip -n "$NETNS" link set lo up || fail "bringing up lo in $NETNS"
  slirp4netns --configure --mtu=65520 --disable-host-loopback --netns-type=path \
    "/run/netns/$NETNS" tap0 >"$LOG_DIR/slirp4netns.log" 2>&1 &
  SLIRP_PID=$!
  for _ in $(seq 50); do
    ip -n "$NETNS" -4 addr show tap0 2>/dev/null | grep -q 'inet ' && break
    kill -0 "$SLIRP_PID" 2>/dev/null || fail "slirp4netns exited: $(cat "$LOG_DIR/slirp4netns.log")"
    sleep 0.2
  done
  ip -n "$NETNS" addr >>"$STEP_LOG" 2>&1
  ip -n "$NETNS" -4 addr show tap0 2>/dev/null | grep -q 'inet ' || fail "tap0 got no address within 10 s"
  say "   $NETNS: $(ip -n "$NETNS" -4 -o addr show tap0 | awk '{print $4}') on tap0, slirp4netns pid $SLIRP_PID"
  step_done
}

# The machine's PID 1, in new PID, mount, UTS and IPC namespaces and the network namespace.
# --kill-child: should unshare die, PID 1 dies, and with it everything in the machine.
start_machine() {
  step "machine"
  nsenter --net="/run/netns/$NETNS" -- unshare --pid --mount --uts --ipc --fork --kill-child \
    --propagation private -- bash -c "$MACHINE_INIT" machine-init "$ROOT" "$MACHINE_NAME" \
    >"$STEP_LOG" 2>&1 &
  UNSHARE_PID=$!
  for _ in $(seq 50); do  # its PID 1 is ready once it has chrooted, its mounts made
    INIT_PID=$(ps -o pid= --ppid "$UNSHARE_PID" 2>/dev/null | tr -d ' ')
    [ -n "$INIT_PID" ] && [ "$(readlink "/proc/$INIT_PID/root" 2>/dev/null)" = "$ROOT" ] && break
    kill -0 "$UNSHARE_PID" 2>/dev/null || { INIT_PID=; fail "the machine's PID 1 exited"; }
    sleep 0.2
  done
  [ "$(readlink "/proc/$INIT_PID/root" 2>/dev/null)" = "$ROOT" ] || fail "the machine did not start within 10 s"
  ENTER=(nsenter --target "$INIT_PID" --mount --uts --ipc --net --pid --root --wd
         -- /usr/bin/env -i "${ROOT_ENV[@]}")
  say "   PID 1: host pid $INIT_PID; $(grep -c "^$ROOT" "$STEP_LOG") mounts of its own, none on the host's"
  in_root ps -e -o pid,cmd >>"$STEP_LOG" 2>&1
  say "   inside: hostname $(in_root hostname); ps -e shows $(in_root ps -e --no-headers | wc -l) processes (PID 1 and the ps)"
  step_done
}

# The host's services must be out of reach, and the registries in reach.
check_isolation() {
  step "isolation and registries"
  if can_connect 127.0.0.1 3306; then
    say "   host: 127.0.0.1:3306 is open (its MariaDB), so the next check means something"
  else
    say "   host: nothing listens on 127.0.0.1:3306 here; checking it from inside all the same"
  fi
  can_connect 127.0.0.1 3306 in_root && fail "127.0.0.1:3306 is reachable from inside"
  can_connect 10.0.2.2 3306 in_root && fail "10.0.2.2:3306 (slirp's alias of the host) is reachable"
  say "   inside: 127.0.0.1:3306 and 10.0.2.2:3306 refuse"
  # Every other TCP port the host listens on (Postgres, Redis, ...) must be closed inside too.
  local port open=() count=0
  for port in $(ss -Hltn 2>/dev/null | awk '{n = split($4, a, ":"); print a[n]}' | sort -un | head -50); do
    count=$((count + 1))
    can_connect 127.0.0.1 "$port" in_root && open+=("$port")
  done
  [ ${#open[@]} -eq 0 ] || fail "host ports reachable from inside: ${open[*]}"
  say "   inside: none of the host's $count listening TCP ports answers on 127.0.0.1"
  logged in_root update-ca-certificates || fail "update-ca-certificates inside"
  logged in_root timeout 300 apt-get update || fail "apt-get update inside"
  say "   inside: apt-get update works"
  logged in_root curl -fsS -o /dev/null -w 'pypi.org: HTTP %{http_code}\n' --max-time 60 \
    https://pypi.org/simple/pip/ || fail "https://pypi.org from inside"
  say "   inside: https://pypi.org answers (TLS verified against the machine's CA store)"
  step_done
}

clone_project() {
  step "clone"
  local head dirty
  head=$(host_git -C "$REPO" rev-parse HEAD)
  dirty=$(host_git -C "$REPO" status --porcelain --untracked-files=no | wc -l)
  [ "$dirty" -gt 0 ] && say "   NOTE: $REPO has $dirty uncommitted change(s); they are NOT tested (commit first)"
  logged host_git clone --no-hardlinks "$REPO" "$ROOT$CLONE" || fail "git clone $REPO"
  [ "$(host_git -C "$ROOT$CLONE" rev-parse HEAD)" = "$head" ] || fail "the clone is not at $REPO's HEAD"
  say "   $REPO at $(host_git -C "$REPO" log -1 --format='%h %s') -> $CLONE"
  step_done
}

run_tests() {
  step "tests" "$TEST_COMMAND"
  say "   in $CLONE, timeout ${TESTS_TIMEOUT}s"
  local status=0 pids
  logged in_root timeout --kill-after=30 "$TESTS_TIMEOUT" bash -c "cd $CLONE && $TEST_COMMAND" \
    || status=$?
  [ "$status" = 124 ] && fail "timed out after ${TESTS_TIMEOUT}s"
  [ "$status" = 0 ] || fail "exit status $status"
  mapfile -t pids < <(machine_pids)
  if [ ${#pids[@]} -gt 0 ]; then
    say "   note: still running in the machine after the tests (the last step counts only new ones):"
    describe_pids "${pids[@]}" | tee -a "$MAIN_LOG"
  fi
  step_done
}

# A job of this script, but in a session of its own and with SIGINT back to the default: a
# background job of a non-interactive shell starts with SIGINT ignored, and the launcher is to be
# stopped as Ctrl-C would stop it. Everything after nsenter's fork execs, so nsenter's child is the
# launcher, and nsenter's exit status is the launcher's.
start_launcher() {
  step "launch" "$RUN_COMMAND"
  mapfile -t BEFORE_LAUNCH < <(machine_pids)
  LAUNCHER_LOG=$LOG_DIR/launcher.log
  "${ENTER[@]}" python3 -c '
import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_DFL)
os.setsid()
os.chdir(sys.argv[1])
os.execvp("bash", ["bash", "-c", "exec " + sys.argv[2]])
' "$CLONE" "$RUN_COMMAND" </dev/null >"$LAUNCHER_LOG" 2>&1 &
  ENTER_PID=$!
  for _ in $(seq 50); do
    LAUNCHER_PID=$(ps -o pid= --ppid "$ENTER_PID" 2>/dev/null | tr -d ' ')
    [ -n "$LAUNCHER_PID" ] && break
    sleep 0.1
  done
  [ -n "$LAUNCHER_PID" ] || { STEP_LOG=$LAUNCHER_LOG; fail "the launcher did not start"; }
  say "   host pid $LAUNCHER_PID; its output: $LAUNCHER_LOG"
  step_done
}

# Fails the step if the launcher has exited, with its exit status and the end of its output.
require_launcher() {
  launcher_alive && return 0
  local status=0
  wait "$ENTER_PID" || status=$?
  STEP_LOG=$LAUNCHER_LOG
  fail "the launcher exited with status $status"
}

wait_until_up() {
  step "up" "both services healthy"
  local deadline=$((SECONDS + UP_TIMEOUT)) url
  for url in "$SERVING/health" "$AIRFLOW/api/v2/monitor/health"; do
    until in_root curl -fsS --max-time 5 -o /dev/null "$url" 2>/dev/null; do
      require_launcher
      [ "$SECONDS" -lt "$deadline" ] || { STEP_LOG=$LAUNCHER_LOG; fail "no answer at $url within ${UP_TIMEOUT}s"; }
      sleep 3
    done
    say "   $url answers, after $((SECONDS - STEP_START))s"
  done
  { in_root curl -fsS --max-time 5 "$AIRFLOW/api/v2/monitor/health"; echo; } >>"$STEP_LOG" 2>&1
  say "   the launcher's last lines:"
  tail -n 8 "$LAUNCHER_LOG" | cut -c1-200 | sed 's/^/   | /' | tee -a "$MAIN_LOG"
  step_done
}

# The REST client: stdlib only, run by the machine's python3.
CLIENT_PY=$(cat <<'PYTHON'
import json, sys, time, urllib.error, urllib.parse, urllib.request

AIRFLOW, SERVING = "http://127.0.0.1:8080", "http://127.0.0.1:8989"
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def call(method, url, body=None, token=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with opener.open(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")
    except OSError as error:
        return None, str(error)


def die(message):
    print(f"ERROR: {message}", flush=True)
    sys.exit(1)


def dag_run(dag_id, passwords_file, seconds):
    deadline = time.monotonic() + seconds
    with open(passwords_file) as file:
        users = json.load(file)
    user = "admin" if "admin" in users else next(iter(users))
    status, text = call("POST", f"{AIRFLOW}/auth/token", {"username": user, "password": users[user]})
    if status not in (200, 201):
        die(f"POST /auth/token as {user}: {status} {text[:500]}")
    token = json.loads(text)["access_token"]
    print(f"POST /auth/token as {user}: {status}", flush=True)
    while True:  # the api-server answers before the DAG processor has parsed the DAG
        status, text = call("GET", f"{AIRFLOW}/api/v2/dags/{dag_id}", token=token)
        if status == 200:
            break
        if time.monotonic() > deadline:
            die(f"GET /api/v2/dags/{dag_id}: {status} {text[:500]}")
        time.sleep(3)
    if json.loads(text).get("is_paused"):
        die(f"{dag_id} is paused: a run triggered from the UI would never start")
    status, text = call("POST", f"{AIRFLOW}/api/v2/dags/{dag_id}/dagRuns",
                        {"logical_date": None, "conf": {}}, token)
    if status not in (200, 201):
        die(f"POST /api/v2/dags/{dag_id}/dagRuns: {status} {text[:500]}")
    run_id = json.loads(text)["dag_run_id"]
    print(f"POST /api/v2/dags/{dag_id}/dagRuns: {status}, {run_id}", flush=True)
    run_url = f"{AIRFLOW}/api/v2/dags/{dag_id}/dagRuns/{urllib.parse.quote(run_id, safe='')}"
    state = last = None
    started = time.monotonic()
    while time.monotonic() < deadline:
        status, text = call("GET", run_url, token=token)
        if status == 200:
            state = json.loads(text)["state"]
            if state != last:
                print(f"{time.monotonic() - started:6.0f}s  {state}", flush=True)
                last = state
            if state in ("success", "failed"):
                break
        time.sleep(3)
    status, text = call("GET", f"{run_url}/taskInstances?limit=100", token=token)
    if status == 200:
        for ti in json.loads(text)["task_instances"]:
            mapped = f"[{ti.get('rendered_map_index') or ti['map_index']}]" if ti["map_index"] >= 0 else ""
            print(f"  {ti['task_id'] + mapped:40} {ti['state']}", flush=True)
    if state != "success":
        die(f"the run {run_id} is {state!r} (limit {seconds:.0f}s)")


def predict(penguin, species, seconds):
    deadline = time.monotonic() + seconds
    while True:  # the service picks up the newly published models by itself, a moment later
        status, text = call("POST", f"{SERVING}/predict", penguin)
        if status != 503 or time.monotonic() > deadline:
            break
        time.sleep(2)
    print(f"POST /predict: {status} {text[:500]}", flush=True)
    if status != 200:
        die(f"expected 200, got {status}")
    answer = json.loads(text).get("species")
    if answer != species:
        die(f"expected species {species!r}, got {answer!r}")


if sys.argv[1] == "dag-run":
    dag_run(sys.argv[2], sys.argv[3], float(sys.argv[4]))
elif sys.argv[1] == "predict":
    predict(json.loads(sys.argv[2]), sys.argv[3], float(sys.argv[4]))
PYTHON
)

trigger_dag() {
  step "dag run" "$DAG_ID, as the UI's Trigger button"
  local passwords=$CLONE/airflow/home/simple_auth_manager_passwords.json.generated
  [ -s "$ROOT$passwords" ] || { STEP_LOG=$LAUNCHER_LOG; fail "no password file $passwords"; }
  logged in_root python3 -c "$CLIENT_PY" dag-run "$DAG_ID" "$passwords" "$DAG_TIMEOUT" \
    || fail "the DAG run did not succeed (the launcher's output: $LAUNCHER_LOG)"
  grep -E '^ +[0-9]+s  ' "$STEP_LOG" | tail -n 1 | sed 's/^ */   /' | tee -a "$MAIN_LOG"
  require_launcher
  step_done
}

predict_gentoo() {
  step "predict" "a Gentoo"
  local penguin='{"island": "Biscoe", "bill_length_mm": 47.5, "bill_depth_mm": 15.0, "flipper_length_mm": 218, "body_mass_g": 4950, "sex": "female", "year": 2008}'
  logged in_root python3 -c "$CLIENT_PY" predict "$penguin" Gentoo 120 || fail "POST /predict"
  grep -m1 '^POST /predict' "$STEP_LOG" | cut -c1-200 | sed 's/^/   /' | tee -a "$MAIN_LOG"
  step_done
}

stop_launcher() {
  step "stop" "SIGINT to the launcher"
  require_launcher
  kill -INT "$LAUNCHER_PID"
  local deadline=$((SECONDS + STOP_TIMEOUT)) status=0
  while launcher_alive && [ "$SECONDS" -lt "$deadline" ]; do sleep 1; done
  launcher_alive && { STEP_LOG=$LAUNCHER_LOG; fail "the launcher still runs ${STOP_TIMEOUT}s after SIGINT"; }
  wait "$ENTER_PID" || status=$?
  LAUNCHER_PID=
  say "   it exited with status $status, $((SECONDS - STEP_START))s after the SIGINT"
  step_done
}

# Nothing the launcher started may outlive it (with a few seconds' grace for exiting processes).
check_nothing_left() {
  step "nothing left"
  local new=() pid
  for _ in $(seq 10); do
    new=()
    for pid in $(machine_pids); do
      [[ " ${BEFORE_LAUNCH[*]} " == *" $pid "* ]] || new+=("$pid")
    done
    [ ${#new[@]} -eq 0 ] && break
    sleep 1
  done
  if [ ${#new[@]} -gt 0 ]; then
    describe_pids "${new[@]}" | tee -a "$MAIN_LOG" "$STEP_LOG"
    fail "${#new[@]} process(es) that the launcher started still run"
  fi
  say "   no process of the launcher's is left in the machine"
  step_done
}

main() {
  mkdir -p "$LOG_DIR" || exit 1
  trap 'on_signal INT' INT
  trap 'on_signal TERM' TERM
  trap 'on_signal HUP' HUP
  trap 'say "unexpected exit"; finish 1' EXIT
  say "fresh machine: the README on a fresh Debian 12 (logs: $LOG_DIR)"
  check_host
  pristine_root
  unpack_root
  configure_root
  start_network
  start_machine
  check_isolation
  clone_project
  run_tests
  start_launcher
  wait_until_up
  trigger_dag
  predict_gentoo
  stop_launcher
  check_nothing_left
  finish 0
}

main "$@"

#!/usr/bin/env bash
# The MPI ring across two "hosts": each host is a network namespace, joined by veth links to a
# bridge in a third namespace where mpirun runs; ranks talk over Open MPI's TCP transport exactly
# as on a cluster (a hostfile with slots, an rsh launch agent instead of ssh, `btl self,tcp`, btl
# and oob interfaces chosen by subnet). docs/mpi_clusters.md describes the recipe.
#
#   1. RING_TEST (posenc_ring_mpi_test) over TCP with 2 ranks, one per host: every rank's output
#      equals the in-process simulator's bit for bit, the gathered result equals single-process
#      attention.
#   2. DIGEST (posenc_ring_digest) with 2 ranks (one per host) and 4 ranks (two per host, mapped
#      by node so that ring neighbours are on different hosts), each once over shared memory
#      (`btl self,vader`, all ranks in one namespace) and once over TCP: the digests of the
#      gathered outputs must be equal, and each TCP rank must report the host it was mapped to.
#
# Namespaces are named posenc<PID>h (hub: bridge, mpirun), posenc<PID>r0 and posenc<PID>r1 (hosts)
# so that parallel runs cannot collide; the links are created inside them and their private
# addresses (10.77.0.0/24) exist only there. Nothing is configured in the caller's namespace.
# Everything is removed on exit, also after a failure, a timeout or INT/TERM; namespaces of this
# naming pattern left by runs whose process is gone (killed by SIGKILL) are removed first.
#
# Usage: ring_netns_test.sh MPIEXEC RING_TEST DIGEST
# Exit status: 0 pass, 1 fail, 2 usage, 77 skipped (not root, no `ip netns`, no permission to
# create namespaces or links, as in containers without CAP_NET_ADMIN), with the reason printed.
# Environment: POSENC_NETNS_BUDGET (default 100) seconds for all mpirun runs together; the ctest
# timeout is longer, so that a hung run is stopped here and the cleanup still runs.
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
if [[ $# -ne 3 ]]; then
  usage >&2
  exit 2
fi
mpiexec=$1 ring_test=$2 digest=$3
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
agent=$here/netns_agent.sh
me=ring_netns_test

skip() {
  echo "$me: SKIPPED: $*"
  exit 77
}

[[ $(id -u) -eq 0 ]] || skip "not root (network namespaces and veth links need CAP_NET_ADMIN)"
for tool in ip unshare timeout; do
  command -v "$tool" >/dev/null || skip "'$tool' not found"
done
ip netns list >/dev/null 2>&1 || skip "'ip netns' is not available"

prefix=posenc$$
hub=${prefix}h
nodes=("${prefix}r0" "${prefix}r1")
net=10.77.0
hub_addr=$net.100
node_addrs=("$net.1" "$net.2")
subnet=$net.0/24

# remove_netns NS: ends the processes still inside NS (by their ids), then deletes NS; its links
# and addresses go with it.
remove_netns() {
  local ns=$1 pids
  pids=$(ip netns pids "$ns" 2>/dev/null || true)
  if [[ -n $pids ]]; then
    # shellcheck disable=SC2086
    kill -TERM $pids 2>/dev/null || true
    sleep 1
    pids=$(ip netns pids "$ns" 2>/dev/null || true)
    # shellcheck disable=SC2086
    [[ -z $pids ]] || kill -KILL $pids 2>/dev/null || true
  fi
  ip netns delete "$ns" 2>/dev/null || true
}

# Leftovers of this test's naming pattern whose run is gone (its PID no longer exists, or is this
# process, reused).
for ns in $(ip netns list | awk '{ print $1 }'); do
  [[ $ns =~ ^posenc([0-9]+)(h|r[0-9]+)$ ]] || continue
  pid=${BASH_REMATCH[1]}
  if [[ $pid == "$$" ]] || ! kill -0 "$pid" 2>/dev/null; then
    echo "$me: removing namespace $ns left by an earlier run"
    remove_netns "$ns"
  fi
done

tmp=$(mktemp -d)
cleanup() {
  local status=$?
  trap - EXIT INT TERM
  for ns in "${nodes[@]}" "$hub"; do remove_netns "$ns"; done
  rm -rf "$tmp"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# try REASON COMMAND...: runs COMMAND; if it fails, the machine cannot host the emulation: skip.
try() {
  local why=$1
  shift
  "$@" 2>"$tmp/err" || skip "$why: $(tr '\n' ' ' <"$tmp/err")"
}

# The hub: a bridge with an address of the subnet, for mpirun and its runtime (oob) connections.
try "cannot create a network namespace" ip netns add "$hub"
try "cannot enter a network namespace" ip netns exec "$hub" true
try "cannot create a UTS namespace (needed to give each host its own name)" \
  ip netns exec "$hub" unshare --uts true
try "cannot create a bridge" ip -n "$hub" link add br0 type bridge
ip -n "$hub" link set lo up
ip -n "$hub" link set br0 up
ip -n "$hub" addr add "$hub_addr/24" dev br0

# The "hosts": one veth pair each, eth0 inside the host's namespace, its peer on the bridge.
for i in "${!nodes[@]}"; do
  ns=${nodes[$i]}
  try "cannot create a network namespace" ip netns add "$ns"
  try "cannot create a veth link" ip -n "$ns" link add eth0 type veth peer name "port$i" netns "$hub"
  ip -n "$hub" link set "port$i" master br0
  ip -n "$hub" link set "port$i" up
  ip -n "$ns" link set lo up
  ip -n "$ns" addr add "${node_addrs[$i]}/24" dev eth0
  ip -n "$ns" link set eth0 up
done

# The hostfile of a cluster: one line per host, with the number of ranks it may run.
for addr in "${node_addrs[@]}"; do echo "$addr slots=2"; done >"$tmp/hostfile"

deadline=$((SECONDS + ${POSENC_NETNS_BUDGET:-100}))
# limited COMMAND...: runs COMMAND with what is left of the budget (then TERM, KILL 5 s later). It
# runs in the background so that an INT or TERM reaches this script's trap at once.
limited() {
  local left=$((deadline - SECONDS))
  ((left > 0)) || return 124
  timeout -k 5 "$left" "$@" &
  wait $!
}

# Settings all runs share: root allowed, no core binding (the "hosts" share this machine's cores),
# waiting ranks yield the CPU, one OpenMP thread per rank.
common=(--allow-run-as-root --bind-to none --mca mpi_yield_when_idle 1 -x OMP_NUM_THREADS=1)
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 PMIX_MCA_gds=hash OMP_NUM_THREADS=1
export POSENC_NETNS_PREFIX=${prefix}r  # the namespaces the agent may enter

# tcp_run NP PROGRAM: mpirun over TCP from the hub, NP ranks mapped round-robin over the hosts and
# launched by the agent into their namespaces. The hub gets a hostname of its own (a UTS
# namespace), as the hosts do: with every process reporting this machine's hostname the launch
# hung.
tcp_run() {
  local np=$1
  shift
  # shellcheck disable=SC2016 # $0 and $@ are expanded by sh
  limited ip netns exec "$hub" unshare --uts sh -c 'hostname "$0" && exec "$@"' "$hub" \
    "$mpiexec" "${common[@]}" --hostfile "$tmp/hostfile" --map-by node \
    --mca plm rsh --mca plm_rsh_agent "$agent" --mca plm_rsh_no_tree_spawn 1 \
    --mca pml ob1 --mca btl self,tcp \
    --mca btl_tcp_if_include "$subnet" --mca oob_tcp_if_include "$subnet" \
    -np "$np" "$@"
}

# shm_run NP PROGRAM: mpirun over shared memory, all NP ranks in the first host's namespace (its
# loopback for the runtime), as the other MPI tests run.
shm_run() {
  local np=$1
  shift
  limited ip netns exec "${nodes[0]}" \
    "$mpiexec" "${common[@]}" --oversubscribe --mca plm isolated \
    --mca pml ob1 --mca btl self,vader --mca btl_vader_single_copy_mechanism none \
    --mca oob_tcp_if_include lo \
    -np "$np" "$@"
}

fail() {
  echo "$me: FAILED: $*" >&2
  exit 1
}

# step WHAT OUTPUT RUN NP PROGRAM: RUN (tcp_run or shm_run) NP PROGRAM, its standard output to
# OUTPUT and here.
step() {
  local what out=$2 status=0
  what="$(basename "$5") with $4 ranks $1"
  shift 2
  echo "$me: $what"
  "$@" >"$out" || status=$?
  cat "$out"
  ((status != 124 && status != 137)) || fail "$what: timed out (POSENC_NETNS_BUDGET)"
  ((status == 0)) || fail "$what: exit status $status"
}

echo "$me: namespaces $hub (mpirun, bridge $hub_addr) ${nodes[*]} (hosts ${node_addrs[*]})"
step "over TCP" "$tmp/ring.out" tcp_run 2 "$ring_test"

for np in 2 4; do
  step "over shared memory" "$tmp/shm$np.out" shm_run "$np" "$digest"
  step "over TCP" "$tmp/tcp$np.out" tcp_run "$np" "$digest"
  shm_digest=$(awk '$1 == "digest" { print $2 }' "$tmp/shm$np.out")
  tcp_digest=$(awk '$1 == "digest" { print $2 }' "$tmp/tcp$np.out")
  [[ -n $shm_digest ]] || fail "no digest from the shared-memory run with $np ranks"
  [[ $shm_digest == "$tcp_digest" ]] ||
    fail "$np ranks: TCP digest '$tcp_digest' differs from shared memory's '$shm_digest'"
  # --map-by node: rank r on host r mod 2.
  ran_on=$(awk '$1 == "host" { print $3 }' "$tmp/tcp$np.out" | tr '\n' ' ')
  expected=$(for ((r = 0; r < np; ++r)); do echo "${nodes[r % 2]}"; done | tr '\n' ' ')
  [[ $ran_on == "$expected" ]] || fail "$np ranks over TCP ran on hosts '$ran_on', expected '$expected'"
  echo "$me: $np ranks: over TCP the gathered output is bit-identical to shared memory's ($tcp_digest)"
done
echo "$me: PASSED"

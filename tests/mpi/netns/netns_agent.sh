#!/usr/bin/env bash
# Open MPI launch agent that stands in for ssh when the "hosts" are network namespaces on this
# machine (used by ring_netns_test.sh as `--mca plm_rsh_agent`; see docs/mpi_clusters.md).
#
# Usage: netns_agent.sh HOST COMMAND...
#   Runs COMMAND, a shell command line as ssh would run it, inside the network namespace named
#   $POSENC_NETNS_PREFIX<something> that owns the IPv4 address HOST. The command also gets its own
#   UTS namespace whose hostname is the namespace's name, so that each "host" reports a name of
#   its own, as real hosts do: ranks tell where they ran by it, and with every process reporting
#   this machine's hostname the launch hung.
# Environment: POSENC_NETNS_PREFIX (required) the prefix of the namespaces to search.
set -euo pipefail

if [[ $# -lt 2 || -z ${POSENC_NETNS_PREFIX:-} ]]; then
  echo "netns_agent.sh: usage: POSENC_NETNS_PREFIX=PREFIX netns_agent.sh HOST COMMAND..." >&2
  exit 255
fi
host=$1
shift
for ns in $(ip netns list | awk '{ print $1 }'); do
  [[ $ns == "$POSENC_NETNS_PREFIX"* ]] || continue
  if ip -n "$ns" -o -4 addr show | awk '{ sub(/\/.*/, "", $4); print $4 }' | grep -qxF "$host"; then
    exec ip netns exec "$ns" unshare --uts sh -c "hostname '$ns' && $*"
  fi
done
echo "netns_agent.sh: no namespace $POSENC_NETNS_PREFIX* owns the address $host" >&2
exit 255

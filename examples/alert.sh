#!/bin/sh
# Post an alert to a chat room when a disk fills up: the way a cron job or
# a monitoring hook would use ipcd. Datagram posting is fire-and-check, like
# logger(1): the message carries this process's uid, whoever runs it.
#
#   examples/alert.sh [THRESHOLD_PERCENT] [ROOM]
#
# IPCCTL overrides the client command (default: ipcctl on PATH);
# IPCD_SOCKET_DIR selects the daemon as for ipcctl itself.
set -eu
threshold=${1:-90}
room=${2:-alerts}
ipcctl=${IPCCTL:-ipcctl}

df -P -x tmpfs -x devtmpfs 2>/dev/null | awk -v t="$threshold" 'NR > 1 {
    use = $5; sub("%", "", use)
    if (use + 0 >= t) printf "disk %s is %s%% full (%s)\n", $6, use, $1
}' | while IFS= read -r line; do
    $ipcctl send --dgram --room "$room" "$(hostname): $line"
done

#!/bin/sh
# Hand a pipe, and an in-memory file, between two unrelated processes with ipcd.
#
#   examples/pipe_handoff.sh produce [COUNT]   # shell 1: writes COUNT jobs into a pipe stored as "jobs"
#   examples/pipe_handoff.sh consume           # shell 2, any time later: takes the pipe, reads it to the end
#   examples/pipe_handoff.sh memfd-put < FILE  # stores FILE's content in a memfd as "notes"
#   examples/pipe_handoff.sh memfd-get         # prints the memfd's content (it stays stored)
#   examples/pipe_handoff.sh                   # all of the above, with a few jobs
#
# produce: in `generate | ipcctl put jobs -`, ipcctl stores its stdin, the
# pipe's read end, in ipcd and exits. The pipe has no name and no path, yet
# it stays open: the generator keeps writing and, once the 64 KiB pipe buffer
# is full, simply blocks (no SIGPIPE) until a reader turns up. consume, from
# a process that never shared anything with the producer, TAKEs the read end:
# `ipcctl take jobs -- CMD` runs CMD with it at fd 3 (LISTEN_FDS=1, the
# socket-activation convention), here `cat <&3`, which reads until the
# producer closes its end. Without `-- CMD`, `ipcctl take jobs` would copy the
# pipe to stdout itself.
#
# memfd-put: a memfd is a file that lives only in memory, with no path to
# guard: a Python one-liner creates one, fills it from stdin, seals it
# against writes and execs `ipcctl put notes --fd 3`. memfd-get prints it
# (`ipcctl get` reads it with pread from offset 0, so every reader sees all
# of it); `ipcctl rm notes` frees it.
#
# Environment: IPCCTL is the client command (default: ipcctl on PATH);
# PYTHON the interpreter for the memfd one-liner (default python3);
# IPCD_SOCKET_DIR selects the daemon as for ipcctl itself; WAIT is how long
# consume waits for the pipe to be put (default 30 s: start it first if you like).
set -eu
ipcctl=${IPCCTL:-ipcctl}
python=${PYTHON:-python3}
wait=${WAIT:-30}

produce() {
    count=${1:-5}
    i=1
    while [ "$i" -le "$count" ]; do
        echo "job $i of $count"
        i=$((i + 1))
    done | {
        # The read end is this group's stdin; ipcd keeps it after we exit.
        $ipcctl put jobs -
        echo "producer $$: the pipe's read end is stored in ipcd as 'jobs'" >&2
    }
    echo "producer $$: all $count jobs written" >&2
}

consume() {
    $ipcctl take jobs --wait "$wait" -- sh -c 'exec cat <&3'
}

memfd_put() {
    # shellcheck disable=SC2086 # $ipcctl may be several words
    "$python" -c '
import fcntl, os, sys
fd = os.memfd_create("notes", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
os.write(fd, sys.stdin.buffer.read())
fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
os.dup2(fd, 3)
os.set_inheritable(3, True)  # (dup2 onto itself would leave close-on-exec set)
os.execvp(sys.argv[1], sys.argv[1:])
' $ipcctl put notes --fd 3 --replace
}

memfd_get() {
    $ipcctl get notes
}

case ${1:-demo} in
produce) shift; produce "$@" ;;
consume) consume ;;
memfd-put) memfd_put ;;
memfd-get) memfd_get ;;
demo)
    produce 5 &
    consume
    wait
    echo "ipcd keeps notes in memory, with no file behind them" | memfd_put
    memfd_get
    $ipcctl rm notes
    ;;
*)
    echo "usage: $0 [produce [COUNT] | consume | memfd-put | memfd-get]" >&2
    exit 2
    ;;
esac

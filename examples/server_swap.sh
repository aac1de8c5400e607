#!/bin/sh
# Zero-downtime upgrades of a real server, gunicorn or lighttpd, swapped
# version after version on one listening socket that ipcd holds.
#
#   examples/server_swap.sh [ADDRESS [VERSION...]]   # default: 127.0.0.1:8080 v1 v2 v3
#   SERVER=lighttpd examples/server_swap.sh 127.0.0.1:8080 v1 v2
#
# The recipe, as a shell user does it with gunicorn (docs/handoff.md,
# "Swapping a real server"):
#
#   ipcctl put web --listen 127.0.0.1:8080        # once: ipcctl binds it, ipcd keeps it
#   APP_VERSION=v1 ipcctl get web -- gunicorn --no-control-socket --chdir examples version_app:app &
#   v1=$!                                         # gunicorn's pid: ipcctl exec'd it
#   # to upgrade, with v1 still serving:
#   APP_VERSION=v2 ipcctl get web -- gunicorn --no-control-socket --chdir examples version_app:app &
#   v2=$!
#   until curl -fsS http://127.0.0.1:8080/ | grep -q '^v2 '; do sleep 0.1; done
#   kill -TERM $v1; wait $v1                      # v1 stops accepting, drains, exits
#
# `ipcctl get` runs the server with the stored socket at fd 3 and
# LISTEN_FDS=1, LISTEN_PID=its own pid: systemd socket activation, which
# gunicorn honours as it is, and lighttpd with
# server.systemd-socket-activation = "enable" and server.bind/server.port
# naming that same address (else it binds the one configured as well).
# While two versions overlap both accept on the one socket; a connection
# that arrives meanwhile is taken by either, and none is refused, because
# the socket never closes: ipcd holds it. The old version is stopped
# gracefully (gunicorn: SIGTERM; lighttpd: SIGINT, as its SIGTERM drops
# connections): it stops accepting and finishes what it has. If a new
# version never answers, the old one keeps serving (the script stops the
# new one and says so).
#
# gunicorn serves examples/version_app.py (body "VERSION pid=WORKER_PID"),
# each version with its own control socket (gunicorn 25.1+ opens one, by
# default at the same path for every version); lighttpd serves a file whose
# body is "VERSION", one directory per version.
#
# The script serves the first VERSION, then before each swap, and before it
# stops the last version, reads a line from stdin: press Enter to go on (at
# end of input it goes on at once). It prints one line per step. At the end
# it stops the last version and removes the socket from ipcd (ipcctl rm).
#
# Environment: SERVER is gunicorn (default) or lighttpd; GUNICORN and
# LIGHTTPD the programs (default: found on PATH); IPCCTL the client command
# (default: ipcctl on PATH); NAME the entry in ipcd (default web); WAIT how
# many seconds a new version has to answer (default 30); WORKERS gunicorn's
# worker count (default 2); IPCD_SOCKET_DIR selects the daemon as for
# ipcctl itself. Needs curl.
set -eu
ipcctl=${IPCCTL:-ipcctl}
server=${SERVER:-gunicorn}
gunicorn=${GUNICORN:-gunicorn}
lighttpd=${LIGHTTPD:-lighttpd}
name=${NAME:-web}
wait_secs=${WAIT:-30}
workers=${WORKERS:-2}
here=$(cd "$(dirname "$0")" && pwd)
address=${1:-127.0.0.1:8080}
[ $# -gt 0 ] && shift
[ $# -gt 0 ] || set -- v1 v2 v3

case $server in
gunicorn) stop_signal=TERM ;;
lighttpd) stop_signal=INT ;;
*)
    echo "server_swap: SERVER is gunicorn or lighttpd, not '$server'" >&2
    exit 2
    ;;
esac

current=""
version=""
stored=""
workdir=$(mktemp -d) # per version: gunicorn's control socket, lighttpd's configuration and document

cleanup() {
    if [ -n "$current" ]; then
        echo "stopping $version (pid $current)"
        kill -"$stop_signal" "$current" 2>/dev/null || true
        wait "$current" || true
    fi
    if [ -n "$stored" ]; then
        $ipcctl rm "$name"
        echo "removed $name from ipcd"
    fi
    rm -rf "$workdir"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# One request to whatever serves the socket; prints the body.
ask() {
    case $where in
    /* | ./* | ../*) curl -fsS --max-time 5 --unix-socket "$where" http://localhost/ ;;
    @*) curl -fsS --max-time 5 --abstract-unix-socket "${where#@}" http://localhost/ ;;
    "[::]:"*) curl -fsS --max-time 5 "http://[::1]:${where##*:}/" ;;
    0.0.0.0:*) curl -fsS --max-time 5 "http://127.0.0.1:${where##*:}/" ;;
    *) curl -fsS --max-time 5 "http://$where/" ;;
    esac
}

# lighttpd's configuration for version $1: its document, and the address of
# the stored socket, so that lighttpd uses that socket and binds nothing.
lighttpd_conf() {
    mkdir -p "$workdir/$1"
    echo "$1" >"$workdir/$1/index.txt"
    case $where in
    /* | ./* | ../*) bind="server.bind = \"$where\"" ;;
    *) bind="server.bind = \"${where%:*}\"
server.port = ${where##*:}" ;;
    esac
    cat >"$workdir/$1.conf" <<END
server.systemd-socket-activation = "enable"
$bind
server.document-root = "$workdir/$1"
index-file.names = ( "index.txt" )
mimetype.assign = ( ".txt" => "text/plain" )
END
}

# Starts version $1 of the server on the stored socket; its pid in $started.
start() {
    # shellcheck disable=SC2086 # $ipcctl, $gunicorn and $lighttpd may be several words
    case $server in
    gunicorn)
        # Each version its own control socket: two versions overlap, one path would be fought over.
        APP_VERSION=$1 $ipcctl get "$name" -- $gunicorn --chdir "$here" --workers "$workers" \
            --control-socket "$workdir/$1.ctl" --log-level warning version_app:app &
        ;;
    lighttpd)
        lighttpd_conf "$1"
        $ipcctl get "$name" -- $lighttpd -D -f "$workdir/$1.conf" &
        ;;
    esac
    started=$!
}

# Waits until version $1 (pid $2) answers; fails if it exits or WAIT passes.
answers() {
    tries=$((wait_secs * 10))
    while [ "$tries" -gt 0 ]; do
        state=$(sed 's/.*) //' "/proc/$2/stat" 2>/dev/null | cut -d' ' -f1) || state=""
        case $state in "" | Z) return 1 ;; esac # it exited (a zombie until we wait for it)
        if ask 2>/dev/null | grep -Eq "^$1( |\$)"; then
            return 0
        fi
        sleep 0.1
        tries=$((tries - 1))
    done
    return 1
}

bound=$($ipcctl put "$name" --listen "$address") # "web: listening on 127.0.0.1:8080"
stored=1
echo "$bound"
where=${bound##* }

first=$1
shift
start "$first"
if ! answers "$first" "$started"; then
    echo "server_swap: $first did not answer within ${wait_secs}s" >&2
    kill -TERM "$started" 2>/dev/null || true
    wait "$started" || true
    exit 1
fi
current=$started
version=$first
echo "$version serving on $where (pid $current)"

for next in "$@"; do
    read -r _ || true # Enter: swap now
    start "$next"
    if answers "$next" "$started"; then
        echo "$next serving (pid $started); stopping $version (pid $current)"
        kill -"$stop_signal" "$current"
        status=0
        wait "$current" || status=$?
        echo "$version (pid $current) drained and exited with status $status"
        current=$started
        version=$next
    else
        echo "server_swap: $next did not answer within ${wait_secs}s; $version keeps serving" >&2
        kill -TERM "$started" 2>/dev/null || true
        wait "$started" || true
    fi
done
read -r _ || true # Enter: stop

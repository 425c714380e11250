# Shared by install.sh and uninstall.sh (sourced, not run).

LABEL=com.github.nirs.vmnet-broker
USER_NAME=_vmnetbroker
APP_DIR="/Library/Application Support/vmnet-broker"
LOG_DIR=/Library/Logs/vmnet-broker
CONFIG_DIR=/etc/vmnet-broker.d
PLIST=/Library/LaunchDaemons/$LABEL.plist

die() { echo "$(basename "$0"): $*" >&2; exit 1; }

need_root_on_macos() {
    [ "$(uname -s)" = Darwin ] || die "this is the macOS installer; on Linux see contrib/vmnet-broker.service"
    [ "$(id -u)" = 0 ] || die "needs root: sudo $0 $*"
}

# The pid of the running broker (ours or the original: same label), or nothing.
broker_pid() {
    launchctl print "system/$LABEL" 2>/dev/null | awk '$1 == "pid" && $2 == "=" { print $3; exit }'
}

# Stops a running broker. Both brokers ignore SIGTERM while VMs hold networks, so a broker
# still alive after SIGTERM means VMs are connected: refuse rather than pull their networks.
stop_broker() {
    local pid deadline
    pid=$(broker_pid)
    if [ -n "$pid" ]; then
        echo "stopping the running broker (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        deadline=$((SECONDS + 10))
        while kill -0 "$pid" 2>/dev/null; do
            if [ "$SECONDS" -ge "$deadline" ]; then
                die "the broker (pid $pid) is still running: VMs are connected to it. Stop them and try again."
            fi
            sleep 0.2
        done
    fi
    launchctl bootout "system/$LABEL" 2>/dev/null || true
}

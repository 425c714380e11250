# Helper functions for test scripts run inside the guest (sourced before the script).
# Output convention, parsed by tests/support/vm.rs:
#   VMNB-RESULT key=value   one result (the last value of a key wins)
#   VMNB-DONE rc=N          printed by init after the script, N its exit status

# result KEY VALUE...: report a result line.
result() {
    local key=$1
    shift
    echo "VMNB-RESULT $key=$*"
}

# check KEY CMD...: run CMD, report KEY=ok or KEY=fail, return its status.
check() {
    local key=$1
    shift
    if "$@"; then
        result "$key" ok
    else
        local rc=$?
        result "$key" fail
        return $rc
    fi
}

# wait_for SECONDS CMD...: retry CMD every 0.2 s until it succeeds or SECONDS pass.
wait_for() {
    local deadline
    deadline=$(($(cut -d. -f1 /proc/uptime) + $1))
    shift
    until "$@"; do
        [ "$(cut -d. -f1 /proc/uptime)" -lt "$deadline" ] || return 1
        sleep 0.2
    done
}

# static_ip IFACE ADDR/PREFIX [GATEWAY]: configure an address (and default route).
static_ip() {
    ip link set "$1" up || return
    ip addr add "$2" dev "$1" || return
    if [ -n "${3:-}" ]; then ip route add default via "$3" dev "$1" || return; fi
}

# dhcp IFACE [extra udhcpc args]: get a lease with busybox udhcpc and configure it through
# /lib/vmnb/udhcpc.script (address, route, /etc/resolv.conf, hostname, MTU). The hostname
# from the kernel command line (vmnb.hostname=) is sent as option 12 so the DHCP server
# learns it. The lease's values are left in /run/vmnb/dhcp-IFACE.env and printed as one
# "VMNB-DHCP iface=... ip=..." line. Returns non-zero if no lease came within ~10 s.
dhcp() {
    local iface=$1
    shift
    ip link set "$iface" up || return
    rm -f "/run/vmnb/dhcp-$iface.env"
    udhcpc -i "$iface" -f -q -n -t 10 -T 1 -A 1 -s /lib/vmnb/udhcpc.script \
        -x "hostname:$VMNB_HOSTNAME" "$@" || return
    [ -f "/run/vmnb/dhcp-$iface.env" ]
}

# lease IFACE KEY: a value of the last lease on IFACE (ip, mask, router, dns, domain,
# hostname, mtu, lease, serverid, subnet).
lease() {
    (. "/run/vmnb/dhcp-$1.env" 2>/dev/null && eval "echo \"\${$2:-}\"")
}

# iface_addr IFACE: the first IPv4 address of IFACE, without prefix.
iface_addr() {
    ip -4 -o addr show dev "$1" | sed -n 's/.* inet \([0-9.]*\)\/.*/\1/p' | head -n1
}

# icmp_echos_received: how many ICMP echo requests this guest got (peers pinging it).
icmp_echos_received() {
    awk '/^Icmp:/ { if (!h) { for (i = 1; i <= NF; i++) if ($i == "InEchos") c = i; h = 1 } else print $c }' /proc/net/snmp
}

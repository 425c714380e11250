#!/usr/bin/env bash
# Installs vmnet-broker as the launchd daemon com.github.nirs.vmnet-broker, replacing the
# original broker if it is installed (same label, same Mach service, same user).
#
#   sudo contrib/macos/install.sh [path/to/vmnet-broker]     (default: target/release/vmnet-broker)
#
# Refuses while VMs are connected to a running broker. docs/macos.md has the details.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=common.sh
. "$here/common.sh"
need_root_on_macos "$@"

binary="${1:-$here/../../target/release/vmnet-broker}"
[ -x "$binary" ] || die "no broker binary at $binary (cargo build --release first)"
major=$(sw_vers -productVersion | cut -d. -f1)
[ "$major" -ge 26 ] || die "needs macOS 26 or later (the vmnet network API); this is $(sw_vers -productVersion)"

stop_broker

# The unprivileged user the broker runs as (vmnet needs the entitlement, not root).
if ! dscl . -read "/Users/$USER_NAME" >/dev/null 2>&1; then
    id=""
    for candidate in $(seq 201 399); do
        if ! dscl . -search /Users UniqueID "$candidate" | grep -q . &&
            ! dscl . -search /Groups PrimaryGroupID "$candidate" | grep -q .; then
            id=$candidate
            break
        fi
    done
    [ -n "$id" ] || die "no free uid/gid between 201 and 399 for $USER_NAME"
    echo "creating user and group $USER_NAME ($id)"
    dscl . -create "/Groups/$USER_NAME"
    dscl . -create "/Groups/$USER_NAME" PrimaryGroupID "$id"
    dscl . -create "/Groups/$USER_NAME" RealName "vmnet-broker"
    dscl . -create "/Users/$USER_NAME"
    dscl . -create "/Users/$USER_NAME" UniqueID "$id"
    dscl . -create "/Users/$USER_NAME" PrimaryGroupID "$id"
    dscl . -create "/Users/$USER_NAME" UserShell /usr/bin/false
    dscl . -create "/Users/$USER_NAME" NFSHomeDirectory /var/empty
    dscl . -create "/Users/$USER_NAME" RealName "vmnet-broker"
    dscl . -create "/Users/$USER_NAME" IsHidden 1
fi

echo "installing $binary to $APP_DIR"
install -d -o root -g wheel -m 0755 "$APP_DIR"
install -o root -g wheel -m 0755 "$binary" "$APP_DIR/vmnet-broker"
# Ad-hoc signature with the virtualization entitlement, which vmnet requires.
codesign --force --sign - --entitlements "$here/entitlements.plist" "$APP_DIR/vmnet-broker"
install -d -o "$USER_NAME" -g "$USER_NAME" -m 0755 "$LOG_DIR"
# Network files: owned by root, not writable by others (docs/configuration.md).
[ -d "$CONFIG_DIR" ] || install -d -o root -g wheel -m 0755 "$CONFIG_DIR"
install -o root -g wheel -m 0644 "$here/$LABEL.plist" "$PLIST"

launchctl bootstrap system "$PLIST"
echo "installed; launchd starts the broker when a client connects. Log: $LOG_DIR/vmnet-broker.log"

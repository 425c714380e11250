#!/usr/bin/env bash
# Removes what install.sh installed: the service, the binary, the logs, the user and group,
# and the config directory if it is empty (network files you wrote are kept and named).
#
#   sudo contrib/macos/uninstall.sh
#
# Refuses while VMs are connected to a running broker.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=common.sh
. "$here/common.sh"
need_root_on_macos "$@"

stop_broker
rm -f "$PLIST"
rm -rf "$APP_DIR" "$LOG_DIR"
if dscl . -read "/Users/$USER_NAME" >/dev/null 2>&1; then
    dscl . -delete "/Users/$USER_NAME"
fi
if dscl . -read "/Groups/$USER_NAME" >/dev/null 2>&1; then
    dscl . -delete "/Groups/$USER_NAME"
fi
if [ -d "$CONFIG_DIR" ]; then
    rmdir "$CONFIG_DIR" 2>/dev/null || echo "kept $CONFIG_DIR: it holds network files ($(ls "$CONFIG_DIR" | tr '\n' ' '))"
fi
echo "uninstalled"

//! The restore watchdog: puts the broker's tables back when someone removed them (`nft
//! flush ruleset` by firewalld reloads, `systemctl restart nftables`, ...), a well known
//! cause of VMs silently losing their network with other tools.

use std::sync::{Arc, Weak};
use std::time::Duration;

use tracing::warn;

use super::{Firewall, FirewallError, Inner};

/// How often the watchdog checks that our tables still exist.
pub const WATCHDOG_INTERVAL: Duration = Duration::from_secs(2);

impl Firewall {
    /// Starts the task that puts our tables back (with a warning) when something removed
    /// them, checking every [`WATCHDOG_INTERVAL`]. The check runs in the apply queue like
    /// every change, so it never sees a change half-applied. The task ends once every clone
    /// of this `Firewall` has been dropped. Must be called inside a tokio runtime.
    pub fn spawn_watchdog(&self) -> tokio::task::JoinHandle<()> {
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(WATCHDOG_INTERVAL).await;
                let Some(inner) = weak.upgrade() else {
                    return;
                };
                // Holds the firewall only for one check, so dropping it ends the task.
                let firewall = Firewall { inner };
                let checked = firewall
                    .queued(|inner| async move { inner.check_and_restore().await })
                    .await;
                if let Err(e) = checked {
                    warn!("firewall watchdog: {}", crate::error::Chain(&e));
                }
            }
        })
    }
}

impl Inner {
    async fn check_and_restore(&self) -> Result<(), FirewallError> {
        if self.lock().networks.is_empty() || self.tables_present().await? {
            return Ok(());
        }
        warn!("firewall rules were removed (flushed?), restored");
        self.restore().await
    }
}

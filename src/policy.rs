//! Who may use which network: `allowed_users` / `allowed_groups` against the peer's
//! credentials (SO_PEERCRED, SO_PEERGROUPS). Pure logic over a [`Directory`] of users and
//! groups.

use crate::config::{NetworkConfig, Principal};
use std::sync::Arc;

/// The credentials of a connected client, read by the kernel when it connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
    /// The supplementary groups of the connecting process (SO_PEERGROUPS), when the
    /// kernel reports them. Group checks use these, as the kernel's own permission checks
    /// do; `None` falls back to the user database.
    pub groups: Option<Arc<[u32]>>,
}

/// Name lookups, so tests can use a fake user database.
pub trait Directory: Send + Sync {
    fn user_name(&self, uid: u32) -> Option<String>;
    fn group_id(&self, name: &str) -> Option<u32>;
    /// Every group the user belongs to, primary group included.
    fn groups_of(&self, uid: u32, primary_gid: u32) -> Vec<u32>;
}

/// A peer the network's `allowed_users` / `allowed_groups` do not name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "uid {uid} ({}) is not in allowed_users or allowed_groups of network {network:?}",
    user.as_deref().unwrap_or("no name")
)]
pub struct Denied {
    pub uid: u32,
    /// The uid's user name, when the user database knows it.
    pub user: Option<String>,
    pub network: String,
}

/// Whether deciding for `peer` needs the user database: not for root, nor for a network
/// open to everyone. Lets callers skip a blocking thread on the common path.
pub fn needs_lookup(config: &NetworkConfig, peer: &Peer) -> bool {
    peer.uid != 0 && !(config.allowed_users.is_empty() && config.allowed_groups.is_empty())
}

/// Decides whether `peer` may use the network. Root is always allowed; a network that
/// names no users and no groups is open to everyone who can reach the socket.
///
/// The [`Directory`] may block (NSS can ask a remote service): async callers run this
/// on a blocking thread ([`tokio::task::spawn_blocking`]).
pub fn check(config: &NetworkConfig, peer: &Peer, dir: &dyn Directory) -> Result<(), Denied> {
    if !needs_lookup(config, peer) {
        return Ok(());
    }
    let name = dir.user_name(peer.uid);
    let user_ok = config.allowed_users.iter().any(|p| match p {
        Principal::Id(id) => *id == peer.uid,
        Principal::Name(n) => name.as_deref() == Some(n.as_str()),
    });
    if user_ok {
        return Ok(());
    }
    if !config.allowed_groups.is_empty() {
        let groups = match &peer.groups {
            Some(supplementary) => {
                let mut g = supplementary.to_vec();
                g.push(peer.gid);
                g
            }
            None => dir.groups_of(peer.uid, peer.gid),
        };
        let group_ok = config.allowed_groups.iter().any(|p| {
            let gid = match p {
                Principal::Id(id) => Some(*id),
                Principal::Name(n) => dir.group_id(n),
            };
            gid.is_some_and(|g| groups.contains(&g))
        });
        if group_ok {
            return Ok(());
        }
    }
    Err(Denied {
        uid: peer.uid,
        user: name,
        network: config.name.clone(),
    })
}

/// The system's user database (NSS).
pub struct SystemDirectory;

impl Directory for SystemDirectory {
    fn user_name(&self, uid: u32) -> Option<String> {
        nix::unistd::User::from_uid(uid.into())
            .ok()
            .flatten()
            .map(|u| u.name)
    }

    fn group_id(&self, name: &str) -> Option<u32> {
        nix::unistd::Group::from_name(name)
            .ok()
            .flatten()
            .map(|g| g.gid.as_raw())
    }

    fn groups_of(&self, uid: u32, primary_gid: u32) -> Vec<u32> {
        let mut out = vec![primary_gid];
        let Some(user) = nix::unistd::User::from_uid(uid.into()).ok().flatten() else {
            return out;
        };
        #[cfg(target_os = "linux")]
        if let Ok(name) = std::ffi::CString::new(user.name.clone())
            && let Ok(groups) = nix::unistd::getgrouplist(&name, user.gid)
        {
            out.extend(groups.into_iter().map(|g| g.as_raw()));
        }
        out.push(user.gid.as_raw());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::builtin;

    struct Fake;
    impl Directory for Fake {
        fn user_name(&self, uid: u32) -> Option<String> {
            match uid {
                1000 => Some("alice".into()),
                1001 => Some("bob".into()),
                _ => None,
            }
        }
        fn group_id(&self, name: &str) -> Option<u32> {
            (name == "kvm").then_some(105)
        }
        fn groups_of(&self, uid: u32, gid: u32) -> Vec<u32> {
            if uid == 1001 {
                vec![gid, 105]
            } else {
                vec![gid]
            }
        }
    }

    fn peer(uid: u32) -> Peer {
        Peer {
            pid: 1,
            uid,
            gid: uid,
            groups: None,
        }
    }

    #[test]
    fn the_processs_groups_decide_when_the_kernel_reports_them() {
        let mut c = builtin("shared").unwrap();
        c.allowed_groups = vec![Principal::Name("kvm".into())];
        // alice (1000) is not in kvm in the database, but her process is.
        let mut alice = peer(1000);
        assert!(check(&c, &alice, &Fake).is_err());
        alice.groups = Some(vec![20, 105].into());
        assert!(check(&c, &alice, &Fake).is_ok());
        // bob is in kvm in the database but his process dropped it.
        let mut bob = peer(1001);
        bob.groups = Some(vec![].into());
        assert!(check(&c, &bob, &Fake).is_err());
        // The primary group counts.
        c.allowed_groups = vec![Principal::Id(1001)];
        assert!(check(&c, &bob, &Fake).is_ok());
    }

    #[test]
    fn open_network_allows_everyone() {
        let c = builtin("shared").unwrap();
        assert!(check(&c, &peer(4242), &Fake).is_ok());
    }

    #[test]
    fn users_groups_and_root() {
        let mut c = builtin("shared").unwrap();
        c.allowed_users = vec![Principal::Name("alice".into())];
        assert!(check(&c, &peer(1000), &Fake).is_ok());
        assert!(check(&c, &peer(0), &Fake).is_ok(), "root is always allowed");
        let e = check(&c, &peer(1001), &Fake).unwrap_err().to_string();
        assert!(e.contains("uid 1001 (bob)"), "{e}");
        c.allowed_groups = vec![Principal::Name("kvm".into())];
        assert!(check(&c, &peer(1001), &Fake).is_ok(), "bob is in kvm");
        assert!(check(&c, &peer(2000), &Fake).is_err());
        c.allowed_users = vec![Principal::Id(2000)];
        assert!(check(&c, &peer(2000), &Fake).is_ok());
        c.allowed_groups = vec![Principal::Name("nosuchgroup".into())];
        assert!(check(&c, &peer(1001), &Fake).is_err());
    }
}

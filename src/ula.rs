//! Unique Local IPv6 prefixes (RFC 4193) of the networks whose file fixes no
//! `ipv6_prefix`: one /64 per network name, `fd` + a random 40-bit Global ID + subnet 0,
//! made the first time the network is created and kept in the state directory, so a
//! network keeps its prefix (and its VMs their SLAAC addresses and DNS names) across
//! removals, recreations and broker restarts. Pure file handling, no OS networking.
//!
//! A random Global ID is what RFC 4193 section 3.2 asks for: two hosts (or two brokers)
//! picking prefixes independently almost never collide, which a prefix derived from the
//! network's name alone would (every host's `shared` would get the same one).

use ipnet::Ipv6Net;
use std::io::{Read, Write};
use std::net::Ipv6Addr;
use std::path::{Path, PathBuf};

/// Why a network's prefix could not be read or made.
#[derive(Debug, thiserror::Error)]
pub enum UlaError {
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} holds {text:?}, not an IPv6 /64 prefix; remove it to get a new prefix", path.display())]
    Parse { path: PathBuf, text: String },
    #[error("cannot write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read random bytes for a new prefix")]
    Random(#[source] std::io::Error),
}

/// The file in `state_dir` keeping network `name`'s generated prefix.
pub fn path_for(state_dir: &Path, name: &str) -> PathBuf {
    state_dir.join(format!("{name}.ipv6-prefix"))
}

/// The ULA /64 of Global ID `global_id` (its low 40 bits) and subnet ID 0.
pub fn prefix_of(global_id: u64) -> Ipv6Net {
    let g = global_id.to_be_bytes();
    let mut octets = [0u8; 16];
    octets[0] = 0xfd; // fc00::/7 with the L bit set: locally assigned (RFC 4193 3.1).
    octets[1..6].copy_from_slice(&g[3..8]);
    Ipv6Net::new(Ipv6Addr::from(octets), 64).expect("64 is a valid length")
}

/// A new random ULA /64.
pub fn generate() -> Result<Ipv6Net, UlaError> {
    let mut bytes = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes[3..]))
        .map_err(UlaError::Random)?;
    Ok(prefix_of(u64::from_be_bytes(bytes)))
}

/// A network's prefix as [`load_or_create`] found or made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kept {
    pub prefix: Ipv6Net,
    /// The file of a new prefix: written and renamed into place, so the broker and its
    /// successors read it back, but not yet forced to the disk; [`sync`] does that.
    pub unsynced: Option<PathBuf>,
}

/// Network `name`'s prefix: the one kept in `state_dir`, else a new one, kept there
/// before it is returned (written to a temporary file and renamed, so a crash of the
/// broker never leaves half a prefix). A new file is not synced to the disk here: the
/// caller [`sync`]s it where nobody waits for it (a network's creation would wait 0.5 to
/// 12 ms for the fsync on this machine's disk). A host that loses power before that may
/// come back with the file empty, which counts as none: the network gets a new prefix.
///
/// A new prefix is never one another network's file in `state_dir` keeps: 40 random bits
/// collide once in 10^12 draws, but a collision would give two bridges the same /64, so
/// it is drawn again.
pub fn load_or_create(state_dir: &Path, name: &str) -> Result<Kept, UlaError> {
    load_or_create_with(state_dir, name, generate)
}

/// Forces file `path` of [`Kept::unsynced`], and its directory entry, to the disk.
pub fn sync(path: &Path) -> Result<(), UlaError> {
    let write = |source| UlaError::Write {
        path: path.to_path_buf(),
        source,
    };
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(write)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(write)?;
    }
    Ok(())
}

/// The prefixes other networks' files in `state_dir` keep (unreadable ones count as none:
/// they are made anew when their network is).
fn kept_elsewhere(state_dir: &Path, name: &str) -> Vec<Ipv6Net> {
    let own = path_for(state_dir, name);
    let Ok(entries) = std::fs::read_dir(state_dir) else {
        return vec![];
    };
    entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| *p != own && p.extension().is_some_and(|x| x == "ipv6-prefix"))
        .filter_map(|p| std::fs::read_to_string(p).ok()?.trim().parse().ok())
        .collect()
}

fn load_or_create_with(
    state_dir: &Path,
    name: &str,
    mut generate: impl FnMut() -> Result<Ipv6Net, UlaError>,
) -> Result<Kept, UlaError> {
    let path = path_for(state_dir, name);
    match std::fs::read_to_string(&path) {
        // Empty: written, renamed, then the power went before the disk had it.
        Ok(text) if text.trim().is_empty() => {}
        Ok(text) => {
            return text
                .trim()
                .parse::<Ipv6Net>()
                .ok()
                .filter(|n| n.prefix_len() == 64 && n.trunc() == *n)
                .map(|prefix| Kept {
                    prefix,
                    unsynced: None,
                })
                .ok_or(UlaError::Parse { path, text });
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(UlaError::Read { path, source }),
    }
    let taken = kept_elsewhere(state_dir, name);
    let prefix = loop {
        let p = generate()?;
        if !taken.contains(&p) {
            break p;
        }
    };
    let tmp = path.with_extension("ipv6-prefix.tmp");
    let written = std::fs::File::create(&tmp)
        .and_then(|mut f| writeln!(f, "{prefix}"))
        .and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(source) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(UlaError::Write { path, source });
    }
    Ok(Kept {
        prefix,
        unsynced: Some(path),
    })
}

/// The address SLAAC gives the interface with MAC `mac` in `prefix` (RFC 4291 appendix
/// A: the modified EUI-64 interface identifier, universal/local bit flipped). What the
/// VMs' guests configure unless they use privacy or stable-privacy addresses instead.
pub fn eui64_address(prefix: Ipv6Net, mac: [u8; 6]) -> Ipv6Addr {
    let mut octets = prefix.network().octets();
    octets[8..11].copy_from_slice(&mac[0..3]);
    octets[8] ^= 0x02;
    octets[11] = 0xff;
    octets[12] = 0xfe;
    octets[13..16].copy_from_slice(&mac[3..6]);
    Ipv6Addr::from(octets)
}

/// The gateway's address in `prefix`: `::1`.
pub fn gateway_of(prefix: Ipv6Net) -> Ipv6Addr {
    let mut octets = prefix.network().octets();
    octets[15] = 1;
    Ipv6Addr::from(octets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ula_prefixes_are_fd_slash_64_with_the_global_id() {
        let p = prefix_of(0x12_3456_789a);
        assert_eq!(p.to_string(), "fd12:3456:789a::/64");
        // Only 40 bits of the ID count.
        assert_eq!(prefix_of(0xffff_ff12_3456_789a), p);
        let g = generate().unwrap();
        assert_eq!(g.prefix_len(), 64);
        assert_eq!(g.network().octets()[0], 0xfd);
        assert_eq!(g.network().octets()[6..], [0; 10]);
    }

    #[test]
    fn a_network_keeps_its_prefix_and_networks_differ() {
        let dir = tempfile::tempdir().unwrap();
        let made = load_or_create(dir.path(), "a").unwrap();
        let a = made.prefix;
        assert_eq!(a.network().octets()[0], 0xfd);
        assert_eq!(made.unsynced, Some(path_for(dir.path(), "a")));
        sync(&path_for(dir.path(), "a")).unwrap();
        // As after a removal and a restart: read back, not made anew (nothing to sync).
        assert_eq!(
            load_or_create(dir.path(), "a").unwrap(),
            Kept {
                prefix: a,
                unsynced: None
            }
        );
        assert_eq!(
            std::fs::read_to_string(path_for(dir.path(), "a")).unwrap(),
            format!("{a}\n")
        );
        let b = load_or_create(dir.path(), "b").unwrap().prefix;
        assert_ne!(a, b, "40 random bits collide once in 10^12");
        // An empty file (power lost before the disk had it) counts as none.
        std::fs::write(path_for(dir.path(), "b"), "").unwrap();
        let again = load_or_create(dir.path(), "b").unwrap();
        assert!(again.unsynced.is_some(), "made anew");
        assert_eq!(
            std::fs::read_to_string(path_for(dir.path(), "b")).unwrap(),
            format!("{}\n", again.prefix)
        );
        // A damaged file is an error naming it, never silently replaced.
        std::fs::write(path_for(dir.path(), "c"), "fd00::1/48").unwrap();
        let e = load_or_create(dir.path(), "c").unwrap_err();
        assert!(e.to_string().contains("c.ipv6-prefix"), "{e}");
    }

    #[test]
    fn slaac_addresses_follow_the_mac() {
        let p: Ipv6Net = "fd00:1:2:3::/64".parse().unwrap();
        assert_eq!(
            eui64_address(p, [0x52, 0x54, 0x00, 0x12, 0x34, 0x56]),
            "fd00:1:2:3:5054:ff:fe12:3456".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(gateway_of(p), "fd00:1:2:3::1".parse::<Ipv6Addr>().unwrap());
    }

    #[test]
    fn a_new_prefix_is_never_one_another_network_keeps() {
        let dir = tempfile::tempdir().unwrap();
        let (first, second) = (prefix_of(1), prefix_of(2));
        // A generator that draws `first` until asked three times, as a collision would.
        let draws = std::cell::Cell::new(0);
        let rigged = || {
            draws.set(draws.get() + 1);
            Ok(if draws.get() < 3 { first } else { second })
        };
        assert_eq!(
            load_or_create_with(dir.path(), "a", &rigged)
                .unwrap()
                .prefix,
            first
        );
        draws.set(0);
        let b = load_or_create_with(dir.path(), "b", &rigged)
            .unwrap()
            .prefix;
        assert_eq!(b, second, "b must not get a's prefix");
        assert_eq!(draws.get(), 3, "drawn again after each collision");
        // A network's own file is no collision: it keeps its prefix.
        assert_eq!(
            load_or_create_with(dir.path(), "a", || Ok(second))
                .unwrap()
                .prefix,
            first
        );
    }
}

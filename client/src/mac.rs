//! Ethernet MAC addresses: the one parser and formatter of the project.
//!
//! A MAC travels as text on the wire (`"52:54:00:ab:cd:01"`), in config files and in the
//! lease file, and as six bytes in frames and netlink messages; this type converts
//! between the two so every place writes them the same way (lowercase, colons).

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

/// An Ethernet MAC address.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Mac([u8; 6]);

impl Mac {
    pub const fn new(octets: [u8; 6]) -> Self {
        Mac(octets)
    }

    pub const fn octets(self) -> [u8; 6] {
        self.0
    }

    /// Group (multicast or broadcast) addresses have the low bit of the first octet set.
    pub const fn is_multicast(self) -> bool {
        self.0[0] & 0x01 != 0
    }

    /// An address one interface may use as its own: not a group address, not all zeros.
    pub fn is_unicast(self) -> bool {
        !self.is_multicast() && self.0 != [0; 6]
    }
}

impl From<[u8; 6]> for Mac {
    fn from(octets: [u8; 6]) -> Self {
        Mac(octets)
    }
}

impl From<Mac> for [u8; 6] {
    fn from(mac: Mac) -> Self {
        mac.0
    }
}

/// Lowercase, colon-separated: `52:54:00:ab:cd:01`.
impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Mac({self})")
    }
}

/// Text that is not six pairs of hex digits separated by `:` or `-`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{input:?} is not a MAC address")]
pub struct MacParseError {
    /// The rejected text, cut to a length fit for a log line.
    pub input: String,
}

/// Accepts `52:54:00:AB:cd:01` and `52-54-00-ab-cd-01`, in any case.
impl FromStr for Mac {
    type Err = MacParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || MacParseError {
            input: s.chars().take(64).collect(),
        };
        let mut mac = [0u8; 6];
        let mut parts = s.split([':', '-']);
        for octet in &mut mac {
            let part = parts.next().ok_or_else(bad)?;
            // from_str_radix alone would also take a sign ("+1").
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad());
            }
            *octet = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Mac(mac))
    }
}

impl Serialize for Mac {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Mac {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_separators_and_any_case() {
        let want = Mac::new([0x52, 0x54, 0, 0xab, 0xcd, 0x01]);
        assert_eq!("52:54:00:AB:cd:01".parse::<Mac>().unwrap(), want);
        assert_eq!("52-54-00-ab-CD-01".parse::<Mac>().unwrap(), want);
    }

    #[test]
    fn rejects_what_is_not_six_hex_pairs() {
        for bad in [
            "",
            "52:54",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:01:02",
            "52:54:00:ab:cd:1",
            "52:54:00:ab:cd:001",
            "52:54:00:ab:cd:zz",
            "52:54:00:ab:cd:+1",
            "52:54:00:ab:cd:01:",
            "525400abcd01",
            "52.54.00.ab.cd.01",
        ] {
            let err = bad.parse::<Mac>().unwrap_err();
            assert_eq!(err.input, bad);
            assert_eq!(err.to_string(), format!("{bad:?} is not a MAC address"));
        }
        let long = "x".repeat(1000);
        assert_eq!(long.parse::<Mac>().unwrap_err().input.len(), 64);
    }

    #[test]
    fn formats_lowercase_with_colons() {
        let mac = Mac::from([2, 0, 0xab, 0, 0, 0xff]);
        assert_eq!(mac.to_string(), "02:00:ab:00:00:ff");
        assert_eq!(format!("{mac:?}"), "Mac(02:00:ab:00:00:ff)");
        assert_eq!(<[u8; 6]>::from(mac), [2, 0, 0xab, 0, 0, 0xff]);
        assert_eq!(mac.to_string().parse::<Mac>().unwrap(), mac);
    }

    #[test]
    fn unicast_and_multicast() {
        assert!(Mac::new([0x52, 0x54, 0, 0, 0, 1]).is_unicast());
        assert!(Mac::new([0x01, 0, 0x5e, 0, 0, 1]).is_multicast());
        assert!(!Mac::new([0x01, 0, 0x5e, 0, 0, 1]).is_unicast());
        assert!(!Mac::new([0xff; 6]).is_unicast());
        assert!(!Mac::default().is_unicast());
        assert!(!Mac::default().is_multicast());
    }

    #[test]
    fn serde_as_a_string() {
        let mac = Mac::new([0x52, 0x54, 0, 0xab, 0xcd, 0x01]);
        assert_eq!(
            serde_json::to_string(&mac).unwrap(),
            r#""52:54:00:ab:cd:01""#
        );
        assert_eq!(
            serde_json::from_str::<Mac>(r#""52-54-00-AB-CD-01""#).unwrap(),
            mac
        );
        let err = serde_json::from_str::<Mac>(r#""52:54""#).unwrap_err();
        assert!(err.to_string().contains("is not a MAC address"), "{err}");
        assert!(serde_json::from_str::<Mac>("5").is_err());
    }
}

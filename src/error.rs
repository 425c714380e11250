//! Showing errors with their causes. Every layer has its own error type whose message
//! says what failed at that layer and whose `source()` is the cause below; these helpers
//! print the whole chain on one line, for the log and for a client's error reply.

use std::error::Error;
use std::fmt;

/// `error: cause: cause of the cause`, skipping a cause whose text its parent already
/// ends with (a wrapper that repeats its source).
pub struct Chain<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut shown = self.0.to_string();
        f.write_str(&shown)?;
        let mut next = self.0.source();
        while let Some(cause) = next {
            let text = cause.to_string();
            if !text.is_empty() && !shown.ends_with(&text) {
                write!(f, ": {text}")?;
            }
            shown = text;
            next = cause.source();
        }
        Ok(())
    }
}

/// The whole chain of `e` on one line.
pub fn chain(e: &(dyn Error + 'static)) -> String {
    Chain(e).to_string()
}

/// Several errors, each with its chain, separated by `; `.
pub fn join<E: Error + 'static>(errors: &[E]) -> String {
    errors
        .iter()
        .map(|e| chain(e))
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot create network \"lab\"")]
    struct Top(#[source] Middle);

    #[derive(Debug, thiserror::Error)]
    #[error("firewall")]
    struct Middle(#[source] std::io::Error);

    #[test]
    fn the_whole_chain_on_one_line() {
        let e = Top(Middle(std::io::Error::other("nft timed out")));
        assert_eq!(
            chain(&e),
            "cannot create network \"lab\": firewall: nft timed out"
        );
    }

    #[test]
    fn a_transparent_wrapper_is_not_repeated() {
        let e = crate::backend::BackendError::from(std::io::Error::other("no such device"));
        assert_eq!(chain(&e), "no such device");
        let all = crate::backend::BackendError::Incomplete(vec![
            crate::backend::BackendError::Conflict("a".into()),
            crate::backend::BackendError::component("DHCP", std::io::Error::other("b")),
        ]);
        assert_eq!(chain(&all), "2 step(s) failed: a; DHCP: b");
    }
}

//! Applies transactions through netlink (`netlink.rs`) when they can be expressed there,
//! and otherwise runs the `nft` executable: one child process per transaction or listing,
//! each with a deadline. Transactions are JSON built from typed objects, except the few objects only
//! nft's text syntax can declare ([`Nft::apply_text`]). A child that misses it is killed with its whole process group, and the
//! caller gets [`FirewallError::NftTimeout`] naming the operation.
//!
//! The child acts in the network namespace of the thread that spawns it.

use std::ffi::OsString;
use std::process::Stdio;
use std::time::Duration;

use nftables::batch::Batch;
use nftables::schema::Nftables;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use tracing::debug;

use super::FirewallError;

/// How long one `nft` run may take before it is killed. A transaction on the broker's
/// tables takes milliseconds; seconds mean something is wrong (a hung netlink socket, a
/// stopped process), and waiting longer would only stall everything queued behind it.
pub const NFT_TIMEOUT: Duration = Duration::from_secs(10);

/// The `nft` program and its deadline.
#[derive(Debug, Clone)]
pub(super) struct Nft {
    program: OsString,
    timeout: Duration,
    /// Transactions go through netlink ([`super::netlink`]) when they can be expressed
    /// there; `nft` only for the rest. Off for an explicitly chosen `nft` program (tests
    /// that inject failures through it), so that every transaction still meets it.
    netlink: bool,
    /// The netlink socket those transactions share ([`super::netlink::SocketCache`]).
    socket: super::netlink::SocketCache,
}

impl Nft {
    pub(super) fn new(program: OsString, timeout: Duration, netlink: bool) -> Nft {
        Nft {
            program,
            timeout,
            netlink,
            socket: Default::default(),
        }
    }

    /// Whether transactions and listings go through netlink where they can.
    pub(super) fn netlink(&self) -> bool {
        self.netlink
    }

    pub(super) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The netlink socket transactions and listings share.
    pub(super) fn socket(&self) -> &super::netlink::SocketCache {
        &self.socket
    }

    /// Applies `batch` as one transaction (`nft -j -f -`). An empty batch runs nothing.
    pub(super) async fn apply(&self, batch: Batch<'_>, context: &str) -> Result<(), FirewallError> {
        let doc = batch.to_nftables();
        if doc.objects.is_empty() {
            return Ok(());
        }
        if self.netlink {
            match super::netlink::compile(&doc) {
                // Sent from this thread, so in its network namespace, like a child would
                // be; the kernel answers within the send (see `netlink::apply`).
                Ok(compiled) => {
                    return super::netlink::apply(compiled, context, self.timeout, &self.socket);
                }
                // Only what `allow_spoofing` networks add (their dispatch map); see
                // docs/design.md.
                Err(why) => debug!("{context}: through nft, as {}", crate::error::Chain(&why)),
            }
        }
        // Serializing the crate's own schema types cannot fail (no maps with non-string
        // keys, no custom serializers that error).
        let mut value = serde_json::to_value(&doc).expect("nftables documents serialize");
        fix_notrack(&mut value);
        let input = serde_json::to_vec(&value).expect("JSON values serialize");
        self.run(&["-j", "-f", "-"], Some(input), context)
            .await
            .map(drop)
    }

    /// Applies `script`, in nft's own text syntax, as one transaction (`nft -f -`).
    ///
    /// Only for what nft's JSON input cannot say: a set declared with `typeof` a raw
    /// payload (nft 1.0.6, see [`super::rules::dhcp_quota_script`]). Everything else goes
    /// through [`Nft::apply`], whose input is built from typed objects; a script is built
    /// only from validated names (no quoting or escaping needed), never from client text.
    pub(super) async fn apply_text(
        &self,
        script: String,
        context: &str,
    ) -> Result<(), FirewallError> {
        self.run(&["-f", "-"], Some(script.into_bytes()), context)
            .await
            .map(drop)
    }

    /// `nft -j <args>`, parsed.
    pub(super) async fn list(
        &self,
        args: &[&str],
        context: &str,
    ) -> Result<Nftables<'static>, FirewallError> {
        let raw = self.list_raw(args, context).await?;
        serde_json::from_str(&raw).map_err(|source| FirewallError::NftOutput {
            context: context.into(),
            source,
        })
    }

    /// `nft -j <args>`, as text.
    pub(super) async fn list_raw(
        &self,
        args: &[&str],
        context: &str,
    ) -> Result<String, FirewallError> {
        let mut all = vec!["-j"];
        all.extend_from_slice(args);
        self.run(&all, None, context).await
    }

    async fn run(
        &self,
        args: &[&str],
        input: Option<Vec<u8>>,
        context: &str,
    ) -> Result<String, FirewallError> {
        let mut cmd = Command::new(&self.program);
        cmd.args(args)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, so a timeout kills whatever it started too; and
            // killed if this future is dropped, so no caller leaves a child running.
            .process_group(0)
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                FirewallError::NftNotFound
            } else {
                FirewallError::NftSpawn {
                    context: context.into(),
                    source,
                }
            }
        })?;
        let pid = child.id();
        let stdin = child.stdin.take();
        let work = async move {
            if let (Some(mut pipe), Some(input)) = (stdin, input) {
                // An nft that exits without reading everything (a usage error) closes the
                // pipe: its exit status and stderr below say more than EPIPE.
                if let Err(e) = pipe.write_all(&input).await
                    && e.kind() != std::io::ErrorKind::BrokenPipe
                {
                    return Err(e);
                }
                // Dropped: nft sees the end of its input.
            }
            child.wait_with_output().await
        };
        // Pinned here rather than moved into the timeout, so the child is still ours (alive
        // or a zombie, not reaped) when its group is killed below.
        let mut work = std::pin::pin!(work);
        let output = match tokio::time::timeout(self.timeout, work.as_mut()).await {
            Ok(Ok(output)) => output,
            Ok(Err(source)) => {
                return Err(FirewallError::NftSpawn {
                    context: context.into(),
                    source,
                });
            }
            Err(_elapsed) => {
                // The whole group: the child and whatever it started. The child is not
                // reaped yet (`work` owns it until this function returns, and then kills
                // it again on drop), so the group id cannot belong to anyone else.
                if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
                    let _ = nix::sys::signal::killpg(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                return Err(FirewallError::NftTimeout {
                    context: context.into(),
                    after: self.timeout,
                });
            }
        };
        if !output.status.success() {
            return Err(FirewallError::Nft {
                context: context.into(),
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }
}

/// The crate (0.6) writes the `notrack` statement as the bare string `"notrack"`, which
/// nft (1.0.6) refuses ("Unexpected expr array element of type string"); nft's JSON is
/// `{"notrack": null}`. Rewrites such statements of every rule (`expr` arrays only: a
/// string "notrack" elsewhere, say an interface name in a set, stays as it is).
pub(super) fn fix_notrack(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Array(items) => items.iter_mut().for_each(fix_notrack),
        serde_json::Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                if let (true, Some(stmts)) = (key == "expr", v.as_array_mut()) {
                    for stmt in stmts.iter_mut().filter(|s| s.as_str() == Some("notrack")) {
                        *stmt = serde_json::json!({ "notrack": null });
                    }
                }
                fix_notrack(v);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::fix_notrack;

    #[test]
    fn notrack_statements_become_objects_and_other_strings_stay() {
        let mut v = serde_json::json!({"nftables": [{"add": {"rule": {"expr": [
            {"match": {"left": {"meta": {"key": "iifname"}}, "op": "==",
                       "right": {"set": ["notrack", "eth0"]}}},
            "notrack"
        ]}}}]});
        fix_notrack(&mut v);
        let expr = &v["nftables"][0]["add"]["rule"]["expr"];
        assert_eq!(expr[1], serde_json::json!({ "notrack": null }));
        assert_eq!(
            expr[0]["match"]["right"]["set"],
            serde_json::json!(["notrack", "eth0"])
        );
    }
}

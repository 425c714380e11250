//! Docker's `FORWARD` policy drop, the one place where the broker edits rules outside its
//! own tables.
//!
//! Docker sets the policy of `ip filter FORWARD` to drop, and an accept in our table cannot
//! override a drop in another table. When that policy is found and Docker's `DOCKER-USER`
//! chain exists, accept rules for a NAT network's bridge are inserted there, tagged
//! `vmnet-broker:<network>` ([`DOCKER_COMMENT_PREFIX`]) and removed with the network;
//! otherwise a warning explains the fix.

use nftables::batch::Batch;
use nftables::expr::MetaKey;
use nftables::schema::{NfCmd, NfListObject, NfObject, Rule};
use nftables::stmt::Operator;
use nftables::types::{NfChainPolicy, NfFamily, NfHook};
use tracing::{debug, info, warn};

use super::rules::{accept, ct_established, matches, meta, s};
use super::{DOCKER_COMMENT_PREFIX, FirewallError, FirewallNetwork, Inner};

impl Inner {
    /// Handles Docker's `FORWARD` policy drop for a NAT network (see the module doc).
    /// Failures here only cost outside access, so they are logged, not returned.
    pub(super) async fn docker_sync(&self, net: &FirewallNetwork) {
        let (drop_policy, docker_user) = match self.docker_forward_status().await {
            Ok(s) => s,
            Err(e) => {
                warn!(network = %net.name, "could not check for a FORWARD drop policy (Docker): {}",
                      crate::error::Chain(&e));
                return;
            }
        };
        if !drop_policy {
            return;
        }
        if !docker_user {
            warn!(
                network = %net.name, bridge = %net.bridge,
                "table ip filter has a FORWARD chain with policy drop (Docker?) but no DOCKER-USER \
                 chain: VMs on shared network {:?} will have no outside access. Fix: allow the \
                 bridge, e.g. `iptables -I FORWARD -i {br} -j ACCEPT; iptables -I FORWARD -o {br} \
                 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT`, or start Docker (it creates \
                 DOCKER-USER) before the broker.",
                net.name, br = net.bridge
            );
            return;
        }
        let mut batch = Batch::new();
        let comment = format!("{DOCKER_COMMENT_PREFIX}{}", net.name);
        for expr in [
            vec![
                matches(meta(MetaKey::Iifname), Operator::EQ, s(&net.bridge)),
                accept(),
            ],
            vec![
                matches(meta(MetaKey::Oifname), Operator::EQ, s(&net.bridge)),
                ct_established(),
                accept(),
            ],
        ] {
            batch.add_cmd(NfCmd::Insert(NfListObject::Rule(Rule {
                family: NfFamily::IP,
                table: "filter".into(),
                chain: "DOCKER-USER".into(),
                expr: expr.into(),
                comment: Some(comment.clone().into()),
                ..Rule::default()
            })));
        }
        match self
            .nft
            .apply(batch, "inserting accept rules into ip filter DOCKER-USER")
            .await
        {
            Ok(()) => info!(
                network = %net.name, bridge = %net.bridge,
                "FORWARD policy is drop (Docker): accept rules for the bridge inserted into DOCKER-USER"
            ),
            Err(e) => {
                warn!(network = %net.name, "{}: VMs will have no outside access", crate::error::Chain(&e))
            }
        }
    }

    /// (FORWARD chain of `ip filter` has policy drop, `DOCKER-USER` chain exists there).
    async fn docker_forward_status(&self) -> Result<(bool, bool), FirewallError> {
        if self.nft.netlink() {
            // One netlink dump rather than an `nft` process: this runs with every NAT
            // network's creation and removal, on the path of a cold acquire.
            let chains = super::netlink::ipv4_chains(
                "listing the chains of family ip",
                self.nft.timeout(),
                self.nft.socket(),
            )?;
            let filter = || chains.iter().filter(|c| c.table == "filter");
            return Ok((
                filter().any(|c| c.name == "FORWARD" && super::netlink::is_forward_drop(c)),
                filter().any(|c| c.name == "DOCKER-USER"),
            ));
        }
        let doc = self
            .nft
            .list(&["list", "chains", "ip"], "listing the chains of family ip")
            .await?;
        let mut drop_policy = false;
        let mut docker_user = false;
        for obj in doc.objects.iter() {
            if let NfObject::ListObject(NfListObject::Chain(c)) = obj {
                if c.table != "filter" {
                    continue;
                }
                if c.name == "FORWARD"
                    && c.hook == Some(NfHook::Forward)
                    && c.policy == Some(NfChainPolicy::Drop)
                {
                    drop_policy = true;
                }
                if c.name == "DOCKER-USER" {
                    docker_user = true;
                }
            }
        }
        Ok((drop_policy, docker_user))
    }

    /// Deletes the rules tagged for `network` from `ip filter DOCKER-USER`, if any.
    pub(super) async fn docker_remove(&self, network: &str) -> Result<(), FirewallError> {
        // Without Docker there is nothing to look for: found out by a netlink dump rather
        // than by running `nft` with every removal of a NAT network.
        if self.nft.netlink() && !self.docker_forward_status().await?.1 {
            return Ok(());
        }
        let context = "listing ip filter DOCKER-USER";
        let raw = match self
            .nft
            .list_raw(
                &["-a", "list", "chain", "ip", "filter", "DOCKER-USER"],
                context,
            )
            .await
        {
            Ok(raw) => raw,
            // No such table or chain: nothing of ours can be there.
            Err(FirewallError::Nft { .. }) => return Ok(()),
            Err(e) => return Err(e),
        };
        // Parsed as plain JSON rather than with the crate's types: Docker's rules are written
        // by iptables-nft and may hold statements (xt matches) the crate cannot deserialize.
        let value: serde_json::Value =
            serde_json::from_str(&raw).map_err(|source| FirewallError::NftOutput {
                context: context.into(),
                source,
            })?;
        let tag = format!("{DOCKER_COMMENT_PREFIX}{network}");
        let mut batch = Batch::new();
        let mut n = 0;
        for obj in value["nftables"].as_array().into_iter().flatten() {
            let rule = &obj["rule"];
            if rule["comment"].as_str() == Some(tag.as_str())
                && let Some(handle) = rule["handle"].as_u64().and_then(|h| u32::try_from(h).ok())
            {
                batch.delete(NfListObject::Rule(Rule {
                    family: NfFamily::IP,
                    table: "filter".into(),
                    chain: "DOCKER-USER".into(),
                    handle: Some(handle),
                    ..Rule::default()
                }));
                n += 1;
            }
        }
        if n > 0 {
            self.nft
                .apply(batch, "deleting our rules from ip filter DOCKER-USER")
                .await?;
            debug!(network, rules = n, "removed our rules from DOCKER-USER");
        }
        Ok(())
    }
}

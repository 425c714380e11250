//! Slots for forwarded queries: a bound on the whole server and a smaller one per client.
//!
//! A forwarded query holds its slot until an upstream answers or every try times out (up
//! to 15 s with resolv.conf's largest options). With only the server-wide bound, one VM
//! asking for names a slow upstream never answers holds every slot and every other VM's
//! forwarded queries are dropped; the per-client bound leaves the rest to the others.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Why no slot was given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// This client already holds its share.
    ClientFull,
    /// Every slot of the server is taken (only from `try_acquire`).
    ServerFull,
    /// The server is stopping (only from `acquire`).
    Closed,
}

/// Slots of one server. Entries of the per-client table exist only while a client holds
/// a slot, so the table never has more than `total` entries.
pub struct Slots {
    per_client: usize,
    server: Arc<Semaphore>,
    clients: Mutex<HashMap<IpAddr, usize>>,
}

/// One forwarded query's slot, given back on drop.
pub struct Slot {
    _share: ClientShare,
    _server: OwnedSemaphorePermit,
}

/// A client's share, counted before the server-wide permit is taken and released on drop.
struct ClientShare {
    slots: Arc<Slots>,
    client: IpAddr,
}

impl Slots {
    pub fn new(total: usize, per_client: usize) -> Arc<Slots> {
        Arc::new(Slots {
            per_client,
            server: Arc::new(Semaphore::new(total)),
            clients: Mutex::new(HashMap::new()),
        })
    }

    /// A slot now, or why not (UDP: the caller drops the query).
    pub fn try_acquire(self: &Arc<Self>, client: IpAddr) -> Result<Slot, Refused> {
        let share = self.share(client)?;
        let permit = self
            .server
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refused::ServerFull)?;
        Ok(share.into_slot(permit))
    }

    /// A slot once the server has one free; refused at once when the client holds its
    /// share (TCP: the caller answers SERVFAIL rather than let one client queue up).
    pub async fn acquire(self: &Arc<Self>, client: IpAddr) -> Result<Slot, Refused> {
        let share = self.share(client)?;
        let permit = self
            .server
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Refused::Closed)?;
        Ok(share.into_slot(permit))
    }

    /// Slots `client` holds now.
    #[cfg(test)]
    pub fn held_by(&self, client: IpAddr) -> usize {
        self.table().get(&client).copied().unwrap_or(0)
    }

    fn share(self: &Arc<Self>, client: IpAddr) -> Result<ClientShare, Refused> {
        let mut table = self.table();
        let held = table.entry(client).or_insert(0);
        if *held >= self.per_client {
            return Err(Refused::ClientFull);
        }
        *held += 1;
        Ok(ClientShare {
            slots: self.clone(),
            client,
        })
    }

    fn release(&self, client: IpAddr) {
        let mut table = self.table();
        if let Some(held) = table.get_mut(&client) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                table.remove(&client);
            }
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        // The table stays consistent even if a holder panicked: each update is one step.
        self.clients.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl ClientShare {
    fn into_slot(self, permit: OwnedSemaphorePermit) -> Slot {
        Slot {
            _share: self,
            _server: permit,
        }
    }
}

impl Drop for ClientShare {
    fn drop(&mut self) {
        self.slots.release(self.client);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn one_client_gets_its_share_and_the_others_the_rest() {
        let slots = Slots::new(4, 2);
        let a1 = slots.try_acquire(ip(1)).unwrap();
        let _a2 = slots.try_acquire(ip(1)).unwrap();
        assert_eq!(slots.try_acquire(ip(1)).err(), Some(Refused::ClientFull));
        assert_eq!(slots.held_by(ip(1)), 2);
        let _b1 = slots.try_acquire(ip(2)).unwrap();
        let _c1 = slots.try_acquire(ip(3)).unwrap();
        assert_eq!(slots.try_acquire(ip(4)).err(), Some(Refused::ServerFull));
        // A refusal by the server leaves no share counted.
        assert_eq!(slots.held_by(ip(4)), 0);
        drop(a1);
        assert_eq!(slots.held_by(ip(1)), 1);
        let _d1 = slots.try_acquire(ip(4)).unwrap();
        assert_eq!(slots.held_by(ip(4)), 1);
    }

    #[test]
    fn entries_go_when_the_last_slot_does() {
        let slots = Slots::new(8, 8);
        let held: Vec<Slot> = (1..=5).map(|i| slots.try_acquire(ip(i)).unwrap()).collect();
        assert_eq!(slots.table().len(), 5);
        drop(held);
        assert!(slots.table().is_empty());
        assert_eq!(slots.server.available_permits(), 8);
    }

    #[tokio::test]
    async fn acquire_waits_for_the_server_but_not_past_the_share() {
        let slots = Slots::new(1, 1);
        let a = slots.acquire(ip(1)).await.unwrap();
        assert_eq!(slots.acquire(ip(1)).await.err(), Some(Refused::ClientFull));
        let waiter = {
            let slots = slots.clone();
            tokio::spawn(async move { slots.acquire(ip(2)).await.map(|_| ()) })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(a);
        assert_eq!(waiter.await.unwrap(), Ok(()));
    }
}

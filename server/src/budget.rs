//! What admitted edits may cost together: an edit costs steps x the pixels the model runs at
//! (pixel-steps, roughly proportional to its compute). A reservation is taken before the image
//! is decoded and held until the edit's job is dropped (done, failed, cancelled or expired), so
//! the sum bounds the work the server has promised. One client may hold only a share of it.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use crate::config::CostLimits;

/// Who an edit is charged to: the configured key it sent (keys a client cannot invent), else
/// the address it connects from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Client {
    /// Which configured key (`api-key`, `openai-api-key`); never the key itself.
    Key(&'static str),
    Peer(IpAddr),
    /// The connection's address is not known (in-process callers).
    Unknown,
}

impl fmt::Display for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Key(which) => write!(f, "the {which} client"),
            Self::Peer(ip) => write!(f, "client {ip}"),
            Self::Unknown => write!(f, "this client"),
        }
    }
}

/// Why an edit was not admitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the edit costs {cost} pixel-steps (steps x working pixels); the limit is {limit} (--max-edit-cost)")]
    TooCostly { cost: u64, limit: u64 },
    #[error("{client} already has {held} pixel-steps of edits admitted; with this one ({cost}) it would pass its share, {limit} (--max-client-share of --max-queued-cost); retry when some finish")]
    ClientShare {
        client: String,
        held: u64,
        cost: u64,
        limit: u64,
    },
    #[error("the server has {held} pixel-steps of edits admitted; with this one ({cost}) it would pass {limit} (--max-queued-cost); retry later")]
    Full { held: u64, cost: u64, limit: u64 },
}

pub struct CostBudget {
    limits: CostLimits,
    state: Mutex<Held>,
}

#[derive(Default)]
struct Held {
    total: u64,
    by_client: HashMap<Client, u64>,
}

impl CostBudget {
    pub fn new(limits: CostLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            state: Mutex::new(Held::default()),
        })
    }

    pub fn limits(&self) -> CostLimits {
        self.limits
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits `cost` for `client`, or says which bound it would pass.
    pub fn reserve(self: &Arc<Self>, client: Client, cost: u64) -> Result<Reservation, Refusal> {
        let limits = self.limits;
        if cost > limits.max_edit_cost {
            return Err(Refusal::TooCostly {
                cost,
                limit: limits.max_edit_cost,
            });
        }
        let mut held = self.lock();
        let client_held = held.by_client.get(&client).copied().unwrap_or(0);
        if client_held.saturating_add(cost) > limits.max_client_cost {
            return Err(Refusal::ClientShare {
                client: client.to_string(),
                held: client_held,
                cost,
                limit: limits.max_client_cost,
            });
        }
        if held.total.saturating_add(cost) > limits.max_queued_cost {
            return Err(Refusal::Full {
                held: held.total,
                cost,
                limit: limits.max_queued_cost,
            });
        }
        held.total += cost;
        *held.by_client.entry(client.clone()).or_default() += cost;
        Ok(Reservation {
            budget: self.clone(),
            client,
            cost,
        })
    }

    /// Pixel-steps admitted and not yet released.
    pub fn held(&self) -> u64 {
        self.lock().total
    }

    fn release(&self, client: &Client, cost: u64) {
        let mut held = self.lock();
        held.total = held.total.saturating_sub(cost);
        if let Some(mine) = held.by_client.get_mut(client) {
            *mine = mine.saturating_sub(cost);
            if *mine == 0 {
                held.by_client.remove(client);
            }
        }
    }
}

/// An admitted edit's share of the budget, given back when dropped.
pub struct Reservation {
    budget: Arc<CostBudget>,
    client: Client,
    cost: u64,
}

impl Reservation {
    pub fn cost(&self) -> u64 {
        self.cost
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.release(&self.client, self.cost);
    }
}

impl fmt::Debug for Reservation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Reservation({} for {})", self.cost, self.client)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget() -> Arc<CostBudget> {
        CostBudget::new(CostLimits {
            max_edit_cost: 100,
            max_queued_cost: 300,
            max_client_cost: 150,
        })
    }

    fn peer(last: u8) -> Client {
        Client::Peer(IpAddr::from([10, 0, 0, last]))
    }

    #[test]
    fn one_edit_over_the_limit_is_refused_outright() {
        let b = budget();
        assert!(matches!(
            b.reserve(peer(1), 101),
            Err(Refusal::TooCostly { .. })
        ));
        assert_eq!(b.held(), 0);
    }

    #[test]
    fn a_client_holds_at_most_its_share_and_all_at_most_the_budget() {
        let b = budget();
        let first = b.reserve(peer(1), 100).unwrap();
        assert!(matches!(
            b.reserve(peer(1), 60),
            Err(Refusal::ClientShare { held: 100, .. })
        ));
        let _second = b.reserve(peer(2), 100).unwrap();
        let _third = b.reserve(Client::Key("api-key"), 100).unwrap();
        assert!(matches!(
            b.reserve(peer(4), 10),
            Err(Refusal::Full { held: 300, .. })
        ));
        drop(first);
        assert_eq!(b.held(), 200);
        let _again = b.reserve(peer(1), 100).unwrap();
        assert_eq!(b.held(), 300);
    }
}

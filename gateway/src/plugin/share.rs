//! Fair shares of the plugin slots. Every invocation runs for a tenant
//! (a webhook, or the playground); no tenant holds more than half of the
//! slots at once, so another always finds room; a tenant none of whose
//! invocations has ended yet runs one at a time; and a tenant whose plugin
//! just ran into a limit (its deadline, memory or stack) runs one
//! invocation at a time, each after a cool-down of nine times as long as
//! the last one took (at most a second), until one ends within them: a
//! plugin that keeps hitting its limits gets a tenth of a slot, not more,
//! however its invocations arrive.
//! Across attempts, the lane of a webhook that keeps failing is paced as
//! well (see `domain::lane`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// How much longer than its last invocation a tenant that ran into a
/// limit waits before the next, and the longest it waits.
const COOL_DOWN_FACTOR: u32 = 9;
const LONGEST_COOL_DOWN: Duration = Duration::from_secs(1);

/// The plugin slots of one host: `total` in all, `cap` for any tenant.
pub struct Shares {
    slots: Arc<Semaphore>,
    cap: u32,
    tenants: Mutex<HashMap<String, Arc<Tenant>>>,
}

/// One tenant's own slots, while it has invocations running or waiting.
struct Tenant {
    slots: Arc<Semaphore>,
    standing: Mutex<Standing>,
}

/// How a tenant's last invocation went.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Standing {
    /// None has ended yet: one at a time, so a plugin nobody has seen end
    /// does not start on several slots at once.
    New,
    /// Within its limits: up to its share at once.
    Good,
    /// It ran into a limit: one at a time, none before the cool-down ends.
    Penalised { cooled_down_at: Instant },
}

impl Tenant {
    fn standing(&self) -> std::sync::MutexGuard<'_, Standing> {
        self.standing.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A slot held for one invocation; dropping it gives the slot back.
pub struct Slot<'a> {
    shares: &'a Shares,
    key: String,
    tenant: Arc<Tenant>,
    _own: OwnedSemaphorePermit,
    _global: OwnedSemaphorePermit,
}

impl Shares {
    pub fn new(total: usize) -> Self {
        let total = total.max(1);
        Self {
            slots: Arc::new(Semaphore::new(total)),
            cap: u32::try_from((total / 2).max(1)).unwrap_or(u32::MAX),
            tenants: Mutex::new(HashMap::new()),
        }
    }

    /// Waits for a slot within `key`'s share.
    pub async fn acquire(&self, key: &str) -> Result<Slot<'_>, AcquireError> {
        let tenant = self.tenant(key);
        let standing = *tenant.standing();
        // Alone, it takes all of its share: nothing else of this tenant
        // runs beside it.
        let wanted = if standing == Standing::Good {
            1
        } else {
            self.cap
        };
        let mut own = tenant.slots.clone().acquire_many_owned(wanted).await?;
        // The standing may have changed while it waited.
        let standing = *tenant.standing();
        match standing {
            Standing::Good if wanted > 1 => {
                // Keep one; the rest go back to the tenant's others.
                drop(own.split(own.num_permits() - 1));
            }
            Standing::Penalised { cooled_down_at } => {
                tokio::time::sleep_until(cooled_down_at).await;
            }
            _ => {}
        }
        let global = self.slots.clone().acquire_owned().await?;
        Ok(Slot {
            shares: self,
            key: key.to_owned(),
            tenant,
            _own: own,
            _global: global,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Tenant>>> {
        // The map stays consistent whatever panicked while holding it.
        self.tenants.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn tenant(&self, key: &str) -> Arc<Tenant> {
        let mut tenants = self.lock();
        if let Some(tenant) = tenants.get(key) {
            return tenant.clone();
        }
        if tenants.len() >= SWEEP_ABOVE {
            sweep(&mut tenants);
        }
        let tenant = Arc::new(Tenant {
            slots: Arc::new(Semaphore::new(self.cap as usize)),
            standing: Mutex::new(Standing::New),
        });
        tenants.insert(key.to_owned(), tenant.clone());
        tenant
    }
}

impl Slot<'_> {
    /// How the invocation run in this slot ended: within its limits or
    /// not, after `took`.
    pub fn ended(&self, hit_a_limit: bool, took: Duration) {
        let cool_down = (took * COOL_DOWN_FACTOR).min(LONGEST_COOL_DOWN);
        *self.tenant.standing() = if hit_a_limit {
            Standing::Penalised {
                cooled_down_at: Instant::now() + cool_down,
            }
        } else {
            Standing::Good
        };
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut tenants = self.shares.lock();
        // Forget a tenant once nothing of it runs or waits (the map's
        // reference and this one are all that is left) and it is not
        // penalised, so the map holds only active tenants.
        let penalised = matches!(*self.tenant.standing(), Standing::Penalised { .. });
        if Arc::strong_count(&self.tenant) == 2 && !penalised {
            tenants.remove(&self.key);
        }
    }
}

/// Penalised tenants idle for this long are forgotten when the map grows
/// (a deleted webhook's, say).
const FORGET_PENALTY_AFTER: Duration = Duration::from_secs(60);
/// Tenants kept before the idle ones are swept.
const SWEEP_ABOVE: usize = 1024;

/// Drops idle tenants whose penalty is long over.
fn sweep(tenants: &mut HashMap<String, Arc<Tenant>>) {
    let now = Instant::now();
    tenants.retain(|_, tenant| {
        Arc::strong_count(tenant) > 1
            || matches!(*tenant.standing(), Standing::Penalised { cooled_down_at }
                if cooled_down_at + FORGET_PENALTY_AFTER > now)
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_new_tenant_runs_alone_then_holds_at_most_half() {
        let shares = Shares::new(4);
        let soon = Duration::from_millis(50);
        let first = shares.acquire("a").await.unwrap();
        let mut second = Box::pin(shares.acquire("a"));
        assert!(
            tokio::time::timeout(soon, &mut second).await.is_err(),
            "a new tenant runs one at a time"
        );
        first.ended(false, Duration::from_millis(1));
        drop(first);
        let a1 = second.await.unwrap();
        let a2 = shares.acquire("a").await.unwrap();
        let third = tokio::time::timeout(soon, shares.acquire("a"));
        assert!(third.await.is_err(), "a third slot for one tenant");
        let b = shares.acquire("b").await.unwrap();
        drop((a1, a2, b));
        assert!(shares.lock().is_empty(), "idle tenants are forgotten");
    }

    #[tokio::test]
    async fn a_tenant_that_ran_into_a_limit_runs_alone() {
        let shares = Shares::new(4);
        let first = shares.acquire("a").await.unwrap();
        let ended = Instant::now();
        first.ended(true, Duration::from_millis(20));
        let mut next = Box::pin(shares.acquire("a"));
        let soon = Duration::from_millis(50);
        assert!(
            tokio::time::timeout(soon, &mut next).await.is_err(),
            "waits for the one before it to end"
        );
        drop(first);
        let alone = next.await.unwrap();
        assert!(
            ended.elapsed() >= Duration::from_millis(180),
            "starts after a cool-down of nine times the last run"
        );
        let beside = tokio::time::timeout(soon, shares.acquire("a"));
        assert!(beside.await.is_err(), "nothing of it runs beside");
        assert!(shares.acquire("b").await.is_ok(), "others still find room");
        drop(alone);
        assert!(shares.lock().contains_key("a"), "idle, it stays penalised");
    }
}

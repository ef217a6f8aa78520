//! Fair share between apps: how many of one worker process's slots each
//! app's deliveries may hold at once.
//!
//! Per-webhook limits ([`super::lane::in_flight`]) do not protect one
//! tenant from another that has many webhooks: two hundred slow endpoints
//! at their limits hold every slot, and an app that then publishes waits
//! until those attempts end, seconds for a slow endpoint, since a claim
//! never takes a slot back. So a worker shares its slots between apps:
//!
//! - A **budget** of `share` percent of the slots is divided max-min
//!   fairly ([`fair_level`]) between the apps holding slots: an app may
//!   grow to the level at which the budget is spent, counting each other
//!   app at what it holds, or at that level if it holds more. One app
//!   alone may hold the whole budget; two busy ones half of it each; an
//!   app with one delivery in flight leaves the rest to the others.
//! - The slots **beyond the budget** are the reserve. An app that holds
//!   none finds them free at once: it is served as soon as its work is
//!   due, however long the busy app's attempts take. The reserve is
//!   the price of that: an app alone with enough slow webhooks to fill
//!   every slot gets the budget, not all of them.
//!
//! # Invariants
//!
//! 1. **Counted with the slot.** An app's count rises when a claim of its
//!    delivery takes a worker slot and falls when that slot is freed
//!    (the claim's guard dropped), never at any other time.
//! 2. **No app claims past its level.** A claim takes at most an app's
//!    [`Allotment::room`] of its deliveries: the lanes of an app with no
//!    room are skipped by the claim's lane query (and left as they are:
//!    due, for the claim after a slot of theirs is freed), and an app's
//!    room is split between its due lanes ([`Allotment::split`]).
//!    Each app's level counts the others as they are, so two apps
//!    growing in one claim may together pass the budget by what they
//!    take at once (the worker's slots still bound them), and an app
//!    may hold more than its level by having claimed before another app
//!    arrived: either way it claims nothing more until it is below its
//!    level, so the apps converge on their fair shares as slots free.
//! 3. **Oldest first inside an app.** Lanes are still taken in the
//!    order their work became due, and deliveries in due order.
//! 4. **Per process.** Each worker process shares its own slots; with
//!    several, each keeps its own reserve.

use std::collections::HashMap;

use super::{AppId, SharePercent};

/// How a worker's slots are shared between apps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FairShare {
    slots: u32,
    budget: u32,
}

impl FairShare {
    /// `share` of `slots` is the budget; the rest is the reserve.
    pub fn new(slots: usize, share: SharePercent) -> Self {
        let slots = u32::try_from(slots).unwrap_or(u32::MAX);
        let budget = (u64::from(slots) * u64::from(share.get()) / 100).max(1);
        Self {
            slots,
            budget: u32::try_from(budget).unwrap_or(u32::MAX),
        }
    }

    pub fn budget(&self) -> u32 {
        self.budget
    }

    pub fn slots(&self) -> u32 {
        self.slots
    }

    /// What each app may claim more, given the slots each app holds.
    pub fn allot(&self, held: &HashMap<AppId, u32>) -> Allotment {
        let all: Vec<u32> = held.values().copied().collect();
        let room = held
            .iter()
            .map(|(app, &holds)| {
                let mut others = all.clone();
                let mine = others.iter().position(|&h| h == holds);
                if let Some(at) = mine {
                    others.swap_remove(at);
                }
                let level = fair_level(self.budget, &mut others);
                (app.clone(), level.saturating_sub(holds))
            })
            .collect();
        Allotment {
            newcomer: Some(fair_level(self.budget, &mut all.clone())),
            room,
        }
    }
}

/// The most slots one app may hold of `budget` while the others hold
/// `others`: the level `L` at which each other app counted at
/// `min(its slots, L)` and this one at `L` spend the budget (max-min
/// fairness, "water filling"), at least one.
pub fn fair_level(budget: u32, others: &mut [u32]) -> u32 {
    others.sort_unstable();
    let mut left = u64::from(budget);
    let count = others.len() as u64;
    for (i, &held) in others.iter().enumerate() {
        // This app and the others from `i` on share what is left evenly,
        // unless the smallest of them holds less than that even part.
        let sharing = count - i as u64 + 1;
        if u64::from(held) * sharing >= left {
            return u32::try_from(left / sharing).unwrap_or(u32::MAX).max(1);
        }
        left -= u64::from(held);
    }
    u32::try_from(left).unwrap_or(u32::MAX).max(1)
}

/// How many more deliveries of each app one claim may take.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allotment {
    /// The room of an app holding no slots; `None` for no limit.
    newcomer: Option<u32>,
    /// The room of each app holding slots.
    room: HashMap<AppId, u32>,
}

impl Allotment {
    /// No app is limited (a test's single step, a benchmark).
    pub fn unlimited() -> Self {
        Self::default()
    }

    /// How many more of the app's deliveries may be claimed; `None`: any.
    pub fn room(&self, app: &AppId) -> Option<u32> {
        self.room.get(app).copied().or(self.newcomer)
    }

    /// The apps with no room: a claim skips their lanes.
    pub fn full(&self) -> Vec<String> {
        let mut full: Vec<String> = self
            .room
            .iter()
            .filter(|(_, room)| **room == 0)
            .map(|(app, _)| app.as_str().to_owned())
            .collect();
        full.sort_unstable();
        full
    }

    /// The most each lane of a claim may take, for lanes whose apps are
    /// `apps` in claim order: each app's room split between its lanes,
    /// the earlier lanes taking what does not divide evenly. `None`: no
    /// limit.
    pub fn split<'a>(&self, apps: &[&'a AppId]) -> Vec<Option<i64>> {
        let mut lanes: HashMap<&'a AppId, (u32, u32)> = HashMap::new();
        for &app in apps {
            lanes.entry(app).or_default().0 += 1;
        }
        apps.iter()
            .map(|&app| {
                let room = self.room(app)?;
                let (count, seen) = lanes.get_mut(app)?;
                let part = room / *count + u32::from(*seen < room % *count);
                *seen += 1;
                Some(i64::from(part))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(n: u32) -> AppId {
        AppId::from(format!("app_{n}"))
    }

    fn share(percent: u8) -> SharePercent {
        SharePercent::parse(u64::from(percent)).expect("share")
    }

    #[test]
    fn one_app_alone_gets_the_budget_and_the_reserve_stays_free() {
        let share = FairShare::new(128, share(75));
        assert_eq!(share.budget(), 96);
        let allotment = share.allot(&HashMap::new());
        assert_eq!(allotment.room(&app(1)), Some(96));
        let allotment = share.allot(&HashMap::from([(app(1), 96)]));
        assert_eq!(allotment.room(&app(1)), Some(0));
        assert_eq!(allotment.full(), vec![app(1).as_str().to_owned()]);
        // A newcomer may take half the budget, the reserve being free.
        assert_eq!(allotment.room(&app(2)), Some(48));
    }

    #[test]
    fn a_busy_app_waits_below_its_level_once_another_arrives() {
        let share = FairShare::new(128, share(75));
        let allotment = share.allot(&HashMap::from([(app(1), 96), (app(2), 32)]));
        // app 1's level is 96 - 32 = 64: it holds more, so it takes none.
        assert_eq!(allotment.room(&app(1)), Some(0));
        // app 2's level is 48 (app 1 counted at 48): 16 more.
        assert_eq!(allotment.room(&app(2)), Some(16));
    }

    #[test]
    fn apps_holding_little_leave_the_rest_to_a_busy_one() {
        let share = FairShare::new(128, share(75));
        let mut held: HashMap<AppId, u32> = (2..52).map(|n| (app(n), 1)).collect();
        held.insert(app(1), 10);
        let allotment = share.allot(&held);
        assert_eq!(allotment.room(&app(1)), Some(96 - 50 - 10));
        // Each small one may grow to the level that spends the budget.
        assert_eq!(fair_level(96, &mut [10]), 86);
        assert!(allotment.room(&app(2)).is_some_and(|room| room >= 1));
    }

    #[test]
    fn the_level_is_at_least_one_slot() {
        let mut others = vec![96; 200];
        assert_eq!(fair_level(96, &mut others), 1);
        assert_eq!(fair_level(96, &mut []), 96);
        assert_eq!(fair_level(96, &mut [20, 20]), 56);
        assert_eq!(fair_level(96, &mut [40, 40]), 32);
    }

    #[test]
    fn a_full_share_keeps_no_reserve() {
        let share = FairShare::new(128, share(100));
        assert_eq!(share.budget(), 128);
        assert_eq!(share.allot(&HashMap::new()).room(&app(1)), Some(128));
    }

    #[test]
    fn an_apps_room_is_split_between_its_lanes_oldest_first() {
        let allotment = Allotment {
            newcomer: Some(5),
            room: HashMap::from([(app(1), 2)]),
        };
        let (a, b) = (app(1), app(2));
        let split = allotment.split(&[&a, &b, &a, &a, &b]);
        assert_eq!(split, vec![Some(1), Some(3), Some(1), Some(0), Some(2)]);
        assert_eq!(Allotment::unlimited().split(&[&a, &b]), vec![None, None]);
    }
}

//! Which entities (keys, organizations, MCPs) get series of their own: the top K by recent
//! traffic, chosen with hysteresis, and one `other` series that carries everything else.
//!
//! Owns the exact per-entity counters and the admission policy. It is plain synchronous data
//! driven by an injected clock (whole seconds), so tests replay any schedule; it knows no
//! metric names (those live in `metrics/mod.rs`) and never reads the wall clock.
//!
//! # Why counters never go backwards
//!
//! Every entity has a *score*, its requests decayed with a half-life of [`HALF_LIFE_SECS`].
//! An admitted entity's series shows only what it counted *while admitted*; whatever an
//! entity counts while not admitted goes to `other`. So each request is in exactly one
//! rendered counter, and every rendered counter only grows:
//! - an entity admitted late starts its own series at 0 (its earlier traffic stays in `other`);
//! - an evicted entity's series stops (Prometheus marks it stale) and `other` absorbs only
//!   its *future* increments, never its past value, so `other` never jumps;
//! - an entity admitted again continues from the value its series last showed, so a series
//!   that reappears within Prometheus' window never looks reset and never double counts.
//!
//! `sum(rate(...))` over a family is therefore exact at all times. A plain `sum(...)` of the
//! rendered values equals the input as long as nothing was evicted; after an eviction it is
//! short by the evicted series' last values, which Prometheus still holds until they go stale.
//!
//! Admission: while fewer than K are admitted, an entity is admitted on its first request.
//! At each rebalance (each scrape) entities idle for the expiry lose their series and are
//! forgotten, free places go to the best-scored outsiders, and an outsider takes the place of
//! the weakest admitted entity only when its score is more than [`HYSTERESIS`] times that
//! entity's (and at least one request): a key hovering around rank K does not flap.

use std::collections::HashMap;
use std::hash::Hash;

/// Status classes counted per entity: ok, auth, rate_limited, client, server.
pub const CLASSES: usize = 5;

/// Half-life of the score that ranks entities by recent traffic.
pub const HALF_LIFE_SECS: f32 = 3_600.0;

/// How many times the weakest admitted entity's score an outsider needs to take its place.
pub const HYSTERESIS: f32 = 2.0;

/// Requests by status class.
pub type ClassCounts = [u64; CLASSES];

/// Entities tracked per family at most: beyond this (ids from log lines are anyone's), a new
/// entity is counted in `other` straight away and not remembered.
pub const MAX_TRACKED: usize = 1_000_000;

#[derive(Debug)]
struct Slot<E> {
    score: f32,
    scored_at: u32,
    last_seen: u32,
    admitted: bool,
    /// What the entity's own series shows; present once it has been admitted.
    shown: Option<Box<ClassCounts>>,
    extra: E,
}

impl<E> Slot<E> {
    fn score_at(&self, now: u32) -> f32 {
        let dt = now.saturating_sub(self.scored_at) as f32;
        self.score * (-dt / HALF_LIFE_SECS).exp2()
    }
}

/// The entities of one family with their counters, and which of them are exported.
#[derive(Debug)]
pub struct TopK<K, E = ()> {
    limit: usize,
    idle_secs: u32,
    slots: HashMap<K, Slot<E>>,
    /// Entities remembered at most; see [`TopK::with_max_tracked`].
    max_tracked: usize,
    admitted: usize,
    other: ClassCounts,
    folded: u64,
}

impl<K: Hash + Eq + Clone, E: Default> TopK<K, E> {
    /// At most `limit` entities exported; an entity idle for `idle_secs` loses its series.
    pub fn new(limit: usize, idle_secs: u32) -> TopK<K, E> {
        TopK {
            limit,
            idle_secs,
            slots: HashMap::new(),
            max_tracked: MAX_TRACKED,
            admitted: 0,
            other: [0; CLASSES],
            folded: 0,
        }
    }

    /// Remembers at most `n` entities (default [`MAX_TRACKED`]); a new one beyond that is
    /// counted in `other` straight away and counts as folded.
    pub fn with_max_tracked(mut self, n: usize) -> TopK<K, E> {
        self.max_tracked = n.max(self.limit);
        self
    }

    /// The configured K.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Counts `counts` for `k` at `now`; returns the entity's extra state for the caller to
    /// update (kept for every tracked entity, admitted or not), or `None` when the family
    /// remembers as many entities as it may and `k` is new.
    pub fn add(&mut self, k: &K, counts: &ClassCounts, now: u32) -> Option<&mut E> {
        let n: u64 = counts.iter().sum();
        if !self.slots.contains_key(k) {
            if self.slots.len() >= self.max_tracked {
                for (t, c) in self.other.iter_mut().zip(counts) {
                    *t += c;
                }
                self.folded += 1;
                return None;
            }
            let admit = self.admitted < self.limit;
            if admit {
                self.admitted += 1;
            } else {
                self.folded += 1;
            }
            self.slots.insert(
                k.clone(),
                Slot {
                    score: 0.0,
                    scored_at: now,
                    last_seen: now,
                    admitted: admit,
                    shown: admit.then(|| Box::new([0; CLASSES])),
                    extra: E::default(),
                },
            );
        }
        let slot = self.slots.get_mut(k)?;
        slot.score = slot.score_at(now) + n as f32;
        slot.scored_at = now;
        slot.last_seen = slot.last_seen.max(now);
        let target = match (&mut slot.shown, slot.admitted) {
            (Some(shown), true) => &mut **shown,
            _ => &mut self.other,
        };
        for (t, c) in target.iter_mut().zip(counts) {
            *t += c;
        }
        Some(&mut slot.extra)
    }

    /// Expires idle entities and re-chooses the exported set (see the module documentation).
    pub fn rebalance(&mut self, now: u32) {
        let idle = self.idle_secs;
        let before = self.slots.len();
        self.slots
            .retain(|_, s| now.saturating_sub(s.last_seen) < idle);
        if self.slots.len() != before {
            self.admitted = self.slots.values().filter(|s| s.admitted).count();
        }
        let mut outside: Vec<(f32, K)> = self
            .slots
            .iter()
            .filter(|(_, s)| !s.admitted)
            .map(|(k, s)| (s.score_at(now), k.clone()))
            .collect();
        if outside.is_empty() {
            return;
        }
        let by_score_desc = |a: &(f32, K), b: &(f32, K)| b.0.total_cmp(&a.0);
        if outside.len() > self.limit && self.limit > 0 {
            outside.select_nth_unstable_by(self.limit - 1, by_score_desc);
            outside.truncate(self.limit);
        }
        outside.sort_by(by_score_desc);
        let mut inside: Vec<(f32, K)> = self
            .slots
            .iter()
            .filter(|(_, s)| s.admitted)
            .map(|(k, s)| (s.score_at(now), k.clone()))
            .collect();
        inside.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut weakest = inside.into_iter();
        for (score, k) in outside {
            if self.admitted >= self.limit {
                let Some((low, evict)) = weakest.next() else {
                    break;
                };
                if !(score >= 1.0 && score > HYSTERESIS * low) {
                    break;
                }
                if let Some(s) = self.slots.get_mut(&evict) {
                    s.admitted = false;
                }
                self.admitted -= 1;
                self.folded += 1;
            }
            if let Some(s) = self.slots.get_mut(&k) {
                s.admitted = true;
                s.shown.get_or_insert_with(|| Box::new([0; CLASSES]));
                self.admitted += 1;
            }
        }
    }

    /// The exported entities: key, what their series show, their extra state.
    pub fn exported(&self) -> impl Iterator<Item = (&K, &ClassCounts, &E)> {
        self.slots
            .iter()
            .filter(|(_, s)| s.admitted)
            .filter_map(|(k, s)| s.shown.as_deref().map(|c| (k, c, &s.extra)))
    }

    /// Every tracked entity's extra state, exported or not.
    pub fn extras(&self) -> impl Iterator<Item = (&K, bool, &E)> {
        self.slots.iter().map(|(k, s)| (k, s.admitted, &s.extra))
    }

    /// What the `other` series shows.
    pub fn other(&self) -> &ClassCounts {
        &self.other
    }

    /// Times an entity's traffic started going to `other`: first seen with the top K full,
    /// or evicted from it.
    pub fn folded(&self) -> u64 {
        self.folded
    }

    /// Entities tracked (seen within the idle expiry).
    pub fn tracked(&self) -> usize {
        self.slots.len()
    }

    /// Entities with a series of their own.
    pub fn exported_count(&self) -> usize {
        self.admitted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(n: u64) -> ClassCounts {
        [n, 0, 0, 0, 0]
    }

    fn rendered_sum<E: Default>(t: &TopK<u32, E>) -> u64 {
        t.exported().map(|(_, c, _)| c[0]).sum::<u64>() + t.other()[0]
    }

    #[test]
    fn the_first_k_are_admitted_and_the_rest_go_to_other() {
        let mut t: TopK<u32> = TopK::new(3, 86_400);
        for k in 0..10 {
            t.add(&k, &ok(1), 0);
        }
        assert_eq!(t.exported_count(), 3);
        assert_eq!(t.other()[0], 7);
        assert_eq!(t.folded(), 7);
        assert_eq!(rendered_sum(&t), 10);
    }

    #[test]
    fn a_much_busier_outsider_takes_the_weakest_place_and_sums_stay_exact() {
        let mut t: TopK<u32> = TopK::new(2, 86_400);
        t.add(&1, &ok(10), 0);
        t.add(&2, &ok(10), 0);
        t.add(&3, &ok(15), 0); // busier, but not twice as busy: no swap
        t.rebalance(1);
        let mut shown: Vec<u32> = t.exported().map(|(k, _, _)| *k).collect();
        shown.sort();
        assert_eq!(shown, [1, 2], "hysteresis keeps the admitted set");
        t.add(&3, &ok(100), 2);
        t.rebalance(3);
        let shown: Vec<u32> = t.exported().map(|(k, _, _)| *k).collect();
        assert!(shown.contains(&3), "{shown:?}");
        assert_eq!(t.exported_count(), 2);
        // Key 3's series starts at 0: its 115 requests so far stay in other.
        let three = t.exported().find(|(k, _, _)| **k == 3).unwrap().1[0];
        assert_eq!(three, 0);
        // The evicted key's 10 left with its series; nothing is counted twice.
        assert_eq!(rendered_sum(&t), 135 - 10);
    }

    #[test]
    fn counters_never_go_backwards_across_eviction_and_readmission() {
        let mut t: TopK<u32> = TopK::new(1, 86_400);
        t.add(&1, &ok(5), 0);
        let first = t.exported().next().unwrap().1[0];
        assert_eq!(first, 5);
        t.add(&2, &ok(50), 10);
        t.rebalance(10);
        assert_eq!(t.exported().next().unwrap().0, &2);
        let other_before = t.other()[0];
        t.add(&1, &ok(3), 11);
        assert_eq!(
            t.other()[0],
            other_before + 3,
            "other takes only new increments"
        );
        t.add(&1, &ok(1000), 12);
        t.rebalance(12);
        let (k, v, _) = t.exported().next().unwrap();
        assert_eq!(
            (*k, v[0]),
            (1, 5),
            "continues from what its series last showed"
        );
    }

    #[test]
    fn idle_entities_expire_and_free_their_place() {
        let mut t: TopK<u32> = TopK::new(1, 100);
        t.add(&1, &ok(5), 0);
        t.add(&2, &ok(1), 50);
        t.rebalance(120);
        assert_eq!(t.tracked(), 1);
        assert_eq!(t.exported().next().unwrap().0, &2);
        t.rebalance(1_000);
        assert_eq!((t.tracked(), t.exported_count()), (0, 0));
    }

    #[test]
    fn a_zero_limit_exports_nothing_and_counts_everything_in_other() {
        let mut t: TopK<u32> = TopK::new(0, 100);
        t.add(&1, &ok(5), 0);
        t.rebalance(1);
        assert_eq!((t.exported_count(), t.other()[0]), (0, 5));
    }
}

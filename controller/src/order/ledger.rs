//! The namespace's spend ledger: the ConfigMap `ep-spend-ledger` in each namespace a budget
//! applies to, one entry per admitted order (keyed by the order's uid). Admission reads the
//! ledger, decides, and writes it back on condition of the resourceVersion it read; a 409 means
//! another admission got there first, so it reads again and decides again. Admissions in one
//! namespace are thus serialized by the API server itself (across passes, restarts and replicas):
//! two orders can never both fit into the last dollar. An order reserves its projected cost (price
//! x max lifetime) and holds its GPUs while open; when it ends its actual spend replaces the
//! reservation. Entries outlive their orders and experiments, so deleted work still counts.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Datelike, Utc};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::{ObjectMeta, PostParams};
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::reason::{Blocked, Reason};
use crate::settings::NamespaceBudget;

/// The ledger ConfigMap's name, in every namespace with a budget.
pub const NAME: &str = "ep-spend-ledger";
/// Annotation carrying the budget in force, for people and `kubectl ep approve`.
pub const BUDGET_ANNOTATION: &str = "ep.dev/budget";
/// Closed entries older than this leave the ledger (the registry's spend_ledger keeps them).
const KEEP_DAYS: i64 = 62;
/// An open entry whose order is gone from the cache this long is closed at its reservation.
const ORPHAN_AFTER_MINUTES: i64 = 10;

/// One admitted order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    pub order: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub experiment: Option<String>,
    pub admitted_at: DateTime<Utc>,
    pub gpus: u32,
    pub reserved_usd: f64,
    /// Actual spend, final once `open` is false.
    #[serde(default)]
    pub spent_usd: f64,
    /// Holds its GPUs and reservation until the order ends.
    pub open: bool,
    /// On a day's entry ([`DAY_PREFIX`]): how many closed orders it sums.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub orders: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Key prefix of a day's entry: the closed orders admitted that day (UTC), summed. A closed
/// order whose order has ended or is gone folds into it, so the ledger holds the open orders and
/// one entry per day instead of every order of the last two months (a thousand orders a day
/// would outgrow a ConfigMap's 1 MiB within weeks, and every admission reads and writes it all).
pub const DAY_PREFIX: &str = "closed.";

/// What a live order in the cache says about its entry.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Live {
    pub spent_usd: f64,
    pub ended: bool,
}

/// Spend and GPUs held in a namespace, as the ledger counts them.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Usage {
    pub gpus: u32,
    /// Spent or reserved today (UTC).
    pub day_usd: f64,
    /// Spent or reserved this calendar month (UTC).
    pub month_usd: f64,
}

/// The ledger's entries by order uid; values that do not parse are kept as they are.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Ledger {
    pub entries: BTreeMap<String, Entry>,
    foreign: BTreeMap<String, String>,
}

impl Ledger {
    pub fn from_data(data: Option<&BTreeMap<String, String>>) -> Self {
        let mut l = Self::default();
        for (k, v) in data.into_iter().flatten() {
            match serde_json::from_str::<Entry>(v) {
                Ok(e) => {
                    l.entries.insert(k.clone(), e);
                }
                Err(_) => {
                    l.foreign.insert(k.clone(), v.clone());
                }
            }
        }
        l
    }

    pub fn to_data(&self) -> BTreeMap<String, String> {
        let mut data = self.foreign.clone();
        for (k, e) in &self.entries {
            data.insert(k.clone(), serde_json::to_string(e).unwrap_or_default());
        }
        data
    }

    /// Usage by every entry but `me`'s: an open entry counts its GPUs and the larger of its
    /// reservation and live spend, a closed one its actual spend, on the day it was admitted.
    pub fn usage(&self, me: &str, now: DateTime<Utc>, live: impl Fn(&str) -> Option<Live>) -> Usage {
        let mut u = Usage::default();
        for (uid, e) in self.entries.iter().filter(|(uid, _)| uid.as_str() != me) {
            let counted = if e.open {
                u.gpus += e.gpus;
                e.reserved_usd.max(live(uid).map_or(e.spent_usd, |l| l.spent_usd))
            } else {
                e.spent_usd
            };
            if e.admitted_at.date_naive() == now.date_naive() {
                u.day_usd += counted;
            }
            if (e.admitted_at.year(), e.admitted_at.month()) == (now.year(), now.month()) {
                u.month_usd += counted;
            }
        }
        u
    }

    /// Closes open entries whose order ended (at its actual spend) or is gone from the cache for
    /// a while (at its reservation: the spend of a vanished order is not known, so the most it
    /// could have been counts); drops closed entries past the retention. True when it changed.
    pub fn heal(&mut self, now: DateTime<Utc>, live: impl Fn(&str) -> Option<Live>) -> bool {
        let mut changed = false;
        for (uid, e) in self.entries.iter_mut().filter(|(_, e)| e.open) {
            match live(uid) {
                Some(l) if l.ended => {
                    (e.open, e.spent_usd) = (false, l.spent_usd);
                    changed = true;
                }
                None if now - e.admitted_at > chrono::Duration::minutes(ORPHAN_AFTER_MINUTES) => {
                    (e.open, e.spent_usd) = (false, e.reserved_usd.max(e.spent_usd));
                    changed = true;
                }
                _ => {}
            }
        }
        let before = self.entries.len();
        self.entries.retain(|_, e| e.open || now - e.admitted_at < chrono::Duration::days(KEEP_DAYS));
        self.fold(&live) || changed || self.entries.len() != before
    }

    /// Folds the closed entries of orders that ended or are gone into their day's entry; true
    /// when any folded. Usage is unchanged: a day's entry counts on the day it sums.
    fn fold(&mut self, live: impl Fn(&str) -> Option<Live>) -> bool {
        let done: Vec<String> = self
            .entries
            .iter()
            .filter(|(uid, e)| !e.open && !uid.starts_with(DAY_PREFIX) && live(uid).is_none_or(|l| l.ended))
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in &done {
            let Some(e) = self.entries.remove(uid) else { continue };
            let day = e.admitted_at.date_naive();
            let sum = self.entries.entry(format!("{DAY_PREFIX}{day}")).or_insert_with(|| Entry {
                order: String::new(),
                experiment: None,
                admitted_at: day.and_time(chrono::NaiveTime::MIN).and_utc(),
                gpus: 0,
                reserved_usd: 0.0,
                spent_usd: 0.0,
                open: false,
                orders: 0,
            });
            sum.spent_usd += e.spent_usd;
            sum.orders += e.orders.max(1);
            sum.order = format!("{} orders admitted on {day}, closed", sum.orders);
        }
        !done.is_empty()
    }

    /// Admits `entry` for order `uid` if the budget has room; true when the ledger changed. An
    /// order already in the ledger was admitted before (a later pass, or after a restart).
    pub fn admit(
        &mut self,
        namespace: &str,
        uid: &str,
        entry: Entry,
        budget: &NamespaceBudget,
        live: impl Fn(&str) -> Option<Live>,
    ) -> Result<bool, Blocked> {
        if self.entries.contains_key(uid) {
            return Ok(false);
        }
        let now = entry.admitted_at;
        let u = self.usage(uid, now, &live);
        let over = |what: String| Blocked::new(Reason::BudgetExceeded, what);
        if u.gpus.saturating_add(entry.gpus) > budget.max_concurrent_gpus {
            return Err(over(format!(
                "namespace {namespace} holds {} GPUs and may hold {}: this order ({} GPUs) waits for one to end",
                u.gpus, budget.max_concurrent_gpus, entry.gpus
            )));
        }
        let r = entry.reserved_usd;
        if u.day_usd + r > budget.max_usd_per_day {
            return Err(over(format!(
                "namespace {namespace} has ${:.2} spent or reserved today (UTC) of its ${:.2} daily budget; \
                 this order reserves ${r:.2} (price x max lifetime) and waits for room",
                u.day_usd, budget.max_usd_per_day
            )));
        }
        if let Some(max) = budget.max_usd_per_month.filter(|m| u.month_usd + r > *m) {
            return Err(over(format!(
                "namespace {namespace} has ${:.2} spent or reserved this month (UTC) of its ${max:.2} monthly budget; \
                 this order reserves ${r:.2} (price x max lifetime) and waits for room",
                u.month_usd
            )));
        }
        self.entries.insert(uid.to_owned(), entry);
        Ok(true)
    }

    /// Closes `uid`'s entry at its actual spend; true when it changed.
    pub fn settle(&mut self, uid: &str, spent_usd: f64) -> bool {
        match self.entries.get_mut(uid) {
            Some(e) if e.open || (e.spent_usd - spent_usd).abs() > 1e-9 => {
                (e.open, e.spent_usd) = (false, spent_usd);
                true
            }
            _ => false,
        }
    }
}

/// Reads the namespace's ledger, lets `change` decide, and writes the result back on condition
/// of the version read (created when absent); on a conflict, reads and decides again. `change`
/// returns whether it changed the ledger and what to answer.
pub async fn update<T>(
    api: &Api<ConfigMap>,
    budget: Option<&NamespaceBudget>,
    mut change: impl FnMut(&mut Ledger) -> (bool, T),
) -> Result<T, Error> {
    for _ in 0..20 {
        let current = api.get_opt(NAME).await?;
        let mut ledger = Ledger::from_data(current.as_ref().and_then(|c| c.data.as_ref()));
        let (changed, answer) = change(&mut ledger);
        if !changed {
            return Ok(answer);
        }
        let written = match current {
            Some(mut cm) => {
                cm.data = Some(ledger.to_data());
                set_budget(&mut cm.metadata, budget);
                // `cm` carries the resourceVersion it was read at: a replace is refused with 409
                // if anyone wrote the ledger since.
                api.replace(NAME, &PostParams::default(), &cm).await
            }
            None => {
                let mut meta = ObjectMeta { name: Some(NAME.to_owned()), ..ObjectMeta::default() };
                meta.labels = Some([("app.kubernetes.io/managed-by".to_owned(), "ep-operator".to_owned())].into());
                set_budget(&mut meta, budget);
                let cm = ConfigMap { metadata: meta, data: Some(ledger.to_data()), ..ConfigMap::default() };
                api.create(&PostParams::default(), &cm).await
            }
        };
        match written {
            Ok(_) => return Ok(answer),
            Err(kube::Error::Api(e)) if e.code == 409 => {
                tracing::debug!("spend ledger changed under us; reading it again");
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(Error::Conflict)
}

/// Admits order `uid` under `budget`: heals what ended or vanished, then reserves if there is
/// room, all in one conditional write of the ledger.
pub async fn reserve(
    api: &Api<ConfigMap>,
    namespace: &str,
    uid: &str,
    entry: &Entry,
    budget: &NamespaceBudget,
    live: &HashMap<String, Live>,
) -> Result<Result<(), Blocked>, Error> {
    update(api, Some(budget), |l| admit_change(l, namespace, uid, entry, budget, live)).await
}

/// The change one admission makes to the ledger: (changed, verdict).
pub fn admit_change(
    l: &mut Ledger,
    namespace: &str,
    uid: &str,
    entry: &Entry,
    budget: &NamespaceBudget,
    live: &HashMap<String, Live>,
) -> (bool, Result<(), Blocked>) {
    let find = |u: &str| live.get(u).copied();
    let healed = l.heal(entry.admitted_at, find);
    match l.admit(namespace, uid, entry.clone(), budget, find) {
        Ok(added) => (healed || added, Ok(())),
        Err(b) => (healed, Err(b)),
    }
}

fn set_budget(meta: &mut ObjectMeta, budget: Option<&NamespaceBudget>) {
    if let Some(b) = budget.and_then(|b| serde_json::to_string(b).ok()) {
        meta.annotations.get_or_insert_default().insert(BUDGET_ANNOTATION.to_owned(), b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(day: u32, hour: u32) -> DateTime<Utc> {
        use chrono::TimeZone;
        Utc.with_ymd_and_hms(2026, 11, day, hour, 0, 0).unwrap()
    }

    fn entry(day: u32, gpus: u32, reserved: f64) -> Entry {
        Entry {
            order: "o".into(),
            experiment: None,
            admitted_at: at(day, 10),
            gpus,
            reserved_usd: reserved,
            spent_usd: 0.0,
            open: true,
            orders: 0,
        }
    }

    fn budget(day: f64, month: Option<f64>, gpus: u32) -> NamespaceBudget {
        NamespaceBudget { max_usd_per_day: day, max_usd_per_month: month, max_concurrent_gpus: gpus }
    }

    #[test]
    fn the_last_dollar_goes_to_one_order_only() {
        let mut l = Ledger::default();
        let b = budget(10.0, None, 4);
        assert_eq!(l.admit("ns", "a", entry(3, 1, 6.0), &b, |_| None), Ok(true));
        let refused = l.admit("ns", "b", entry(3, 1, 6.0), &b, |_| None).unwrap_err();
        assert_eq!(refused.reason, Reason::BudgetExceeded);
        assert!(refused.message.contains("$6.00 spent or reserved today") && refused.message.contains("$10.00"));
        assert_eq!(l.admit("ns", "a", entry(3, 1, 6.0), &b, |_| None), Ok(false), "admitted once, kept");
    }

    #[test]
    fn actual_spend_replaces_the_reservation_when_the_order_ends() {
        let mut l = Ledger::default();
        let b = budget(10.0, None, 4);
        l.admit("ns", "a", entry(3, 1, 6.0), &b, |_| None).unwrap();
        assert!(l.settle("a", 1.5));
        assert_eq!(l.usage("x", at(3, 12), |_| None), Usage { gpus: 0, day_usd: 1.5, month_usd: 1.5 });
        assert_eq!(l.admit("ns", "b", entry(3, 1, 6.0), &b, |_| None), Ok(true));
        // Live spend above the reservation counts while open.
        let u = l.usage("x", at(3, 12), |uid| (uid == "b").then_some(Live { spent_usd: 7.0, ended: false }));
        assert_eq!(u.day_usd, 8.5);
    }

    #[test]
    fn gpus_and_the_month_bound_too() {
        let mut l = Ledger::default();
        l.admit("ns", "a", entry(1, 2, 1.0), &budget(100.0, Some(5.0), 2), |_| None).unwrap();
        let gpus = l.admit("ns", "b", entry(3, 1, 1.0), &budget(100.0, Some(50.0), 2), |_| None).unwrap_err();
        assert!(gpus.message.contains("holds 2 GPUs and may hold 2"), "{}", gpus.message);
        l.settle("a", 4.5);
        let month = l.admit("ns", "b", entry(3, 1, 1.0), &budget(100.0, Some(5.0), 2), |_| None).unwrap_err();
        assert!(month.message.contains("$4.50 spent or reserved this month"), "{}", month.message);
    }

    #[test]
    fn heal_closes_ended_and_vanished_orders_and_keeps_their_spend() {
        let mut l = Ledger::default();
        let b = budget(100.0, None, 8);
        l.admit("ns", "ended", entry(3, 1, 6.0), &b, |_| None).unwrap();
        l.admit("ns", "gone", entry(3, 1, 4.0), &b, |_| None).unwrap();
        let live = |uid: &str| (uid == "ended").then_some(Live { spent_usd: 0.5, ended: true });
        assert!(l.heal(at(3, 12), live));
        assert_eq!(l.usage("x", at(3, 12), |_| None), Usage { gpus: 0, day_usd: 4.5, month_usd: 4.5 });
        assert!(l.heal(at(28, 12) + chrono::Duration::days(62), |_| None));
        assert!(l.entries.is_empty(), "closed entries leave after the retention");
    }

    #[test]
    fn closed_orders_that_ended_fold_into_their_day_and_count_the_same() {
        let mut l = Ledger::default();
        let b = budget(100.0, Some(1000.0), 8);
        for (uid, day) in [("a", 3), ("b", 3), ("c", 4), ("running", 4)] {
            l.admit("ns", uid, entry(day, 1, 5.0), &b, |_| None).unwrap();
        }
        for (uid, spent) in [("a", 1.25), ("b", 2.0), ("c", 0.5)] {
            l.settle(uid, spent);
        }
        // "c" is closed but its order still runs its last pass: it stays until the order ends.
        let live = |uid: &str| match uid {
            "running" => Some(Live { spent_usd: 0.1, ended: false }),
            "c" => Some(Live { spent_usd: 0.5, ended: false }),
            _ => Some(Live { spent_usd: 0.0, ended: true }),
        };
        let before = (l.usage("x", at(3, 12), live), l.usage("x", at(4, 12), live));
        assert!(l.heal(at(4, 12), live));
        assert_eq!((l.usage("x", at(3, 12), live), l.usage("x", at(4, 12), live)), before);
        let data = l.to_data();
        assert_eq!(data.keys().cloned().collect::<Vec<_>>(), ["c", "closed.2026-11-03", "running"]);
        let day: Entry = serde_json::from_str(&data["closed.2026-11-03"]).unwrap();
        assert_eq!((day.spent_usd, day.orders, day.open), (3.25, 2, false));
        // Read back, the day's entry is an entry like any other; "c" folds once its order ended.
        let mut again = Ledger::from_data(Some(&data));
        assert!(again.heal(at(4, 13), |uid| (uid == "running").then_some(Live { spent_usd: 0.1, ended: false })));
        assert_eq!(again.entries.len(), 3, "running, and one entry per day");
        assert_eq!(again.usage("x", at(4, 13), |_| None).month_usd, before.1.month_usd);
        assert!(!again.heal(at(4, 14), |uid| (uid == "running").then_some(Live { spent_usd: 0.1, ended: false })));
    }

    #[test]
    fn a_hand_edited_value_survives_a_rewrite() {
        let data: BTreeMap<String, String> = [("note".to_owned(), "not json".to_owned())].into();
        let mut l = Ledger::from_data(Some(&data));
        l.admit("ns", "a", entry(3, 1, 1.0), &budget(10.0, None, 1), |_| None).unwrap();
        assert_eq!(l.to_data().get("note").map(String::as_str), Some("not json"));
    }
}

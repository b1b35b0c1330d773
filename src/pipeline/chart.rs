//! The hours an error alert's chart shows, read back from the usage rollups.
//!
//! Owns filling `evidence.hourly` of `error_spike` changes before they are queued. The error
//! detector keeps only minutes (its window), and keeping hours in it for every key and MCP
//! would cost memory for a picture drawn a few times a day; the rollup tables already hold
//! each subject's requests and errors per hour. So when a batch holds an error alert worth a
//! notification, its subject's last hours are summed from the store plus the batch not yet
//! committed, and each hour's expected errors are its requests at the baseline fraction the
//! detector judged against. It never decides anything about the alert: a store that cannot
//! answer only means an email without a picture.

use chrono::{DateTime, Duration, Utc};

use crate::notify::{AlertChange, ChangeKind};
use crate::store::{Batch, SegmentQuery, Store};
use crate::usage::{Counters, Granularity, SeriesKey};

/// Hours drawn, the alerting one included (as for rate alerts).
const CHART_HOURS: i64 = 12;

/// One error alert's subject as the rollups know it.
#[derive(Debug, Clone, PartialEq)]
enum ChartSubject {
    Key(String),
    Mcp(String),
}

/// Which of an hour's counters the alert's class counts.
type ClassCount = fn(&Counters) -> u64;

/// What `change` needs drawn: its subject and the counter its class counts, when it is an
/// error alert opened or raised without hours yet.
fn wants_chart(change: &AlertChange) -> Option<(ChartSubject, ClassCount)> {
    if change.alert_type != "error_spike"
        || matches!(change.kind, ChangeKind::Resolved)
        || change.evidence.get("hourly").is_some()
    {
        return None;
    }
    // `error_spike/<subject>/<facet>`; an MCP name may hold '/', a facet never does.
    let rest = change.fingerprint.strip_prefix("error_spike/")?;
    let (subject, facet) = rest.rsplit_once('/')?;
    let errors: ClassCount = match facet {
        "5xx" => |c| c.err_server,
        "auth" => |c| c.err_auth,
        "429" => |c| c.err_rate_limited,
        _ => return None,
    };
    let subject = if let Some(k) = subject.strip_prefix("key:") {
        ChartSubject::Key(k.to_owned())
    } else {
        ChartSubject::Mcp(subject.strip_prefix("mcp:")?.to_owned())
    };
    Some((subject, errors))
}

/// The series drawn from per-hour `(start, requests, errors)` sums ending with the hour of
/// `at`: one point an hour (empty hours as zero) from the subject's first hour with requests,
/// each expecting `baseline` of its requests to fail.
pub(crate) fn error_hours(
    at: DateTime<Utc>,
    sums: &[(i64, u64, u64)],
    baseline: f64,
) -> Vec<(i64, u32, Option<f64>)> {
    let last = Granularity::Hour.truncate(at).timestamp();
    let first = last - (CHART_HOURS - 1) * 3600;
    let mut hours: Vec<(i64, u64, u64)> =
        (0..CHART_HOURS).map(|i| (first + i * 3600, 0, 0)).collect();
    for &(start, requests, errors) in sums {
        if (first..=last).contains(&start) && start % 3600 == 0 {
            let h = &mut hours[((start - first) / 3600) as usize];
            h.1 += requests;
            h.2 += errors;
        }
    }
    let from = hours
        .iter()
        .position(|h| h.1 > 0)
        .unwrap_or(hours.len() - 1);
    hours[from..]
        .iter()
        .map(|&(start, requests, errors)| {
            (
                start,
                u32::try_from(errors).unwrap_or(u32::MAX),
                Some(requests as f64 * baseline),
            )
        })
        .collect()
}

/// Gives `change` an empty series: no chart, and no second attempt at one.
fn mark_without_chart(change: &mut AlertChange) {
    if let Some(ev) = change.evidence.as_object_mut() {
        ev.insert("hourly".into(), serde_json::json!([]));
    }
}

/// Fills the hours of every error alert in `batch` that is to be told and has none yet. When
/// the store cannot answer, the rest go without a chart rather than each waiting on it.
pub(crate) async fn fill(store: &Store, batch: &mut Batch) {
    let Batch {
        changes, rollup, ..
    } = batch;
    let mut unreachable = false;
    for change in changes.iter_mut() {
        let Some((subject, errors)) = wants_chart(change) else {
            continue;
        };
        let Some(baseline) = change.evidence.get("expected").and_then(|e| e.as_f64()) else {
            continue;
        };
        let until = Granularity::Hour.truncate(change.at) + Duration::hours(1);
        let from = until - Duration::hours(CHART_HOURS);
        let q = SegmentQuery {
            granularity: Granularity::Hour,
            from,
            until,
            org: None,
            key: match &subject {
                ChartSubject::Key(k) => Some(k.clone()),
                ChartSubject::Mcp(_) => None,
            },
            mcp: match &subject {
                ChartSubject::Mcp(m) => Some(m.clone()),
                ChartSubject::Key(_) => None,
            },
            mcps: None,
            by_key: false,
            by_org: false,
            by_mcp: false,
            by_bucket: true,
        };
        if unreachable {
            // Marked as drawn (with no hours, so no picture): a retried commit of this batch
            // does not wait on the store again for it.
            mark_without_chart(change);
            continue;
        }
        let stored = match store.usage_segment(&q).await {
            Ok(rows) => rows,
            Err(e) => {
                // The store is failing (the commit will say so and retry): do not wait on it
                // once per alert.
                tracing::debug!("no chart for {}: {e}", change.fingerprint);
                unreachable = true;
                mark_without_chart(change);
                continue;
            }
        };
        let mut sums: Vec<(i64, u64, u64)> = stored
            .iter()
            .filter_map(|a| {
                let start = a.bucket_start?.timestamp();
                Some((start, a.counters.requests, errors(&a.counters)))
            })
            .collect();
        let pending = |k: &SeriesKey| match &subject {
            ChartSubject::Key(id) => k.key_id.is_some_and(|u| u.to_string() == *id),
            ChartSubject::Mcp(m) => *k.mcp == **m,
        };
        sums.extend(
            rollup
                .series(Granularity::Hour)
                .iter()
                .filter(|(k, _)| k.bucket_start >= from && k.bucket_start < until && pending(k))
                .map(|(k, c)| (k.bucket_start.timestamp(), c.requests, errors(c))),
        );
        let hours = error_hours(change.at, &sums, baseline);
        if let Some(ev) = change.evidence.as_object_mut() {
            ev.insert("hourly".into(), serde_json::json!(hours));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn hours_start_at_the_first_with_requests_and_sum_committed_and_pending() {
        let t = at("2026-11-20T12:40:00Z");
        let h = |hh: i64| at("2026-11-20T00:00:00Z").timestamp() + hh * 3600;
        let sums = [
            (h(9), 100, 1),
            (h(10), 200, 2),
            // The alerting hour: part committed, part still in the batch.
            (h(12), 50, 30),
            (h(12), 10, 10),
            // Outside the drawn hours, or not an hour's start: ignored.
            (h(13), 999, 999),
            (h(11) + 60, 999, 999),
        ];
        let got = error_hours(t, &sums, 0.01);
        assert_eq!(
            got,
            vec![
                (h(9), 1, Some(1.0)),
                (h(10), 2, Some(2.0)),
                (h(11), 0, Some(0.0)),
                (h(12), 40, Some(0.6)),
            ]
        );
    }

    #[test]
    fn a_long_history_is_cut_to_the_last_twelve_hours() {
        let t = at("2026-11-20T23:59:59Z");
        let h = |hh: i64| at("2026-11-20T00:00:00Z").timestamp() + hh * 3600;
        let sums: Vec<_> = (0..24).map(|i| (h(i), 10, i as u64)).collect();
        let got = error_hours(t, &sums, 0.5);
        assert_eq!(got.len(), 12);
        assert_eq!(got[0], (h(12), 12, Some(5.0)));
        assert_eq!(got[11], (h(23), 23, Some(5.0)));
    }

    #[test]
    fn only_error_alerts_to_be_told_get_a_chart() {
        let change = |fp: &str, kind: ChangeKind, evidence: serde_json::Value| AlertChange {
            kind,
            fingerprint: fp.into(),
            alert_type: fp.split('/').next().unwrap().into(),
            severity: crate::detect::Severity::High,
            key_id: None,
            key_prefix: None,
            key_name: None,
            org_id: None,
            source_ip: None,
            started_at: at("2026-11-20T12:00:00Z"),
            at: at("2026-11-20T12:00:00Z"),
            summary: String::new(),
            evidence,
        };
        let ev = serde_json::json!({"expected": 0.01});
        let key = "error_spike/key:4b0c9d43-40f4-4ce1-9a3f-7bd7a6d1e9a0/5xx";
        let (s, f) = wants_chart(&change(key, ChangeKind::Opened, ev.clone())).unwrap();
        assert_eq!(
            s,
            ChartSubject::Key("4b0c9d43-40f4-4ce1-9a3f-7bd7a6d1e9a0".into())
        );
        let c = Counters {
            err_server: 7,
            err_auth: 1,
            ..Counters::default()
        };
        assert_eq!(f(&c), 7, "the 5xx class counts server errors");
        let (s, f) = wants_chart(&change(
            "error_spike/mcp:team/github/auth",
            ChangeKind::SeverityRaised,
            ev.clone(),
        ))
        .unwrap();
        assert_eq!(s, ChartSubject::Mcp("team/github".into()));
        assert_eq!(f(&c), 1);
        assert!(wants_chart(&change(key, ChangeKind::Resolved, ev.clone())).is_none());
        assert!(
            wants_chart(&change(
                key,
                ChangeKind::Opened,
                serde_json::json!({"expected": 0.01, "hourly": []})
            ))
            .is_none(),
            "filled once, not again on a retried commit"
        );
        assert!(wants_chart(&change("rate_spike/key:x", ChangeKind::Opened, ev)).is_none());
    }
}

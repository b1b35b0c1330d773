//! Alerts as reports show them: the filters both the CLI and the API take, checked against
//! the values that exist, and the page of alerts they select.
//!
//! Owns the list of valid statuses and severities for filtering; the store runs the query.

use crate::store::{AlertFilter, Store, StoreError, StoredAlert};

/// Alert statuses: raised by the detectors (`firing`, `resolved`) or set by a person.
pub const STATUSES: [&str; 4] = ["firing", "acknowledged", "resolved", "benign"];
/// Alert severities, lowest first.
pub const SEVERITIES: [&str; 5] = ["info", "low", "medium", "high", "critical"];

/// Why a filter value was refused, naming the valid ones.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} {value:?} is not one of {choices}")]
pub struct FilterError {
    pub field: &'static str,
    pub value: String,
    pub choices: String,
}

/// Checks the filter's status, type and severity against the values alerts can have.
pub fn check(f: &AlertFilter) -> Result<(), FilterError> {
    let types: Vec<&str> = crate::detect::AlertType::ALL
        .iter()
        .map(|t| t.as_str())
        .collect();
    for (field, value, choices) in [
        ("status", &f.status, &STATUSES[..]),
        ("type", &f.alert_type, &types[..]),
        ("severity", &f.severity, &SEVERITIES[..]),
    ] {
        if let Some(v) = value
            && !choices.contains(&v.as_str())
        {
            return Err(FilterError {
                field,
                value: v.clone(),
                choices: choices.join(", "),
            });
        }
    }
    Ok(())
}

/// The alerts `f` selects, oldest first.
pub async fn alerts(store: &Store, f: &AlertFilter) -> Result<Vec<StoredAlert>, StoreError> {
    store.alerts_matching(f).await
}

//! The HTTP receivers: a webhook (keywatch's signed JSON payload, or Slack's incoming-webhook
//! shape) and a Prometheus Alertmanager (`POST /api/v2/alerts`).
//!
//! Owns the payloads and how an HTTP answer maps to a delivery result: 2xx is delivered; 408,
//! 429, 5xx and network failures are retried; other answers are permanent. It only posts what a
//! [`Notification`] already holds and never reads the store.

use std::time::{SystemTime, UNIX_EPOCH};

use chrono::{DateTime, Utc};
use hmac::{KeyInit, Mac};
use serde_json::{Map, Value, json};

use super::config::{HttpSettings, WebhookFormat};
use super::{AlertChange, BoxFuture, DeliveryError, Notification, Receiver};

/// The header carrying the payload's signature: `sha256=` and the hex HMAC-SHA256, keyed with
/// the receiver's secret, of `{timestamp}.{body}`.
pub const SIGNATURE_HEADER: &str = "X-Keywatch-Signature";
/// The header carrying the Unix time the signature was made at, so a receiver can refuse
/// replays.
pub const TIMESTAMP_HEADER: &str = "X-Keywatch-Timestamp";
/// The notification's id, the same on every retry: a receiver can drop a duplicate by it.
pub const ID_HEADER: &str = "X-Keywatch-Notification-Id";

/// How long Alertmanager keeps a firing alert without hearing of it again. keywatch posts a
/// group's firing alerts with each of its notifications (every `repeat_interval`, 4 h by
/// default, at the latest) and posts `endsAt` when one resolves.
const ALERTMANAGER_HOLD: chrono::Duration = chrono::Duration::hours(24);

fn client(timeout: std::time::Duration) -> Result<reqwest::Client, String> {
    // lettre already brings rustls with ring; use the same provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .user_agent(concat!("keywatch/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("cannot build an HTTP client: {e}"))
}

/// Posts `body` as JSON and maps the answer.
async fn post(
    client: &reqwest::Client,
    url: &url::Url,
    body: Vec<u8>,
    headers: &[(&str, String)],
) -> Result<(), DeliveryError> {
    let mut req = client
        .post(url.clone())
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body);
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    let where_ = crate::store::redact_url(url.as_str());
    let resp = req
        .send()
        .await
        .map_err(|e| DeliveryError::Retryable(format!("POST {where_}: {}", error_chain(&e))))?;
    let status = resp.status();
    if status.is_success() {
        return Ok(());
    }
    let text = resp.text().await.unwrap_or_default();
    let text: String = text.chars().take(200).collect();
    let msg = format!("POST {where_} answered {status}: {}", text.trim());
    if status.is_server_error() || status.as_u16() == 429 || status.as_u16() == 408 {
        Err(DeliveryError::Retryable(msg))
    } else {
        Err(DeliveryError::Permanent(msg))
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(c) = source {
        s.push_str(": ");
        s.push_str(&c.to_string());
        source = c.source();
    }
    s
}

/// The signature header value of `body` at `timestamp`.
pub fn signature(secret: &str, timestamp: u64, body: &[u8]) -> String {
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes())
        .expect("HMAC takes a key of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

fn alert_json(a: &AlertChange, status: &str) -> Value {
    json!({
        "status": status,
        "change": a.kind.as_str(),
        "fingerprint": a.fingerprint,
        "type": a.alert_type,
        "severity": a.severity.as_str(),
        "key_id": a.key_id,
        "key_prefix": a.key_prefix,
        "org_id": a.org_id,
        "source_ip": a.source_ip,
        "started_at": a.started_at.to_rfc3339(),
        "at": a.at.to_rfc3339(),
        "summary": a.summary,
        "evidence": a.evidence,
    })
}

/// keywatch's webhook payload (documented in the README, "Webhook payload").
pub fn payload(n: &Notification) -> Value {
    let (labels, alerts, digest_of, firing) = match &n.draft {
        None => (Map::new(), vec![], 0, false),
        Some(d) => {
            let labels: Map<String, Value> = d
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                .collect();
            let alerts: Vec<Value> = d
                .new
                .iter()
                .map(|a| alert_json(a, "firing"))
                .chain(d.still_firing.iter().map(|a| alert_json(a, "firing")))
                .chain(d.resolved.iter().map(|a| alert_json(a, "resolved")))
                .collect();
            let firing = !d.new.is_empty() || !d.still_firing.is_empty();
            (labels, alerts, d.digest_of, firing)
        }
    };
    json!({
        "version": "1",
        "id": n.id,
        "receiver": n.receiver,
        "group_key": n.group_key,
        "group_labels": labels,
        "status": if n.draft.is_none() { "test" } else if firing { "firing" } else { "resolved" },
        "digest_of": digest_of,
        "subject": n.subject,
        "text": n.text,
        "created_at": n.created_at.to_rfc3339(),
        "alerts": alerts,
    })
}

/// Slack's mrkdwn takes `&`, `<` and `>` as markup; everything else is text.
fn slack_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The Slack-compatible payload: the subject in bold, then the plain-text part.
pub fn slack_payload(n: &Notification) -> Value {
    json!({
        "text": format!("*{}*\n{}", slack_escape(&n.subject), slack_escape(n.text.trim_end())),
    })
}

/// A webhook receiver.
pub struct Webhook {
    settings: HttpSettings,
    client: reqwest::Client,
}

impl Webhook {
    /// The receiver for `settings`.
    pub fn new(settings: HttpSettings) -> Result<Webhook, String> {
        let client =
            client(settings.timeout).map_err(|e| format!("receiver {:?}: {e}", settings.name))?;
        Ok(Webhook { settings, client })
    }
}

impl Receiver for Webhook {
    fn name(&self) -> &str {
        &self.settings.name
    }

    fn deliver<'a>(&'a self, n: &'a Notification) -> BoxFuture<'a, Result<(), DeliveryError>> {
        Box::pin(async move {
            let body = match self.settings.format {
                WebhookFormat::Json => payload(n),
                WebhookFormat::Slack => slack_payload(n),
            };
            let body = serde_json::to_vec(&body).expect("a JSON value serializes");
            let mut headers = vec![(ID_HEADER, n.id.to_string())];
            if let Some(secret) = &self.settings.secret {
                let ts = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                headers.push((TIMESTAMP_HEADER, ts.to_string()));
                headers.push((SIGNATURE_HEADER, signature(secret, ts, &body)));
            }
            post(&self.client, &self.settings.url, body, &headers).await
        })
    }
}

/// The alerts of `n` as Alertmanager takes them (`postableAlerts`). Labels are the alert's
/// identity (`alertname`, `fingerprint`, `severity`, `org`, `key`); the summary and evidence go
/// in annotations, so a changing summary does not make a new alert.
pub fn alertmanager_alerts(n: &Notification, now: DateTime<Utc>) -> Value {
    let Some(d) = &n.draft else {
        // A test message: one alert that resolves at once.
        return json!([{
            "labels": {"alertname": "keywatch_test", "source": "keywatch"},
            "annotations": {"summary": n.subject},
            "startsAt": now.to_rfc3339(),
            "endsAt": now.to_rfc3339(),
        }]);
    };
    let one = |a: &AlertChange, firing: bool| {
        let mut labels = Map::new();
        labels.insert("alertname".into(), json!(a.alert_type));
        labels.insert("source".into(), json!("keywatch"));
        labels.insert("fingerprint".into(), json!(a.fingerprint));
        labels.insert("severity".into(), json!(a.severity.as_str()));
        if let Some(o) = &a.org_id {
            labels.insert("org".into(), json!(o));
        }
        if let Some(k) = &a.key_prefix {
            labels.insert("key".into(), json!(k));
        }
        let ends = if firing {
            now + ALERTMANAGER_HOLD
        } else {
            a.at
        };
        json!({
            "labels": labels,
            "annotations": {
                "summary": a.summary,
                "evidence": a.evidence.to_string(),
                "report": "keywatch report alerts --since 24h",
            },
            "startsAt": a.started_at.to_rfc3339(),
            "endsAt": ends.to_rfc3339(),
        })
    };
    Value::Array(
        d.new
            .iter()
            .chain(&d.still_firing)
            .map(|a| one(a, true))
            .chain(d.resolved.iter().map(|a| one(a, false)))
            .collect(),
    )
}

/// An Alertmanager receiver.
pub struct Alertmanager {
    settings: HttpSettings,
    endpoint: url::Url,
    client: reqwest::Client,
}

impl Alertmanager {
    /// The receiver for `settings`, posting to `{url}/api/v2/alerts`.
    pub fn new(settings: HttpSettings) -> Result<Alertmanager, String> {
        let base = settings.url.as_str().trim_end_matches('/');
        let endpoint = url::Url::parse(&format!("{base}/api/v2/alerts"))
            .map_err(|e| format!("receiver {:?}: {e}", settings.name))?;
        let client =
            client(settings.timeout).map_err(|e| format!("receiver {:?}: {e}", settings.name))?;
        Ok(Alertmanager {
            settings,
            endpoint,
            client,
        })
    }
}

impl Receiver for Alertmanager {
    fn name(&self) -> &str {
        &self.settings.name
    }

    fn deliver<'a>(&'a self, n: &'a Notification) -> BoxFuture<'a, Result<(), DeliveryError>> {
        Box::pin(async move {
            let body = serde_json::to_vec(&alertmanager_alerts(n, Utc::now()))
                .expect("a JSON value serializes");
            post(&self.client, &self.endpoint, body, &[]).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::Severity;
    use crate::notify::ChangeKind;
    use crate::notify::group::Draft;
    use crate::notify::test_support::change;

    fn notification() -> Notification {
        let mut a = change("rate_spike", Severity::High, ChangeKind::Opened);
        a.summary = "<b>1200 req/min</b> & rising".into();
        let mut r = change("new_country", Severity::Medium, ChangeKind::Resolved);
        r.fingerprint = "new_country/key:k1".into();
        let d = Draft {
            receiver: "hook".into(),
            route: String::new(),
            group_key: "g".into(),
            labels: vec![("org".into(), "o".into())],
            new: vec![a],
            still_firing: vec![],
            resolved: vec![r],
            digest_of: 0,
        };
        crate::notify::render::render(&d, Utc::now())
    }

    #[test]
    fn the_signature_is_hmac_sha256_of_timestamp_dot_body() {
        // RFC 4231 style check against an independently computed value:
        // printf '1700000000.{}' | openssl dgst -sha256 -hmac secret
        assert_eq!(
            signature("secret", 1_700_000_000, b"{}"),
            "sha256=b8569b78799ff9e3cbff0fc2d63a33a2b57f3282abd07c37ae5e8e7d79a5f163"
        );
    }

    #[test]
    fn the_payload_lists_firing_and_resolved_alerts() {
        let n = notification();
        let p = payload(&n);
        assert_eq!(p["status"], "firing");
        assert_eq!(p["group_labels"]["org"], "o");
        let alerts = p["alerts"].as_array().unwrap();
        assert_eq!(alerts.len(), 2);
        assert_eq!(alerts[0]["status"], "firing");
        assert_eq!(alerts[0]["type"], "rate_spike");
        assert_eq!(alerts[1]["status"], "resolved");
        assert_eq!(p["id"], n.id.to_string());
    }

    #[test]
    fn slack_text_escapes_its_markup() {
        let s = slack_payload(&notification());
        let text = s["text"].as_str().unwrap();
        assert!(text.starts_with("*[keywatch] HIGH rate spike"), "{text}");
        assert!(
            text.contains("&lt;b&gt;1200 req/min&lt;/b&gt; &amp; rising"),
            "{text}"
        );
        assert!(!text.contains("<b>"));
    }

    #[test]
    fn alertmanager_alerts_end_when_resolved() {
        let n = notification();
        let now = Utc::now();
        let v = alertmanager_alerts(&n, now);
        let a = v.as_array().unwrap();
        assert_eq!(a[0]["labels"]["alertname"], "rate_spike");
        assert_eq!(a[0]["labels"]["severity"], "high");
        let ends: DateTime<Utc> = a[0]["endsAt"].as_str().unwrap().parse().unwrap();
        assert!(ends > now + chrono::Duration::hours(1));
        let ends: DateTime<Utc> = a[1]["endsAt"].as_str().unwrap().parse().unwrap();
        assert!(ends <= now);
    }
}

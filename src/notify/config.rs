//! The delivery part of `alerts.toml`: `[delivery]`, `[[receivers]]`, `[route]`, `[[routes]]`
//! and `[[silences]]`, as raw serde structs (unknown keys are errors), and the checks that turn
//! them into [`NotifySettings`]. `crate::config` places each mistake at its line and column.
//!
//! Secrets never appear in the file: a receiver names the environment variables that hold its
//! server URL, password and addresses, and they are read only by [`NotifySettings::resolve`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::route::{Matchers, Route, Router};
use super::silence::Silence;

/// `[delivery]`: the sender's retry policy.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DeliveryRaw {
    /// The first retry waits this long; each later one twice as long, with jitter.
    pub retry_initial: String,
    /// The longest wait between two attempts.
    pub retry_max: String,
    /// A notification not delivered this long after it was queued is marked failed.
    pub give_up_after: String,
    /// Connecting, and a whole SMTP exchange or HTTP request, time out after this.
    pub timeout: String,
}

impl Default for DeliveryRaw {
    fn default() -> DeliveryRaw {
        DeliveryRaw {
            retry_initial: "30s".into(),
            retry_max: "1h".into(),
            give_up_after: "24h".into(),
            timeout: "30s".into(),
        }
    }
}

/// The kinds of receiver keywatch can deliver to.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ReceiverKind {
    Email,
    /// A JSON POST, signed with HMAC-SHA256 (or Slack's incoming-webhook shape).
    Webhook,
    /// A Prometheus Alertmanager's `/api/v2/alerts`.
    Alertmanager,
}

impl ReceiverKind {
    fn as_str(self) -> &'static str {
        match self {
            ReceiverKind::Email => "email",
            ReceiverKind::Webhook => "webhook",
            ReceiverKind::Alertmanager => "alertmanager",
        }
    }
}

/// What a webhook receiver posts.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum WebhookFormat {
    /// keywatch's documented payload (README, "Webhook payload").
    #[default]
    Json,
    /// `{"text": ...}`, which Slack-compatible incoming webhooks take.
    Slack,
}

/// How an email receiver protects its SMTP connection.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum StartTls {
    /// STARTTLS, and refuse a server that does not offer it.
    #[default]
    Required,
    /// STARTTLS when the server offers it.
    Opportunistic,
    /// TLS from the first byte (port 465).
    Implicit,
    /// No TLS: only for a relay on loopback.
    None,
}

/// `[[receivers]]`: where notifications go.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ReceiverRaw {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: ReceiverKind,
    /// Email: the SMTP server as a URL (`smtp://user@host:587`, `smtps://host:465`).
    /// Webhook: the URL to POST to. Alertmanager: its base URL (`http://am:9093`).
    pub url: Option<String>,
    /// The environment variable holding that URL; for email, unset or empty means the mailbox
    /// file.
    pub url_env: Option<String>,
    /// Webhook: the environment variable holding the HMAC-SHA256 signing secret.
    pub secret_env: Option<String>,
    /// Webhook: the payload's shape.
    #[serde(default)]
    pub format: WebhookFormat,
    pub host: Option<String>,
    pub port: Option<u16>,
    #[serde(default)]
    pub starttls: StartTls,
    pub username: Option<String>,
    /// A PEM file of certificate authorities to trust for this server, besides the system's
    /// (a relay with a certificate from an internal CA).
    pub ca_file: Option<PathBuf>,
    /// The environment variable holding the SMTP password.
    pub password_env: Option<String>,
    pub from: Option<String>,
    pub from_env: Option<String>,
    #[serde(default)]
    pub to: Vec<String>,
    /// The environment variable holding the recipients, comma-separated.
    pub to_env: Option<String>,
    /// Where messages go when no server is configured (mbox format).
    #[serde(default = "default_mailbox")]
    pub mailbox: String,
    /// Notifications per hour; above it, one digest.
    #[serde(default = "default_rate_limit")]
    pub rate_limit_per_hour: u32,
}

fn default_mailbox() -> String {
    "keywatch-alerts.mbox".into()
}

fn default_rate_limit() -> u32 {
    20
}

/// The receivers when the file has none: the shipped file's one email receiver.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(transparent)]
pub struct Receivers(pub Vec<ReceiverRaw>);

impl Default for Receivers {
    fn default() -> Receivers {
        Receivers(vec![ReceiverRaw {
            name: "email".into(),
            kind: ReceiverKind::Email,
            url: None,
            url_env: Some("KEYWATCH_SMTP_URL".into()),
            secret_env: None,
            format: WebhookFormat::Json,
            host: None,
            port: None,
            starttls: StartTls::Required,
            username: None,
            ca_file: None,
            password_env: Some("KEYWATCH_SMTP_PASSWORD".into()),
            from: None,
            from_env: Some("KEYWATCH_ALERT_FROM".into()),
            to: vec![],
            to_env: Some("KEYWATCH_ALERT_TO".into()),
            mailbox: default_mailbox(),
            rate_limit_per_hour: default_rate_limit(),
        }])
    }
}

/// `[route]` (the default route) and each of `[[routes]]`.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct RouteRaw {
    /// The receiver; the default route's default is the first receiver.
    pub receiver: Option<String>,
    /// Alert types this route takes (empty: any).
    pub types: Vec<String>,
    /// Severities this route takes (empty: any).
    pub severities: Vec<String>,
    /// Organization ids (empty: any).
    pub orgs: Vec<String>,
    /// Key ids or prefixes (empty: any).
    pub keys: Vec<String>,
    /// Keep matching the routes after this one.
    #[serde(rename = "continue")]
    pub continue_matching: bool,
    /// Labels whose values make a group (`org`, `type`, `key`, `severity`, `fingerprint`).
    pub group_by: Option<Vec<String>>,
    pub group_wait: Option<String>,
    pub group_interval: Option<String>,
    pub repeat_interval: Option<String>,
    pub send_resolved: Option<bool>,
    /// Email receivers: addresses that replace the receiver's `to` for this route.
    pub to: Option<Vec<String>>,
    /// Email receivers: also send to the address the alert's organization stored.
    pub to_org: Option<bool>,
}

/// `[[silences]]`: alerts matching these are recorded but not sent, until `expires`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SilenceRaw {
    #[serde(default)]
    pub types: Vec<String>,
    #[serde(default)]
    pub severities: Vec<String>,
    #[serde(default)]
    pub orgs: Vec<String>,
    #[serde(default)]
    pub keys: Vec<String>,
    pub expires: toml::value::Datetime,
    #[serde(default)]
    pub reason: String,
}

/// A mistake in the delivery settings: where it is (a path of keys from the root) and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotifyConfigError {
    /// For example `["routes", "1", "receiver"]`.
    pub path: Vec<String>,
    pub message: String,
}

/// Labels a route may group by.
pub const GROUP_LABELS: [&str; 5] = ["org", "type", "key", "severity", "fingerprint"];

/// Validated delivery settings.
#[derive(Debug, Clone, PartialEq)]
pub struct NotifySettings {
    pub retry_initial: Duration,
    pub retry_max: Duration,
    pub give_up_after: Duration,
    pub timeout: Duration,
    pub receivers: Vec<ReceiverRaw>,
    pub router: Router,
    /// Silences from the file (the database holds more).
    pub silences: Vec<Silence>,
}

/// One email receiver with its environment read.
#[derive(Debug, Clone, PartialEq)]
pub struct EmailSettings {
    pub name: String,
    /// `None`: write to `mailbox`.
    pub server: Option<SmtpServer>,
    pub from: String,
    pub to: Vec<String>,
    pub mailbox: PathBuf,
    pub rate_limit_per_hour: u32,
    pub timeout: Duration,
}

/// A webhook or Alertmanager receiver with its environment read.
#[derive(Clone, PartialEq)]
pub struct HttpSettings {
    pub name: String,
    pub url: url::Url,
    /// The HMAC-SHA256 key the payload is signed with (webhooks).
    pub secret: Option<String>,
    pub format: WebhookFormat,
    pub timeout: Duration,
}

impl std::fmt::Debug for HttpSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpSettings")
            .field("name", &self.name)
            .field("url", &crate::store::redact_url(self.url.as_str()))
            .field("secret", &self.secret.as_ref().map(|_| "***"))
            .field("format", &self.format)
            .finish()
    }
}

/// One receiver, ready to build.
#[derive(Debug, Clone, PartialEq)]
pub enum ReceiverSettings {
    Email(EmailSettings),
    Webhook(HttpSettings),
    Alertmanager(HttpSettings),
}

/// `s` as an http(s) URL, or why not.
fn http_url(s: &str) -> Result<url::Url, String> {
    let u = url::Url::parse(s)
        .map_err(|e| format!("{} is not a URL: {e}", crate::store::redact_url(s)))?;
    if !matches!(u.scheme(), "http" | "https") {
        return Err(format!(
            "the URL must start with http:// or https://, not {}://",
            u.scheme()
        ));
    }
    Ok(u)
}

/// Where and how to reach an SMTP server.
#[derive(Clone, PartialEq)]
pub struct SmtpServer {
    /// A lettre connection URL, without a password.
    pub url: String,
    pub username: Option<String>,
    pub password: Option<String>,
    /// Extra certificate authorities to trust (PEM).
    pub ca_file: Option<PathBuf>,
}

impl std::fmt::Debug for SmtpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpServer")
            .field("url", &crate::store::redact_url(&self.url))
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

fn duration(path: &[&str], s: &str) -> Result<Duration, NotifyConfigError> {
    crate::cli::parse_duration(s).map_err(|message| NotifyConfigError {
        path: path.iter().map(|p| p.to_string()).collect(),
        message,
    })
}

fn err(path: &[&str], message: String) -> NotifyConfigError {
    NotifyConfigError {
        path: path.iter().map(|p| p.to_string()).collect(),
        message,
    }
}

fn matchers(
    path: &[&str],
    types: &[String],
    severities: &[String],
    orgs: &[String],
    keys: &[String],
) -> Result<Matchers, Vec<NotifyConfigError>> {
    let mut errors = Vec::new();
    let mut m = Matchers {
        orgs: orgs.to_vec(),
        keys: keys.to_vec(),
        ..Matchers::default()
    };
    for t in types {
        match crate::detect::AlertType::parse(t) {
            Some(_) => m.types.push(t.clone()),
            None => errors.push(err(
                &[path, &["types"]].concat(),
                format!(
                    "unknown alert type {t:?}; valid types: {}",
                    crate::detect::AlertType::ALL.map(|t| t.as_str()).join(", ")
                ),
            )),
        }
    }
    for s in severities {
        match super::route::parse_severity(s) {
            Some(sev) => m.severities.push(sev),
            None => errors.push(err(
                &[path, &["severities"]].concat(),
                format!(
                    "unknown severity {s:?}; valid severities: info, low, medium, high, critical"
                ),
            )),
        }
    }
    if errors.is_empty() {
        Ok(m)
    } else {
        Err(errors)
    }
}

impl NotifySettings {
    /// Checks every delivery setting and cross-reference; returns every mistake at once.
    pub fn check(
        delivery: &DeliveryRaw,
        receivers: &Receivers,
        default_route: &RouteRaw,
        routes: &[RouteRaw],
        silences: &[SilenceRaw],
    ) -> Result<NotifySettings, Vec<NotifyConfigError>> {
        let mut errors = Vec::new();
        let mut dur = |path: &[&str], s: &str, default: Duration| match duration(path, s) {
            Ok(d) => d,
            Err(e) => {
                errors.push(e);
                default
            }
        };
        let retry_initial = dur(
            &["delivery", "retry_initial"],
            &delivery.retry_initial,
            Duration::from_secs(30),
        );
        let retry_max = dur(
            &["delivery", "retry_max"],
            &delivery.retry_max,
            Duration::from_secs(3600),
        );
        let give_up_after = dur(
            &["delivery", "give_up_after"],
            &delivery.give_up_after,
            Duration::from_secs(86_400),
        );
        let timeout = dur(
            &["delivery", "timeout"],
            &delivery.timeout,
            Duration::from_secs(30),
        );
        let mut names: Vec<&str> = Vec::new();
        for (i, r) in receivers.0.iter().enumerate() {
            let idx = i.to_string();
            if names.contains(&r.name.as_str()) {
                errors.push(err(
                    &["receivers", &idx, "name"],
                    format!("receiver {:?} is defined twice", r.name),
                ));
            }
            names.push(&r.name);
            let ways = [r.url.is_some(), r.url_env.is_some(), r.host.is_some()]
                .iter()
                .filter(|b| **b)
                .count();
            if ways > 1 {
                errors.push(err(
                    &["receivers", &idx],
                    format!(
                        "receiver {:?}: give one of url, url_env or host, not several",
                        r.name
                    ),
                ));
            }
            if r.kind != ReceiverKind::Email {
                if r.url.is_none() && r.url_env.is_none() {
                    errors.push(err(
                        &["receivers", &idx],
                        format!(
                            "receiver {:?}: a {} receiver needs url or url_env",
                            r.name,
                            r.kind.as_str()
                        ),
                    ));
                }
                if let Some(u) = &r.url
                    && let Err(e) = http_url(u)
                {
                    errors.push(err(&["receivers", &idx, "url"], e));
                }
                for (field, set) in [
                    ("host", r.host.is_some()),
                    ("port", r.port.is_some()),
                    ("username", r.username.is_some()),
                    ("password_env", r.password_env.is_some()),
                    ("ca_file", r.ca_file.is_some()),
                    ("from", r.from.is_some()),
                    ("from_env", r.from_env.is_some()),
                    ("to", !r.to.is_empty()),
                    ("to_env", r.to_env.is_some()),
                ] {
                    if set {
                        errors.push(err(
                            &["receivers", &idx, field],
                            format!(
                                "{field} applies to email receivers only, and {:?} is a {} receiver",
                                r.name,
                                r.kind.as_str()
                            ),
                        ));
                    }
                }
            }
            if r.kind != ReceiverKind::Webhook
                && (r.secret_env.is_some() || r.format != WebhookFormat::Json)
            {
                errors.push(err(
                    &["receivers", &idx],
                    format!(
                        "receiver {:?}: secret_env and format apply to webhook receivers only",
                        r.name
                    ),
                ));
            }
            if r.rate_limit_per_hour == 0 {
                errors.push(err(
                    &["receivers", &idx, "rate_limit_per_hour"],
                    "rate_limit_per_hour must be at least 1".into(),
                ));
            }
            for (field, v) in [
                ("url_env", &r.url_env),
                ("password_env", &r.password_env),
                ("from_env", &r.from_env),
                ("to_env", &r.to_env),
                ("secret_env", &r.secret_env),
            ] {
                if let Some(v) = v
                    && (v.is_empty() || !v.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
                {
                    // A secret put here by mistake is not quoted back into logs and terminals.
                    let shown = if matches!(field, "password_env" | "secret_env") {
                        "a value with other characters than letters, digits and _".to_owned()
                    } else {
                        format!("{v:?}")
                    };
                    errors.push(err(
                        &["receivers", &idx, field],
                        format!(
                            "{field} names an environment variable (like KEYWATCH_SMTP_PASSWORD), not {shown}; never put the secret itself in the file"
                        ),
                    ));
                }
            }
        }
        let valid_receivers = || {
            names
                .iter()
                .map(|n| format!("{n:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let build_route = |path: &[&str],
                           raw: &RouteRaw,
                           parent: Option<&Route>,
                           errors: &mut Vec<NotifyConfigError>|
         -> Option<Route> {
            let receiver = match (&raw.receiver, parent) {
                (Some(r), _) => r.clone(),
                (None, Some(p)) if path.len() == 1 => p.receiver.clone(),
                (None, Some(_)) => {
                    errors.push(err(path, "a route needs a receiver".into()));
                    return None;
                }
                (None, None) => names.first().map(|s| s.to_string()).unwrap_or_default(),
            };
            if !names.contains(&receiver.as_str()) {
                errors.push(err(
                    &[path, &["receiver"]].concat(),
                    format!(
                        "undefined receiver {receiver:?} used in route; defined receivers: {}",
                        valid_receivers()
                    ),
                ));
            }
            let m = match matchers(path, &raw.types, &raw.severities, &raw.orgs, &raw.keys) {
                Ok(m) => m,
                Err(es) => {
                    errors.extend(es);
                    Matchers::default()
                }
            };
            let group_by = raw
                .group_by
                .clone()
                .or_else(|| parent.map(|p| p.group_by.clone()))
                .unwrap_or_else(|| vec!["org".into(), "type".into()]);
            // Inherited labels were checked where they were written.
            for g in raw.group_by.iter().flatten() {
                if !GROUP_LABELS.contains(&g.as_str()) {
                    errors.push(err(
                        &[path, &["group_by"]].concat(),
                        format!(
                            "cannot group by {g:?}; valid labels: {}",
                            GROUP_LABELS.join(", ")
                        ),
                    ));
                }
            }
            let mut d =
                |field: &str, v: &Option<String>, inherit: Option<Duration>, def: u64| match v {
                    Some(s) => match duration(&[path, &[field]].concat(), s) {
                        Ok(d) => d,
                        Err(e) => {
                            errors.push(e);
                            Duration::from_secs(def)
                        }
                    },
                    None => inherit.unwrap_or(Duration::from_secs(def)),
                };
            let group_wait = d(
                "group_wait",
                &raw.group_wait,
                parent.map(|p| p.group_wait),
                30,
            );
            let group_interval = d(
                "group_interval",
                &raw.group_interval,
                parent.map(|p| p.group_interval),
                300,
            );
            let repeat_interval = d(
                "repeat_interval",
                &raw.repeat_interval,
                parent.map(|p| p.repeat_interval),
                4 * 3600,
            );
            let to = raw
                .to
                .clone()
                .or_else(|| parent.map(|p| p.to.clone()))
                .unwrap_or_default();
            let to_org = raw.to_org.or(parent.map(|p| p.to_org)).unwrap_or(false);
            for a in raw.to.iter().flatten() {
                if let Err(e) = a.parse::<lettre::message::Mailbox>() {
                    errors.push(err(
                        &[path, &["to"]].concat(),
                        format!("{a:?} is not an email address: {e}"),
                    ));
                }
            }
            let is_email = receivers
                .0
                .iter()
                .any(|r| r.name == receiver && r.kind == ReceiverKind::Email);
            if (!to.is_empty() || to_org) && !is_email && (raw.to.is_some() || raw.to_org.is_some())
            {
                errors.push(err(
                    path,
                    format!(
                        "to and to_org apply to email receivers only, and {receiver:?} is not one"
                    ),
                ));
            }
            if to_org
                && !group_by
                    .iter()
                    .any(|g| g == "org" || g == "key" || g == "fingerprint")
            {
                errors.push(err(
                    &[path, &["group_by"]].concat(),
                    "a route with to_org = true must group by org (or key, or fingerprint), so that one organization's alerts never reach another's address".into(),
                ));
            }
            Some(Route {
                receiver,
                to,
                to_org,
                matchers: m,
                continue_matching: raw.continue_matching,
                group_by,
                group_wait,
                group_interval,
                repeat_interval,
                send_resolved: raw
                    .send_resolved
                    .or(parent.map(|p| p.send_resolved))
                    .unwrap_or(true),
            })
        };
        let default = build_route(&["route"], default_route, None, &mut errors);
        if !default_route.types.is_empty()
            || !default_route.severities.is_empty()
            || !default_route.orgs.is_empty()
            || !default_route.keys.is_empty()
        {
            errors.push(err(
                &["route"],
                "the default route takes every alert no other route took; put matchers in [[routes]]".into(),
            ));
        }
        let mut children = Vec::new();
        for (i, r) in routes.iter().enumerate() {
            let idx = i.to_string();
            if let Some(route) = build_route(&["routes", &idx], r, default.as_ref(), &mut errors) {
                children.push(route);
            }
        }
        let mut file_silences = Vec::new();
        for (i, s) in silences.iter().enumerate() {
            let idx = i.to_string();
            let m = match matchers(
                &["silences", &idx],
                &s.types,
                &s.severities,
                &s.orgs,
                &s.keys,
            ) {
                Ok(m) => m,
                Err(es) => {
                    errors.extend(es);
                    continue;
                }
            };
            let expires: Option<DateTime<Utc>> = s
                .expires
                .to_string()
                .parse::<DateTime<chrono::FixedOffset>>()
                .ok()
                .map(|t| t.with_timezone(&Utc));
            let Some(expires_at) = expires else {
                errors.push(err(
                    &["silences", &idx, "expires"],
                    format!(
                        "expires must be a date and time with its offset, like 2027-01-31T00:00:00Z, not {}",
                        s.expires
                    ),
                ));
                continue;
            };
            if m.is_empty() {
                errors.push(err(
                    &["silences", &idx],
                    "a silence needs at least one matcher (types, severities, orgs or keys)".into(),
                ));
                continue;
            }
            file_silences.push(Silence {
                id: format!("alerts.toml#{i}"),
                matchers: m,
                reason: s.reason.clone(),
                expires_at,
            });
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(NotifySettings {
            retry_initial,
            retry_max,
            give_up_after,
            timeout,
            receivers: receivers.0.clone(),
            router: Router {
                default: default.unwrap_or_default(),
                routes: children,
            },
            silences: file_silences,
        })
    }

    /// Reads the environment the receivers name. `mailbox_dir` is where relative mailbox paths
    /// go (the working directory, or the demo's directory).
    pub fn resolve(
        &self,
        env: &dyn Fn(&str) -> Option<String>,
        mailbox_dir: &Path,
    ) -> Result<Vec<ReceiverSettings>, String> {
        let get = |v: &Option<String>| v.as_deref().and_then(env).filter(|s| !s.trim().is_empty());
        let mut out = Vec::new();
        for r in &self.receivers {
            if r.kind != ReceiverKind::Email {
                let url = r.url.clone().or_else(|| get(&r.url_env)).ok_or_else(|| {
                    format!(
                        "receiver {:?}: the environment variable {} that holds its URL is not set",
                        r.name,
                        r.url_env.as_deref().unwrap_or_default()
                    )
                })?;
                let url = http_url(&url).map_err(|e| format!("receiver {:?}: {e}", r.name))?;
                let http = HttpSettings {
                    name: r.name.clone(),
                    url,
                    secret: get(&r.secret_env),
                    format: r.format,
                    timeout: self.timeout,
                };
                if r.secret_env.is_some() && http.secret.is_none() {
                    return Err(format!(
                        "receiver {:?}: the environment variable {} that holds its signing secret is not set",
                        r.name,
                        r.secret_env.as_deref().unwrap_or_default()
                    ));
                }
                out.push(match r.kind {
                    ReceiverKind::Alertmanager => ReceiverSettings::Alertmanager(http),
                    _ => ReceiverSettings::Webhook(http),
                });
                continue;
            }
            let url = match (&r.url, get(&r.url_env), &r.host) {
                (Some(u), _, _) => Some(u.clone()),
                (None, Some(u), _) => Some(u),
                (None, None, Some(h)) => Some(format!(
                    "{}://{h}:{}",
                    if r.starttls == StartTls::Implicit {
                        "smtps"
                    } else {
                        "smtp"
                    },
                    r.port.unwrap_or(match r.starttls {
                        StartTls::Implicit => 465,
                        StartTls::None => 25,
                        _ => 587,
                    })
                )),
                _ => None,
            };
            let server = match url {
                Some(u) => Some(smtp_server(&u, r, get(&r.password_env))?),
                None => None,
            };
            let from = r
                .from
                .clone()
                .or_else(|| get(&r.from_env))
                .unwrap_or_else(|| "keywatch <keywatch@localhost>".into());
            let mut to: Vec<String> = r.to.clone();
            if let Some(list) = get(&r.to_env) {
                to.extend(
                    list.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned),
                );
            }
            if to.is_empty() {
                to.push("security@localhost".into());
            }
            for a in std::iter::once(&from).chain(&to) {
                a.parse::<lettre::message::Mailbox>().map_err(|e| {
                    format!("receiver {:?}: {a:?} is not an email address: {e}", r.name)
                })?;
            }
            let mailbox = PathBuf::from(&r.mailbox);
            out.push(ReceiverSettings::Email(EmailSettings {
                name: r.name.clone(),
                server,
                from,
                to,
                mailbox: if mailbox.is_absolute() {
                    mailbox
                } else {
                    mailbox_dir.join(mailbox)
                },
                rate_limit_per_hour: r.rate_limit_per_hour,
                timeout: self.timeout,
            }));
        }
        Ok(out)
    }
}

/// The server of `url`, with the receiver's TLS choice applied where the URL does not make one:
/// `smtp://` without `tls=` gets `tls=required` (or `opportunistic`) unless the host is loopback
/// or `starttls = "none"`.
fn smtp_server(url: &str, r: &ReceiverRaw, password: Option<String>) -> Result<SmtpServer, String> {
    let mut u = url::Url::parse(url).map_err(|e| {
        format!(
            "receiver {:?}: the SMTP URL {} is not a URL: {e}",
            r.name,
            crate::store::redact_url(url)
        )
    })?;
    if !matches!(u.scheme(), "smtp" | "smtps") {
        return Err(format!(
            "receiver {:?}: the SMTP URL must start with smtp:// or smtps://, not {}://",
            r.name,
            u.scheme()
        ));
    }
    let loopback = matches!(u.host_str(), Some("localhost" | "127.0.0.1" | "[::1]"));
    let says_tls = u.query_pairs().any(|(k, _)| k == "tls");
    if u.scheme() == "smtp" && !says_tls && !loopback {
        match r.starttls {
            StartTls::Required => {
                u.query_pairs_mut().append_pair("tls", "required");
            }
            StartTls::Opportunistic => {
                u.query_pairs_mut().append_pair("tls", "opportunistic");
            }
            StartTls::Implicit | StartTls::None => {}
        }
    }
    let username = Some(u.username().to_owned())
        .filter(|s| !s.is_empty())
        .or_else(|| r.username.clone());
    let password = u.password().map(str::to_owned).or(password);
    let _ = u.set_username("");
    let _ = u.set_password(None);
    Ok(SmtpServer {
        url: u.to_string(),
        username,
        password,
        ca_file: r.ca_file.clone(),
    })
}

/// Serialisable matchers, for silences stored in the database.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct StoredMatchers {
    #[serde(default)]
    pub types: Vec<String>,
    #[serde(default)]
    pub severities: Vec<String>,
    #[serde(default)]
    pub orgs: Vec<String>,
    #[serde(default)]
    pub keys: Vec<String>,
}

impl StoredMatchers {
    /// Checks the matchers (as `keywatch silence add` takes them).
    pub fn check(&self) -> Result<Matchers, String> {
        matchers(&[], &self.types, &self.severities, &self.orgs, &self.keys).map_err(|es| {
            es.into_iter()
                .map(|e| e.message)
                .collect::<Vec<_>>()
                .join("; ")
        })
    }
}

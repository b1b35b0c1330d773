//! The alerting configuration file (`alerts.toml`), loaded in two phases: raw serde structs
//! that reject unknown keys, then validated settings.
//!
//! Owns what the file may say and the wording of every mistake in it (with line and column).
//! It never reads the environment for anything but the variables the file names.

use std::ops::Range;
use std::path::Path;

use serde::Deserialize;

use crate::detect::Settings;
use crate::detect::allow::{AllowRule, Allowlist};
use crate::notify::NotifySettings;
use crate::notify::config::{DeliveryRaw, Receivers, RouteRaw, SilenceRaw};

/// What `alerts.toml` holds: the detector settings and the allowlists. `deny_unknown_fields`
/// everywhere keeps a misspelt setting from being ignored silently.
#[derive(Debug, Default, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AlertsConfig {
    /// `[detectors.rate]`, `[detectors.location]`, ...: one table per detector family.
    pub detectors: Settings,
    /// `[[allow]]`: known-good places per key or organization.
    pub allow: Vec<AllowRule>,
    /// `[delivery]`: how the sender retries.
    pub delivery: DeliveryRaw,
    /// `[[receivers]]`: where notifications go (default: one email receiver configured by
    /// the environment).
    pub receivers: Receivers,
    /// `[route]`: the default route, and the timing every route inherits.
    pub route: RouteRaw,
    /// `[[routes]]`: routes tried in order before the default one.
    pub routes: Vec<RouteRaw>,
    /// `[[silences]]`: alerts recorded but not sent, until each silence expires.
    pub silences: Vec<SilenceRaw>,
}

/// Largest alerts file read: the path may name anything (a FIFO, `/dev/zero`), so it is
/// never read without a bound.
const MAX_FILE_BYTES: usize = 1024 * 1024;

/// Up to one byte more than [`MAX_FILE_BYTES`] of `path`, as text.
fn read_bounded(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(MAX_FILE_BYTES as u64 + 1)
        .read_to_string(&mut text)?;
    Ok(text)
}

/// A mistake in the configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the alerts file {path}: {source} (--alerts, KEYWATCH_ALERTS)")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

impl AlertsConfig {
    /// Parses and checks the file's text; `path` is only for messages.
    pub fn parse(path: &str, text: &str) -> Result<AlertsConfig, ConfigError> {
        let invalid = |span: Option<Range<usize>>, message: String| {
            let (line, col) = span.map(|s| line_col(text, s.start)).unwrap_or((1, 1));
            ConfigError::Invalid {
                path: path.to_owned(),
                message: format!("line {line}, column {col}: {message}"),
            }
        };
        let cfg: AlertsConfig = toml::from_str(text)
            .map_err(|e| invalid(e.span(), e.message().trim_end_matches('\n').to_owned()))?;
        if let Err(e) = cfg.detectors.check() {
            let span = span_of(
                text,
                &[
                    Step::Key("detectors"),
                    Step::Key(e.table),
                    Step::Key(e.setting),
                ],
            );
            return Err(invalid(span, e.to_string()));
        }
        for (i, rule) in cfg.allow.iter().enumerate() {
            if let Err((setting, message)) = rule.check() {
                let span = span_of(
                    text,
                    &[Step::Key("allow"), Step::Index(i), Step::Key(setting)],
                )
                .or_else(|| span_of(text, &[Step::Key("allow"), Step::Index(i)]));
                return Err(invalid(span, format!("allow[{i}].{setting}: {message}")));
            }
        }
        if let Err(errors) = cfg.check_notify() {
            // Every delivery mistake at once, each at its place.
            let messages: Vec<String> = errors
                .iter()
                .map(|e| {
                    let steps: Vec<Step<'_>> = e
                        .path
                        .iter()
                        .map(|p| match p.parse::<usize>() {
                            Ok(i) => Step::Index(i),
                            Err(_) => Step::Key(p),
                        })
                        .collect();
                    let span = (0..=steps.len())
                        .rev()
                        .find_map(|n| span_of(text, &steps[..n]).filter(|_| n > 0));
                    let (line, col) = span.map(|s| line_col(text, s.start)).unwrap_or((1, 1));
                    let at = dotted(&e.path);
                    format!("line {line}, column {col}: {at}: {}", e.message)
                })
                .collect();
            return Err(ConfigError::Invalid {
                path: path.to_owned(),
                message: messages.join(&format!("\n{path}: ")),
            });
        }
        Ok(cfg)
    }

    fn check_notify(
        &self,
    ) -> Result<NotifySettings, Vec<crate::notify::config::NotifyConfigError>> {
        NotifySettings::check(
            &self.delivery,
            &self.receivers,
            &self.route,
            &self.routes,
            &self.silences,
        )
    }

    /// The validated delivery settings (receivers, routes, silences, retry policy).
    pub fn notify_settings(&self) -> Result<NotifySettings, ConfigError> {
        self.check_notify().map_err(|es| ConfigError::Invalid {
            path: "alerts.toml".into(),
            message: es
                .into_iter()
                .map(|e| format!("{}: {}", dotted(&e.path), e.message))
                .collect::<Vec<_>>()
                .join("; "),
        })
    }

    /// Reads and parses a file. A missing default file is the default configuration.
    pub fn load(path: &Path, required: bool) -> Result<AlertsConfig, ConfigError> {
        let shown = path.display().to_string();
        match read_bounded(path) {
            Ok(text) if text.len() > MAX_FILE_BYTES => Err(ConfigError::Invalid {
                path: shown,
                message: format!(
                    "the file is larger than {} KiB; an alerting configuration is a few KiB",
                    MAX_FILE_BYTES / 1024
                ),
            }),
            Ok(text) => AlertsConfig::parse(&shown, &text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
                Ok(AlertsConfig::default())
            }
            Err(source) => Err(ConfigError::Read {
                path: shown,
                source,
            }),
        }
    }

    /// The detector settings, allowlists included.
    pub fn detector_settings(&self) -> Settings {
        Settings {
            allow: Allowlist::new(self.allow.clone()),
            ..self.detectors.clone()
        }
    }
}

/// One step of a path into the TOML document.
enum Step<'a> {
    Key(&'a str),
    Index(usize),
}

/// Where in `text` the value at `path` is, for a message about a value that parsed but is out
/// of range (serde has forgotten the position by then).
fn span_of(text: &str, path: &[Step<'_>]) -> Option<Range<usize>> {
    use toml::de::{DeTable, DeValue};
    let root = DeTable::parse(text).ok()?;
    let mut span = root.span();
    let mut table = Some(root.get_ref());
    let mut array: Option<&toml::de::DeArray<'_>> = None;
    for step in path {
        let value = match step {
            Step::Key(k) => table?.get(*k)?,
            Step::Index(i) => array?.get(*i)?,
        };
        span = value.span();
        (table, array) = match value.get_ref() {
            DeValue::Table(t) => (Some(t), None),
            DeValue::Array(a) => (None, Some(a)),
            _ => (None, None),
        };
    }
    Some(span)
}

/// `routes.1.receiver` as `routes[1].receiver`.
fn dotted(path: &[String]) -> String {
    let mut out = String::new();
    for p in path {
        if p.parse::<usize>().is_ok() {
            out.push_str(&format!("[{p}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(p);
        }
    }
    out
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notify::config::ReceiverSettings;

    #[test]
    fn an_endless_file_is_refused_without_reading_it_all() {
        let e = AlertsConfig::load(Path::new("/dev/zero"), true).unwrap_err();
        assert_eq!(
            e.to_string(),
            "/dev/zero: the file is larger than 1024 KiB; an alerting configuration is a few KiB"
        );
    }

    #[test]
    fn the_shipped_file_is_valid() {
        let text = include_str!("../alerts.toml");
        let cfg = AlertsConfig::parse("alerts.toml", text).unwrap();
        // The shipped file states the defaults; it must not drift from them.
        assert_eq!(cfg.detectors, Settings::default());
        let defaults = AlertsConfig::default();
        assert_eq!(cfg.delivery, defaults.delivery);
        assert_eq!(cfg.receivers, defaults.receivers);
        assert_eq!(
            cfg.notify_settings().unwrap(),
            defaults.notify_settings().unwrap()
        );
        assert!(cfg.routes.is_empty() && cfg.silences.is_empty());
    }

    #[test]
    fn a_route_to_an_undefined_receiver_names_it_and_the_defined_ones() {
        let text = "[[receivers]]\nname = \"ops\"\ntype = \"email\"\n\n[[routes]]\ntypes = [\"rate_spike\"]\nreceiver = \"ops-mail\"\n";
        let e = AlertsConfig::parse("a.toml", text).unwrap_err().to_string();
        assert_eq!(
            e,
            "a.toml: line 7, column 12: routes[0].receiver: undefined receiver \"ops-mail\" used in route; defined receivers: \"ops\""
        );
    }

    #[test]
    fn every_delivery_mistake_is_reported_at_once_with_its_place() {
        let text = "[delivery]\nretry_initial = \"30 seconds\"\n\n[route]\ngroup_by = [\"team\"]\n\n[[routes]]\nreceiver = \"email\"\nseverities = [\"urgent\"]\n";
        let e = AlertsConfig::parse("a.toml", text).unwrap_err().to_string();
        let lines: Vec<&str> = e.lines().collect();
        assert_eq!(lines.len(), 3, "{e}");
        assert_eq!(
            lines[0],
            "a.toml: line 2, column 17: delivery.retry_initial: \"30 seconds\" is not a duration; write it like 30s, 5m, 24h, 90d or 1y"
        );
        assert_eq!(
            lines[1],
            "a.toml: line 5, column 12: route.group_by: cannot group by \"team\"; valid labels: org, type, key, severity, fingerprint"
        );
        assert_eq!(
            lines[2],
            "a.toml: line 9, column 14: routes[0].severities: unknown severity \"urgent\"; valid severities: info, low, medium, high, critical"
        );
    }

    #[test]
    fn unknown_delivery_settings_and_receiver_types_are_errors() {
        let e = AlertsConfig::parse("a.toml", "[route]\ngroup_wiat = \"1s\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("a.toml: line 2, column 1: ") && e.contains("group_wait"),
            "{e}"
        );
        let e = AlertsConfig::parse("a.toml", "[[receivers]]\nname = \"x\"\ntype = \"pager\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 3") && e.contains("email"), "{e}");
        let e = AlertsConfig::parse(
            "a.toml",
            "[[receivers]]\nname = \"x\"\ntype = \"email\"\npassword_env = \"hunter2!\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("line 4") && e.contains("never put the secret"),
            "{e}"
        );
    }

    #[test]
    fn receivers_read_the_environment_they_name() {
        let cfg = AlertsConfig::default().notify_settings().unwrap();
        let env = |k: &str| match k {
            "KEYWATCH_SMTP_URL" => Some("smtp://alerts@mail.example.com:587".to_string()),
            "KEYWATCH_SMTP_PASSWORD" => Some("s3cret".to_string()),
            "KEYWATCH_ALERT_TO" => Some("a@example.com, b@example.com".to_string()),
            _ => None,
        };
        let email = |r: Vec<ReceiverSettings>| match r.into_iter().next() {
            Some(ReceiverSettings::Email(e)) => e,
            other => panic!("the shipped receiver is email: {other:?}"),
        };
        let r = [email(cfg.resolve(&env, Path::new("/tmp")).unwrap())];
        let s = r[0].server.as_ref().unwrap();
        assert_eq!(s.url, "smtp://mail.example.com:587?tls=required");
        assert_eq!(s.username.as_deref(), Some("alerts"));
        assert_eq!(s.password.as_deref(), Some("s3cret"));
        assert!(!format!("{s:?}").contains("s3cret"));
        assert_eq!(r[0].to, ["a@example.com", "b@example.com"]);
        let local = email(
            cfg.resolve(
                &|k: &str| (k == "KEYWATCH_SMTP_URL").then(|| "smtp://127.0.0.1:2525".into()),
                Path::new("/tmp"),
            )
            .unwrap(),
        );
        assert_eq!(local.server.as_ref().unwrap().url, "smtp://127.0.0.1:2525");
        let none = email(cfg.resolve(&|_: &str| None, Path::new("/d")).unwrap());
        assert!(none.server.is_none());
        assert_eq!(none.mailbox, Path::new("/d/keywatch-alerts.mbox"));
    }

    #[test]
    fn unknown_settings_name_their_line_and_column() {
        let e = AlertsConfig::parse("a.toml", "# comment\n\nrate_spike = true\n").unwrap_err();
        let msg = e.to_string();
        assert!(msg.starts_with("a.toml: line 3, column 1: "), "{msg}");
        assert!(msg.contains("rate_spike"), "{msg}");
    }

    #[test]
    fn syntax_errors_name_their_line() {
        let e = AlertsConfig::parse("a.toml", "x = \n").unwrap_err();
        assert!(e.to_string().contains("line 1"), "{e}");
    }

    #[test]
    fn a_setting_out_of_range_names_its_line_and_range() {
        let text = "[detectors.rate]\nspike_z = 4.0\nwindow_minutes = 45\n";
        let e = AlertsConfig::parse("a.toml", text).unwrap_err().to_string();
        assert_eq!(
            e,
            "a.toml: line 3, column 18: rate.window_minutes must be from 1 to 30, not 45"
        );
    }

    #[test]
    fn a_wrong_type_names_the_setting() {
        let text = "[detectors.errors]\nmin_requests = \"thirty\"\n";
        let e = AlertsConfig::parse("a.toml", text).unwrap_err().to_string();
        assert!(e.starts_with("a.toml: line 2, column 16: "), "{e}");
    }

    #[test]
    fn an_unknown_detector_setting_lists_the_valid_ones() {
        let text = "[detectors.rate]\nspike_zz = 4.0\n";
        let e = AlertsConfig::parse("a.toml", text).unwrap_err().to_string();
        assert!(
            e.contains("line 2, column 1") && e.contains("spike_z"),
            "{e}"
        );
    }

    #[test]
    fn allow_rules_are_read_and_checked() {
        let text = "[[allow]]\nkey = \"00000000-0000-0000-0000-000000000007\"\ncountries = [\"SE\"]\ncidrs = [\"10.0.0.0/8\"]\nexpires = 2027-01-01T00:00:00Z\nreason = \"office\"\n\n[[allow]]\ncountries = [\"Sweden\"]\n";
        let e = AlertsConfig::parse("a.toml", text).unwrap_err().to_string();
        assert!(
            e.contains("line 9") && e.contains("allow[1].countries"),
            "{e}"
        );
        let ok = text.replace("\"Sweden\"", "\"NO\"");
        let cfg = AlertsConfig::parse("a.toml", &ok).unwrap();
        assert_eq!(cfg.allow.len(), 2);
        assert_eq!(cfg.allow[0].cidrs[0].to_string(), "10.0.0.0/8");
        let bad_cidr = ok.replace("10.0.0.0/8", "10.0.0.0/40");
        let e = AlertsConfig::parse("a.toml", &bad_cidr)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 4") && e.contains("not an address range"),
            "{e}"
        );
    }
}

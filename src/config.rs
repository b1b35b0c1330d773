//! The alerting configuration file (`alerts.toml`), loaded in two phases: raw serde structs
//! that reject unknown keys, then validated settings.
//!
//! Owns what the file may say and the wording of every mistake in it (with line and column).
//! It never reads the environment for anything but the variables the file names.

use std::path::Path;

use serde::Deserialize;

/// What `alerts.toml` holds. Empty for now: usage counting needs no settings from it, and
/// `deny_unknown_fields` keeps a setting from a newer keywatch from being ignored silently.
#[derive(Debug, Default, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AlertsConfig {}

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
    /// Parses the file's text; `path` is only for messages.
    pub fn parse(path: &str, text: &str) -> Result<AlertsConfig, ConfigError> {
        toml::from_str(text).map_err(|e| {
            let (line, col) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
            ConfigError::Invalid {
                path: path.to_owned(),
                message: format!(
                    "line {line}, column {col}: {}",
                    e.message().trim_end_matches('\n')
                ),
            }
        })
    }

    /// Reads and parses a file. A missing default file is an empty configuration.
    pub fn load(path: &Path, required: bool) -> Result<AlertsConfig, ConfigError> {
        let shown = path.display().to_string();
        match std::fs::read_to_string(path) {
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

    #[test]
    fn the_shipped_file_is_valid() {
        let text = include_str!("../alerts.toml");
        assert_eq!(
            AlertsConfig::parse("alerts.toml", text).unwrap(),
            AlertsConfig::default()
        );
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
}

//! Rendering a [`Draft`] into a notification a person reads: a subject that says severity, type
//! and subject, a plain-text part and an HTML part with the evidence, what to do next and the
//! command that shows more. Pure.
//!
//! Everything that came from a log line (key prefixes, summaries naming user agents and MCPs,
//! evidence) is HTML-escaped in the HTML part, and control characters are removed from the
//! subject, so no value can inject markup or a header. Full keys never reach here: they are
//! redacted before anything is stored.

use std::fmt::Write;

use chrono::{DateTime, Utc};

use super::group::Draft;
use super::{AlertChange, Notification};
use crate::detect::Severity;

/// Escapes `s` for HTML text and attribute values.
pub fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() && c != '\n' => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

/// `s` made safe for one header line: control characters (CR, LF, ...) become spaces, and it is
/// cut to `max` characters.
pub fn header_safe(s: &str, max: usize) -> String {
    let cleaned: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let mut out: String = cleaned.chars().take(max).collect();
    if cleaned.chars().count() > max {
        out.push('…');
    }
    out
}

/// Text from a log line for the plain part: control characters other than newlines removed.
fn text_safe(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() && c != '\n' { ' ' } else { c })
        .collect()
}

fn subject_of(a: &AlertChange) -> String {
    match (&a.key_prefix, &a.key_id) {
        // The key tables' prefixes already end in "...".
        (Some(p), _) if let Some(n) = &a.key_name => {
            format!("key \"{n}\" ({}...)", p.trim_end_matches('.'))
        }
        (Some(p), _) => format!("key {p}"),
        (None, Some(k)) => format!("key {k}"),
        _ => a
            .fingerprint
            .split_once('/')
            .map_or(a.fingerprint.clone(), |(_, s)| s.to_owned()),
    }
}

fn what_to_do(alert_type: &str) -> &'static str {
    match alert_type {
        "revoked_key_use" | "expired_key_use" => {
            "A client still uses a key that no longer works: find it from the addresses and user agents above, and give it a current key."
        }
        "key_in_logs" | "client_side_exposure" => {
            "Treat the key as leaked: rotate it (create a new key, move the clients, revoke the old one), and remove it from where it appeared."
        }
        "auth_failure_burst" => {
            "Someone is trying keys: check the addresses above, and block them at the edge if they are not yours."
        }
        "quota_threshold" | "rate_limit_saturation" => {
            "Check whether the growth is expected; raise the limit or talk to the organization before requests are refused."
        }
        _ => {
            "Check the key's recent activity (the command below); if it is not its owner's doing, rotate the key and revoke the old one."
        }
    }
}

/// Renders `d` as a notification created at `now`.
pub fn render(d: &Draft, now: DateTime<Utc>) -> Notification {
    let all: Vec<&AlertChange> = d
        .new
        .iter()
        .chain(&d.still_firing)
        .chain(&d.resolved)
        .collect();
    let firing: Vec<&AlertChange> = d.new.iter().chain(&d.still_firing).collect();
    let top = firing
        .iter()
        .max_by_key(|a| a.severity)
        .or(all.first())
        .copied();
    let subject = match top {
        None => "[keywatch] no alerts".to_owned(),
        Some(a) => {
            let state = if firing.is_empty() {
                "RESOLVED".to_owned()
            } else {
                a.severity.as_str().to_uppercase()
            };
            let more = all.len().saturating_sub(1);
            let digest = if d.digest_of > 0 {
                format!(" (digest of {} notifications)", d.digest_of)
            } else {
                String::new()
            };
            format!(
                "[keywatch] {state} {}: {}{}{digest}",
                a.alert_type.replace('_', " "),
                subject_of(a),
                if more > 0 {
                    format!(" and {more} more")
                } else {
                    String::new()
                }
            )
        }
    };
    let subject = header_safe(&subject, 200);
    let mut text = String::new();
    let mut html = String::from("<!DOCTYPE html><html><body style=\"font-family:sans-serif\">");
    let _ = writeln!(html, "<h2>{}</h2>", html_escape(&subject));
    if d.digest_of > 0 {
        let _ = writeln!(
            text,
            "More than the receiver's hourly limit of notifications were due; this digest replaces {}.\n",
            d.digest_of
        );
        let _ = writeln!(
            html,
            "<p>More than the receiver's hourly limit of notifications were due; this digest replaces {}.</p>",
            d.digest_of
        );
    }
    for (title, list) in [
        ("New", &d.new),
        ("Still firing", &d.still_firing),
        ("Resolved", &d.resolved),
    ] {
        if list.is_empty() {
            continue;
        }
        let _ = writeln!(text, "== {title} ({}) ==\n", list.len());
        let _ = writeln!(html, "<h3>{title} ({})</h3>", list.len());
        for a in list.iter() {
            write_alert(&mut text, &mut html, a, title == "Resolved");
        }
    }
    if let Some(a) = top {
        let _ = writeln!(text, "What to do: {}", what_to_do(&a.alert_type));
        let _ = writeln!(
            html,
            "<p><b>What to do:</b> {}</p>",
            html_escape(what_to_do(&a.alert_type))
        );
    }
    let cmd = "keywatch report alerts --since 24h";
    let _ = writeln!(text, "See more: {cmd}");
    let _ = writeln!(
        html,
        "<p>See more: <code>{}</code></p></body></html>",
        html_escape(cmd)
    );
    Notification {
        id: uuid::Uuid::new_v4(),
        receiver: d.receiver.clone(),
        group_key: d.group_key.clone(),
        subject,
        text,
        html,
        created_at: now,
        draft: Some(d.clone()),
        to: vec![],
        also_to: vec![],
    }
}

/// A test message for `keywatch alert test`.
pub fn test_notification(receiver: &str, now: DateTime<Utc>) -> Notification {
    let text =
        "This is a test message from keywatch: alerts sent through this receiver reach you.\n"
            .to_owned();
    Notification {
        id: uuid::Uuid::new_v4(),
        receiver: receiver.to_owned(),
        group_key: "test".into(),
        subject: "[keywatch] TEST message".into(),
        html: format!(
            "<!DOCTYPE html><html><body><p>{}</p></body></html>",
            html_escape(text.trim())
        ),
        text,
        created_at: now,
        draft: None,
        to: vec![],
        also_to: vec![],
    }
}

fn severity_color(s: Severity) -> &'static str {
    match s {
        Severity::Critical => "#b00020",
        Severity::High => "#d35400",
        Severity::Medium => "#b7950b",
        Severity::Low | Severity::Info => "#555555",
    }
}

fn write_alert(text: &mut String, html: &mut String, a: &AlertChange, resolved: bool) {
    let when = if resolved {
        format!("resolved at {}", a.at.to_rfc3339())
    } else {
        format!("since {}", a.started_at.to_rfc3339())
    };
    let _ = writeln!(
        text,
        "- {} {} ({when})\n  {}\n  id: {}",
        a.severity.as_str().to_uppercase(),
        a.alert_type,
        text_safe(&a.summary),
        text_safe(&a.fingerprint)
    );
    let _ = writeln!(
        html,
        "<div style=\"margin-bottom:1em\"><b style=\"color:{}\">{}</b> <b>{}</b> ({})<br>{}<br><small>id: <code>{}</code></small>",
        severity_color(a.severity),
        a.severity.as_str().to_uppercase(),
        html_escape(&a.alert_type),
        html_escape(&when),
        html_escape(&a.summary),
        html_escape(&a.fingerprint)
    );
    let mut facts: Vec<(String, String)> = Vec::new();
    if let Some(p) = &a.key_prefix {
        facts.push(("key".into(), p.clone()));
    }
    if let Some(o) = &a.org_id {
        facts.push(("organization".into(), o.clone()));
    }
    if let Some(ip) = &a.source_ip {
        facts.push(("address".into(), ip.clone()));
    }
    let ev = &a.evidence;
    if let Some(m) = ev.get("method").and_then(|v| v.as_str()) {
        facts.push(("method".into(), m.to_owned()));
    }
    for f in ["observed", "expected", "threshold", "score"] {
        if let Some(v) = ev.get(f).and_then(|v| v.as_f64()) {
            facts.push((f.into(), format!("{v}")));
        }
    }
    if let Some(top) = ev.get("top").and_then(|v| v.as_array()) {
        let items: Vec<String> = top
            .iter()
            .take(5)
            .filter_map(|p| {
                let p = p.as_array()?;
                Some(format!("{} ({})", p.first()?.as_str()?, p.get(1)?))
            })
            .collect();
        if !items.is_empty() {
            facts.push(("top".into(), items.join(", ")));
        }
    }
    if let Some(hours) = super::chart::series(a) {
        // What the bars count, and what the line expects of each hour.
        let (what, expected) = if a.alert_type == "error_spike" {
            let class = a
                .evidence
                .get("top")
                .and_then(|t| t.get(0))
                .and_then(|t| t.get(0))
                .and_then(|c| c.as_str())
                .unwrap_or("");
            (
                format!("{} errors per hour", html_escape(class)),
                "what the usual error rate makes of that hour's requests",
            )
        } else {
            (
                "Requests per hour".to_owned(),
                "what this hour of the week usually sees",
            )
        };
        let _ = write!(
            html,
            "<p><img src=\"cid:{cid}\" width=\"{w}\" height=\"{h}\" alt=\"{what} over the last {n} hours\"><br><small>{what}, the last {n} hours (the last one so far): bars; the alerting hour in red; the dark line is {expected}, the shaded band half to one and a half times that.</small></p>",
            cid = super::chart::content_id(a),
            w = super::chart::WIDTH,
            h = super::chart::HEIGHT,
            n = hours.len(),
        );
    }
    html.push_str("<table style=\"font-size:90%\">");
    for (k, v) in &facts {
        let _ = writeln!(text, "  {k}: {}", text_safe(v));
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}</td></tr>",
            html_escape(k),
            html_escape(v)
        );
    }
    html.push_str("</table></div>\n");
    text.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notify::ChangeKind;

    fn hostile() -> AlertChange {
        AlertChange {
            kind: ChangeKind::Opened,
            fingerprint: "client_side_exposure/key:k".into(),
            alert_type: "client_side_exposure".into(),
            severity: Severity::High,
            key_id: Some("k".into()),
            key_prefix: Some("pmcp_<b>evil\r\nBcc: x@evil.test".into()),
            key_name: None,
            org_id: Some("o".into()),
            source_ip: None,
            started_at: Utc::now(),
            at: Utc::now(),
            summary: "used from a browser: <script>alert(1)</script> \"Mozilla\" & co".into(),
            evidence: serde_json::json!({"top": [["<img src=x onerror=alert(1)>", 3]], "method": "origin"}),
        }
    }

    #[test]
    fn the_subject_names_the_key_and_its_prefix() {
        let mut a = hostile();
        a.key_prefix = Some("pmcp_01ab2c3d4e5f6a7b".into());
        a.key_name = Some("ci-deploy".into());
        a.alert_type = "impossible_travel".into();
        let d = Draft {
            receiver: "email".into(),
            route: String::new(),
            group_key: "g".into(),
            labels: vec![],
            new: vec![a],
            still_firing: vec![],
            resolved: vec![],
            digest_of: 0,
        };
        let n = render(&d, Utc::now());
        assert!(
            n.subject.starts_with(
                "[keywatch] HIGH impossible travel: key \"ci-deploy\" (pmcp_01ab2c3d4e5f6a7b...)"
            ),
            "{}",
            n.subject
        );
        // As the key tables store it: the dots are not doubled.
        let mut b = d.new[0].clone();
        b.key_prefix = Some("pmcp_01ab2c3d4e5f...".into());
        let n = render(&Draft { new: vec![b], ..d }, Utc::now());
        assert!(
            n.subject
                .contains("key \"ci-deploy\" (pmcp_01ab2c3d4e5f...)"),
            "{}",
            n.subject
        );
    }

    #[test]
    fn hostile_values_are_escaped_in_html_and_cannot_break_the_subject() {
        let d = Draft {
            receiver: "email".into(),
            route: String::new(),
            group_key: "g".into(),
            labels: vec![],
            new: vec![hostile()],
            still_firing: vec![],
            resolved: vec![],
            digest_of: 0,
        };
        let n = render(&d, Utc::now());
        assert!(
            !n.subject.contains('\r') && !n.subject.contains('\n'),
            "{}",
            n.subject
        );
        assert!(
            n.subject
                .starts_with("[keywatch] HIGH client side exposure: key pmcp_<b>evil")
        );
        assert!(!n.html.contains("<script>"), "{}", n.html);
        assert!(!n.html.contains("<img"), "{}", n.html);
        assert!(!n.html.contains("<b>evil"), "{}", n.html);
        assert!(
            n.html
                .contains("&lt;script&gt;alert(1)&lt;/script&gt; &quot;Mozilla&quot; &amp; co")
        );
        assert!(
            n.text.contains("<script>alert(1)</script>"),
            "the text part is text"
        );
        assert!(n.text.contains("What to do: Treat the key as leaked"));
    }

    #[test]
    fn a_resolution_says_resolved() {
        let mut a = hostile();
        a.key_prefix = Some("pmcp_abc".into());
        let d = Draft {
            receiver: "email".into(),
            route: String::new(),
            group_key: "g".into(),
            labels: vec![],
            new: vec![],
            still_firing: vec![],
            resolved: vec![a],
            digest_of: 0,
        };
        assert_eq!(
            render(&d, Utc::now()).subject,
            "[keywatch] RESOLVED client side exposure: key pmcp_abc"
        );
    }
}

//! The email receiver: a notification as a MIME message (plain text and HTML alternatives, a
//! stable Message-ID), delivered over SMTP with lettre, or appended to a local mbox file when no
//! server is configured (and logged), so the embedded default and `keywatch demo` show the mail
//! they would send.

use std::time::SystemTime;

use lettre::message::header::ContentType;
use lettre::message::{Attachment, Mailbox, MultiPart, SinglePart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use super::config::EmailSettings;
use super::{BoxFuture, DeliveryError, Notification, Receiver};

/// Builds the MIME message of `n` from `from` to `to`.
pub fn message(n: &Notification, from: &str, to: &[String]) -> Result<Message, DeliveryError> {
    let bad = |a: &str, e: lettre::address::AddressError| {
        DeliveryError::Permanent(format!("{a:?} is not an email address: {e}"))
    };
    let mut b = Message::builder()
        .from(from.parse::<Mailbox>().map_err(|e| bad(from, e))?)
        .subject(super::render::header_safe(&n.subject, 200))
        .message_id(Some(n.message_id()))
        .date(SystemTime::from(n.created_at));
    for t in to {
        b = b.to(t.parse::<Mailbox>().map_err(|e| bad(t, e))?);
    }
    let body = match charts(n) {
        charts if charts.is_empty() => {
            MultiPart::alternative_plain_html(n.text.clone(), n.html.clone())
        }
        charts => {
            // The HTML part and the charts it shows by Content-ID.
            let mut related = MultiPart::related().singlepart(SinglePart::html(n.html.clone()));
            for (cid, png) in charts {
                related = related.singlepart(Attachment::new_inline(cid).body(
                    png,
                    ContentType::parse("image/png").expect("a valid MIME type"),
                ));
            }
            MultiPart::alternative()
                .singlepart(SinglePart::plain(n.text.clone()))
                .multipart(related)
        }
    };
    b.multipart(body)
        .map_err(|e| DeliveryError::Permanent(format!("cannot build the message: {e}")))
}

/// The charts the HTML part of `n` refers to, drawn from the alerts' evidence: the same
/// notification always gives the same images, so a retried send is the same message.
fn charts(n: &Notification) -> Vec<(String, Vec<u8>)> {
    let Some(d) = &n.draft else {
        return vec![];
    };
    let mut out: Vec<(String, Vec<u8>)> = Vec::new();
    for a in d.new.iter().chain(&d.still_firing).chain(&d.resolved) {
        let cid = super::chart::content_id(a);
        if let Some(hours) = super::chart::series(a)
            && !out.iter().any(|(c, _)| *c == cid)
        {
            out.push((cid, super::chart::png(&hours)));
        }
    }
    out
}

/// The TLS mode `url` asks for (as lettre reads it: `smtps://` is TLS from the first byte,
/// `?tls=required|opportunistic` is STARTTLS), trusting the authorities in `ca_file` as well as
/// the system's.
fn tls_trusting(receiver: &str, url: &str, ca_file: &std::path::Path) -> Result<Tls, String> {
    let fail = |what: String| {
        format!(
            "receiver {receiver:?}: ca_file {}: {what}",
            ca_file.display()
        )
    };
    let pem = std::fs::read(ca_file).map_err(|e| fail(format!("cannot read it: {e}")))?;
    let cert =
        Certificate::from_pem(&pem).map_err(|e| fail(format!("not a PEM certificate: {e}")))?;
    let u = url::Url::parse(url).map_err(|e| fail(format!("the SMTP URL is not a URL: {e}")))?;
    let host = u
        .host_str()
        .unwrap_or_default()
        .trim_matches(['[', ']'])
        .to_owned();
    let params = TlsParameters::builder(host)
        .add_root_certificate(cert)
        .build_rustls()
        .map_err(|e| fail(format!("cannot use it: {e}")))?;
    let tls = u
        .query_pairs()
        .find(|(k, _)| k == "tls")
        .map(|(_, v)| v.into_owned());
    Ok(match (u.scheme(), tls.as_deref()) {
        ("smtps", _) => Tls::Wrapper(params),
        (_, Some("required")) => Tls::Required(params),
        (_, Some("opportunistic")) => Tls::Opportunistic(params),
        _ => {
            return Err(fail(
                "the server is reached without TLS; add ?tls=required to the URL or remove ca_file"
                    .into(),
            ));
        }
    })
}

/// Email over SMTP, or to an mbox file.
pub struct EmailReceiver {
    settings: EmailSettings,
    smtp: Option<AsyncSmtpTransport<Tokio1Executor>>,
    mbox_lock: tokio::sync::Mutex<()>,
}

impl EmailReceiver {
    /// The receiver for `settings`; fails on an SMTP URL lettre cannot use.
    pub fn new(settings: EmailSettings) -> Result<EmailReceiver, String> {
        let smtp = match &settings.server {
            None => None,
            Some(s) => {
                let mut b = AsyncSmtpTransport::<Tokio1Executor>::from_url(&s.url)
                    .map_err(|e| {
                        format!(
                            "receiver {:?}: cannot use the SMTP URL {}: {e}",
                            settings.name,
                            crate::store::redact_url(&s.url)
                        )
                    })?
                    .timeout(Some(settings.timeout));
                if let Some(ca) = &s.ca_file {
                    b = b.tls(tls_trusting(&settings.name, &s.url, ca)?);
                }
                if let (Some(u), Some(p)) = (&s.username, &s.password) {
                    b = b.credentials(Credentials::new(u.clone(), p.clone()));
                }
                Some(b.build())
            }
        };
        Ok(EmailReceiver {
            settings,
            smtp,
            mbox_lock: tokio::sync::Mutex::new(()),
        })
    }

    /// Where messages go, for a log line.
    pub fn destination(&self) -> String {
        match &self.settings.server {
            Some(s) => crate::store::redact_url(&s.url),
            None => format!("mbox {}", self.settings.mailbox.display()),
        }
    }

    /// The route's recipients when it chose some, else the receiver's; and those added.
    fn recipients(&self, n: &Notification) -> Vec<String> {
        let base = if n.to.is_empty() {
            &self.settings.to
        } else {
            &n.to
        };
        let mut to = base.clone();
        for a in &n.also_to {
            if !to.contains(a) {
                to.push(a.clone());
            }
        }
        to
    }

    async fn to_mbox(&self, n: &Notification) -> Result<(), DeliveryError> {
        use tokio::io::AsyncWriteExt;
        let msg = message(n, &self.settings.from, &self.recipients(n))?;
        let raw = String::from_utf8_lossy(&msg.formatted()).replace("\r\n", "\n");
        let mut entry = format!(
            "From keywatch@localhost {}\n",
            n.created_at.format("%a %b %e %H:%M:%S %Y")
        );
        for line in raw.lines() {
            // mboxrd: quote lines that would read as a new message.
            if line.trim_start_matches('>').starts_with("From ") {
                entry.push('>');
            }
            entry.push_str(line);
            entry.push('\n');
        }
        entry.push('\n');
        let _guard = self.mbox_lock.lock().await;
        let path = &self.settings.mailbox;
        let io = |e: std::io::Error| {
            DeliveryError::Retryable(format!("cannot write the mailbox {}: {e}", path.display()))
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            tokio::fs::create_dir_all(dir).await.map_err(io)?;
        }
        let mut f = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .await
            .map_err(io)?;
        f.write_all(entry.as_bytes()).await.map_err(io)?;
        f.sync_data().await.map_err(io)?;
        tracing::info!(receiver = %self.settings.name, mailbox = %path.display(), subject = %n.subject, "Wrote a notification to the mailbox (no SMTP server configured).");
        Ok(())
    }
}

impl Receiver for EmailReceiver {
    fn name(&self) -> &str {
        &self.settings.name
    }

    fn deliver<'a>(&'a self, n: &'a Notification) -> BoxFuture<'a, Result<(), DeliveryError>> {
        Box::pin(async move {
            let Some(smtp) = &self.smtp else {
                return self.to_mbox(n).await;
            };
            let msg = message(n, &self.settings.from, &self.recipients(n))?;
            // lettre's own timeout covers connecting, not a server that stops answering
            // mid-conversation; the whole exchange gets one deadline.
            let sent = tokio::time::timeout(self.settings.timeout, smtp.send(msg)).await;
            let Ok(sent) = sent else {
                return Err(DeliveryError::Retryable(format!(
                    "SMTP: no answer within {} s",
                    self.settings.timeout.as_secs_f64()
                )));
            };
            match sent {
                Ok(_) => Ok(()),
                Err(e) if e.is_permanent() => Err(DeliveryError::Permanent(format!(
                    "the SMTP server refused: {e}"
                ))),
                Err(e) => Err(DeliveryError::Retryable(format!("SMTP: {e}"))),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    #[test]
    fn a_hostile_subject_cannot_add_a_header() {
        let n = Notification {
            id: uuid::Uuid::from_u128(7),
            receiver: "email".into(),
            group_key: "g".into(),
            subject: "[keywatch] HIGH x\r\nBcc: victim@evil.test\r\n\r\nbody".into(),
            text: "text".into(),
            html: "<p>html</p>".into(),
            created_at: Utc::now(),
            draft: None,
            to: vec![],
            also_to: vec![],
        };
        let m = message(&n, "keywatch <kw@example.com>", &["sec@example.com".into()]).unwrap();
        let raw = String::from_utf8(m.formatted()).unwrap();
        let headers = raw.split("\r\n\r\n").next().unwrap();
        assert!(!headers.lines().any(|l| l.starts_with("Bcc")), "{headers}");
        assert!(
            headers.contains("Message-ID: <00000000000000000000000000000007@keywatch>"),
            "{headers}"
        );
        assert!(raw.contains("multipart/alternative"));
        assert!(raw.contains("text/plain") && raw.contains("text/html"));
        assert!(message(&n, "bad\r\naddress", &[]).is_err());
    }
}

#[cfg(test)]
mod chart_tests {
    use super::*;
    use crate::detect::Severity;
    use crate::notify::ChangeKind;
    use crate::notify::group::Draft;
    use crate::notify::test_support::change;

    #[test]
    fn a_rate_alert_carries_its_chart_inline_and_the_html_shows_it() {
        let mut a = change("rate_spike", Severity::High, ChangeKind::Opened);
        a.evidence = serde_json::json!({
            "hourly": (0..12).map(|i| (1_700_000_000 + i * 3600, 100 + i * 10, 100.0)).collect::<Vec<_>>(),
        });
        let plain = change("new_country", Severity::Medium, ChangeKind::Opened);
        let d = Draft {
            receiver: "email".into(),
            route: String::new(),
            group_key: "g".into(),
            labels: vec![],
            new: vec![a.clone(), plain],
            still_firing: vec![],
            resolved: vec![],
            digest_of: 0,
        };
        let n = crate::notify::render::render(&d, chrono::Utc::now());
        let cid = crate::notify::chart::content_id(&a);
        assert!(n.html.contains(&format!("src=\"cid:{cid}\"")), "{}", n.html);
        assert_eq!(
            n.html.matches("<img").count(),
            1,
            "only the rate alert has a chart"
        );
        let raw = String::from_utf8(
            message(&n, "keywatch <kw@example.com>", &["sec@example.com".into()])
                .unwrap()
                .formatted(),
        )
        .unwrap();
        assert!(raw.contains("multipart/alternative"), "{raw}");
        assert!(raw.contains("multipart/related"), "{raw}");
        assert!(raw.contains("Content-Type: image/png"), "{raw}");
        assert!(raw.contains(&format!("Content-ID: <{cid}>")), "{raw}");
    }
}

//! The email receiver: a notification as a MIME message (plain text and HTML alternatives, a
//! stable Message-ID), delivered over SMTP with lettre, or appended to a local mbox file when no
//! server is configured (and logged), so the embedded default and `keywatch demo` show the mail
//! they would send.

use std::time::SystemTime;

use lettre::message::{Mailbox, MultiPart};
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
    b.multipart(MultiPart::alternative_plain_html(
        n.text.clone(),
        n.html.clone(),
    ))
    .map_err(|e| DeliveryError::Permanent(format!("cannot build the message: {e}")))
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

    async fn to_mbox(&self, n: &Notification) -> Result<(), DeliveryError> {
        use tokio::io::AsyncWriteExt;
        let msg = message(n, &self.settings.from, &self.settings.to)?;
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
            let msg = message(n, &self.settings.from, &self.settings.to)?;
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

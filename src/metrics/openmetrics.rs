//! The OpenMetrics 1.0 text format, for scrapers that ask for it in `Accept`.
//!
//! Owns only the encoding: it turns the metric families the `prometheus` crate gathers into
//! OpenMetrics text (counter families named without `_total`, histograms with a `+Inf`
//! bucket, `# EOF` at the end). What is measured, and under which names, is `metrics/mod.rs`'.

use std::fmt::Write;

use prometheus::proto::{Metric, MetricFamily, MetricType};

/// The `Content-Type` of an OpenMetrics exposition.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Whether an `Accept` header asks for OpenMetrics.
pub fn wanted(accept: &str) -> bool {
    accept.split(',').any(|part| {
        let mut params = part.split(';');
        let media = params.next().unwrap_or("").trim();
        let q_zero = params.any(|p| {
            p.trim()
                .strip_prefix("q=")
                .and_then(|q| q.trim().parse::<f64>().ok())
                .is_some_and(|q| q <= 0.0)
        });
        media.eq_ignore_ascii_case("application/openmetrics-text") && !q_zero
    })
}

/// Encodes `families` as OpenMetrics text.
pub fn encode(families: &[MetricFamily]) -> String {
    let mut out = String::with_capacity(64 * 1024);
    for mf in families {
        if mf.get_metric().is_empty() {
            continue;
        }
        let name = mf.name();
        let kind = mf.get_field_type();
        let (family, type_name) = match kind {
            MetricType::COUNTER => (name.strip_suffix("_total").unwrap_or(name), "counter"),
            MetricType::GAUGE => (name, "gauge"),
            MetricType::HISTOGRAM => (name, "histogram"),
            MetricType::SUMMARY => (name, "summary"),
            MetricType::UNTYPED => (name, "unknown"),
        };
        let _ = writeln!(out, "# TYPE {family} {type_name}");
        if !mf.help().is_empty() {
            let _ = writeln!(out, "# HELP {family} {}", escape(mf.help()));
        }
        for m in mf.get_metric() {
            match kind {
                MetricType::COUNTER => {
                    let sample = format!("{family}_total");
                    line(&mut out, &sample, m, None, m.get_counter().get_value());
                }
                MetricType::GAUGE => line(&mut out, family, m, None, m.get_gauge().get_value()),
                // keywatch registers no untyped metrics (the crate's text encoder cannot
                // write them either).
                MetricType::UNTYPED => {}
                MetricType::HISTOGRAM => {
                    let h = m.get_histogram();
                    let bucket = format!("{family}_bucket");
                    let mut inf = false;
                    for b in h.get_bucket() {
                        let le = b.upper_bound();
                        inf |= le.is_infinite() && le > 0.0;
                        let le = number(le);
                        let count = b.cumulative_count() as f64;
                        line(&mut out, &bucket, m, Some(("le", &le)), count);
                    }
                    if !inf {
                        let count = h.get_sample_count() as f64;
                        line(&mut out, &bucket, m, Some(("le", "+Inf")), count);
                    }
                    let count = h.get_sample_count() as f64;
                    line(&mut out, &format!("{family}_count"), m, None, count);
                    line(
                        &mut out,
                        &format!("{family}_sum"),
                        m,
                        None,
                        h.get_sample_sum(),
                    );
                }
                MetricType::SUMMARY => {
                    let s = m.get_summary();
                    for q in s.get_quantile() {
                        let quantile = number(q.quantile());
                        line(
                            &mut out,
                            family,
                            m,
                            Some(("quantile", &quantile)),
                            q.value(),
                        );
                    }
                    let count = s.sample_count() as f64;
                    line(&mut out, &format!("{family}_count"), m, None, count);
                    line(&mut out, &format!("{family}_sum"), m, None, s.sample_sum());
                }
            }
        }
    }
    out.push_str("# EOF\n");
    out
}

fn line(out: &mut String, name: &str, m: &Metric, extra: Option<(&str, &str)>, value: f64) {
    out.push_str(name);
    let labels = m.get_label();
    if !labels.is_empty() || extra.is_some() {
        out.push('{');
        let mut first = true;
        let pairs = labels.iter().map(|l| (l.name(), l.value())).chain(extra);
        for (k, v) in pairs {
            if !first {
                out.push(',');
            }
            first = false;
            let _ = write!(out, "{k}=\"{}\"", escape(v));
        }
        out.push('}');
    }
    out.push(' ');
    out.push_str(&number(value));
    out.push('\n');
}

/// A number as OpenMetrics writes it (`+Inf`, `-Inf`, `NaN` for the special values).
fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".to_owned()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.to_owned()
    } else {
        v.to_string()
    }
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_headers() {
        assert!(wanted(
            "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
        ));
        assert!(!wanted("text/plain;version=0.0.4"));
        assert!(!wanted("application/openmetrics-text;q=0"));
        assert!(!wanted(""));
    }

    #[test]
    fn counters_drop_total_from_the_family_name_and_the_text_ends_with_eof() {
        let c = prometheus::IntCounterVec::new(
            prometheus::Opts::new("kw_things_total", "Things \"seen\".\nTwice."),
            &["who"],
        )
        .unwrap();
        c.with_label_values(&["a\"b"]).inc_by(3);
        let h = prometheus::Histogram::with_opts(
            prometheus::HistogramOpts::new("kw_wait_seconds", "Waits.").buckets(vec![0.5]),
        )
        .unwrap();
        h.observe(0.25);
        let r = prometheus::Registry::new();
        r.register(Box::new(c)).unwrap();
        r.register(Box::new(h)).unwrap();
        assert_eq!(
            encode(&r.gather()),
            "# TYPE kw_things counter\n\
             # HELP kw_things Things \\\"seen\\\".\\nTwice.\n\
             kw_things_total{who=\"a\\\"b\"} 3\n\
             # TYPE kw_wait_seconds histogram\n\
             # HELP kw_wait_seconds Waits.\n\
             kw_wait_seconds_bucket{le=\"0.5\"} 1\n\
             kw_wait_seconds_bucket{le=\"+Inf\"} 1\n\
             kw_wait_seconds_count 1\n\
             kw_wait_seconds_sum 0.25\n\
             # EOF\n"
        );
    }
}

//! The picture in a rate or error alert's email: the subject's requests (or errors of the
//! alert's class) per hour over its last hours as bars, the band its baseline expected behind
//! them, and the alerting hour in red — drawn as a small PNG by keywatch itself (a palette
//! image, deflated with flate2), so no chart library or font is needed and the same alert
//! always gives the same bytes.
//!
//! Owns only drawing: it reads the `hourly` series in the evidence (put there by the rate
//! detector, or for error alerts by the pipeline from the usage rollups) and never decides
//! anything about the alert.

use sha2::Digest;

use super::AlertChange;

/// The image's size in pixels.
pub const WIDTH: u32 = 480;
pub const HEIGHT: u32 = 160;

/// Palette indexes.
const BG: u8 = 0;
const AXIS: u8 = 1;
const BAND: u8 = 2;
const BAR: u8 = 3;
const HOT: u8 = 4;
const MEDIAN: u8 = 5;
const PALETTE: [[u8; 3]; 6] = [
    [255, 255, 255],
    [120, 120, 120],
    [222, 230, 242],
    [96, 125, 160],
    [200, 30, 45],
    [40, 70, 120],
];

/// The band drawn around what the baseline expected: from half to one and a half times it.
const BAND_LOW: f64 = 0.5;
const BAND_HIGH: f64 = 1.5;

/// One hour of the series: its start (Unix seconds), the count, what was expected.
pub type Hour = (i64, u32, Option<f64>);

/// The hourly series in `a`'s evidence, when it has one worth drawing (two hours or more).
pub fn series(a: &AlertChange) -> Option<Vec<Hour>> {
    let v = a.evidence.get("hourly")?.as_array()?;
    let hours: Vec<Hour> = v
        .iter()
        .filter_map(|p| {
            let p = p.as_array()?;
            Some((
                p.first()?.as_i64()?,
                u32::try_from(p.get(1)?.as_u64()?).ok()?,
                p.get(2).and_then(|e| e.as_f64()),
            ))
        })
        .collect();
    (hours.len() >= 2).then_some(hours)
}

/// The Content-ID the HTML part refers to `a`'s chart by: stable for the alert.
pub fn content_id(a: &AlertChange) -> String {
    let h = sha2::Sha256::digest(a.fingerprint.as_bytes());
    format!("chart-{}@keywatch", hex::encode(&h[..8]))
}

/// Draws `hours` (the last one is the alerting hour) as a PNG.
pub fn png(hours: &[Hour]) -> Vec<u8> {
    let (w, h) = (WIDTH as usize, HEIGHT as usize);
    let mut px = vec![BG; w * h];
    let (left, right, top, bottom) = (8usize, 8usize, 8usize, 12usize);
    let plot_w = w - left - right;
    let plot_h = h - top - bottom;
    let max = hours
        .iter()
        .map(|&(_, n, e)| f64::from(n).max(e.unwrap_or(0.0) * BAND_HIGH))
        .fold(1.0, f64::max);
    // Value → pixel row (0 at the top), clamped to the plot.
    let y = |v: f64| -> usize {
        let frac = (v / max).clamp(0.0, 1.0);
        top + plot_h - (frac * plot_h as f64).round() as usize
    };
    let slot = plot_w / hours.len().max(1);
    let bar = (slot * 3 / 5).max(1);
    let mut fill = |x0: usize, x1: usize, y0: usize, y1: usize, c: u8| {
        for row in y0.min(h)..y1.min(h) {
            for col in x0.min(w)..x1.min(w) {
                px[row * w + col] = c;
            }
        }
    };
    let last = hours.len().saturating_sub(1);
    for (i, &(_, n, expected)) in hours.iter().enumerate() {
        let x0 = left + i * slot;
        if let Some(e) = expected {
            fill(x0, x0 + slot, y(e * BAND_HIGH), y(e * BAND_LOW), BAND);
        }
        let x = x0 + (slot - bar) / 2;
        let c = if i == last { HOT } else { BAR };
        fill(x, x + bar, y(f64::from(n)), top + plot_h, c);
        if let Some(e) = expected {
            let r = y(e);
            fill(x0, x0 + slot, r.saturating_sub(1), r + 1, MEDIAN);
        }
    }
    // The axis, and a tick under each hour.
    fill(left, left + plot_w, top + plot_h, top + plot_h + 1, AXIS);
    for i in 0..=hours.len() {
        let x = left + i * slot;
        fill(x, x + 1, top + plot_h, top + plot_h + 4, AXIS);
    }
    encode(&px, WIDTH, HEIGHT)
}

/// A palette PNG of `px` (one index a pixel).
fn encode(px: &[u8], w: u32, h: u32) -> Vec<u8> {
    use std::io::Write;
    let mut raw = Vec::with_capacity(px.len() + h as usize);
    for row in px.chunks(w as usize) {
        raw.push(0); // filter: none
        raw.extend_from_slice(row);
    }
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    z.write_all(&raw).expect("writing to a Vec cannot fail");
    let idat = z.finish().expect("writing to a Vec cannot fail");
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::with_capacity(13);
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 3, 0, 0, 0]); // 8-bit indexes into a palette
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(&mut out, b"PLTE", PALETTE.as_flattened());
    chunk(&mut out, b"IDAT", &idat);
    chunk(&mut out, b"IEND", &[]);
    out
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    // PNG's CRC is gzip's CRC-32, over the type and the data.
    let mut crc = flate2::Crc::new();
    crc.update(kind);
    crc.update(data);
    out.extend_from_slice(&crc.sum().to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hours() -> Vec<Hour> {
        (0..12)
            .map(|i| {
                (
                    1_700_000_000 + i * 3600,
                    if i == 11 { 900 } else { 100 },
                    Some(100.0),
                )
            })
            .collect()
    }

    #[test]
    fn the_png_is_well_formed_and_small() {
        let p = png(&hours());
        assert_eq!(&p[..8], b"\x89PNG\r\n\x1a\n");
        assert_eq!(&p[12..16], b"IHDR");
        assert_eq!(u32::from_be_bytes(p[16..20].try_into().unwrap()), WIDTH);
        assert_eq!(u32::from_be_bytes(p[20..24].try_into().unwrap()), HEIGHT);
        assert!(
            p.ends_with(&[0xae, 0x42, 0x60, 0x82]),
            "IEND's CRC closes the file"
        );
        assert!(p.len() < 4096, "{} bytes", p.len());
        assert_eq!(png(&hours()), p, "the same series draws the same bytes");
    }

    #[test]
    fn the_alerting_hour_is_red_and_the_others_are_not() {
        // Decode our own IDAT and look at the pixels: the last bar's column holds HOT, the
        // first bar's only BAR.
        let p = png(&hours());
        let len = u32::from_be_bytes(p[33..37].try_into().unwrap()) as usize; // PLTE
        let idat_at = 33 + 12 + len;
        assert_eq!(&p[idat_at + 4..idat_at + 8], b"IDAT");
        let n = u32::from_be_bytes(p[idat_at..idat_at + 4].try_into().unwrap()) as usize;
        let mut raw = Vec::new();
        std::io::Read::read_to_end(
            &mut flate2::read::ZlibDecoder::new(&p[idat_at + 8..idat_at + 8 + n]),
            &mut raw,
        )
        .unwrap();
        let stride = WIDTH as usize + 1;
        let column = |x: usize| -> Vec<u8> {
            (0..HEIGHT as usize)
                .map(|row| raw[row * stride + 1 + x])
                .collect()
        };
        let slot = (WIDTH as usize - 16) / 12;
        let middle = |i: usize| 8 + i * slot + slot / 2;
        assert!(column(middle(11)).contains(&HOT));
        assert!(!column(middle(0)).contains(&HOT));
        assert!(column(middle(0)).contains(&BAR));
        assert!(column(middle(0)).contains(&BAND));
    }
}

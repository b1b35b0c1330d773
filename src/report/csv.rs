//! CSV as the CLI (`--format csv`) and the API (`Accept: text/csv`, `format=csv`) both write
//! it: quoting, formula neutralisation, and flattening JSON rows into columns.
//!
//! Owns only text layout; it reads no data and decides nothing about what a report holds.

use std::io::Write;

use serde_json::Value;

/// A CSV cell, quoted when needed; a leading formula character is neutralised so a
/// spreadsheet never runs text that came from a log line.
pub fn csv_cell(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '@']) || (s.starts_with('-') && s.parse::<f64>().is_err()) {
        format!("'{s}")
    } else {
        s.to_owned()
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

/// Writes a header line and one line per row.
pub fn write_csv<H: AsRef<str>>(
    out: &mut impl Write,
    header: &[H],
    rows: &[Vec<String>],
) -> std::io::Result<()> {
    let head: Vec<String> = header.iter().map(|h| csv_cell(h.as_ref())).collect();
    writeln!(out, "{}", head.join(","))?;
    for r in rows {
        let cells: Vec<String> = r.iter().map(|c| csv_cell(c)).collect();
        writeln!(out, "{}", cells.join(","))?;
    }
    Ok(())
}

/// JSON objects as a table: nested objects become `parent_child` columns, in the order of
/// the first row; arrays and other values are written as compact JSON.
pub fn flatten(rows: &[Value]) -> (Vec<String>, Vec<Vec<String>>) {
    fn walk(prefix: &str, v: &Value, out: &mut Vec<(String, String)>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    let name = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}_{k}")
                    };
                    walk(&name, v, out);
                }
            }
            Value::Null => out.push((prefix.to_owned(), String::new())),
            Value::String(s) => out.push((prefix.to_owned(), s.clone())),
            other => out.push((prefix.to_owned(), other.to_string())),
        }
    }
    let mut header: Vec<String> = Vec::new();
    let mut cells: Vec<Vec<(String, String)>> = Vec::with_capacity(rows.len());
    for r in rows {
        let mut out = Vec::new();
        walk("", r, &mut out);
        for (k, _) in &out {
            if !header.contains(k) {
                header.push(k.clone());
            }
        }
        cells.push(out);
    }
    let table = cells
        .into_iter()
        .map(|row| {
            header
                .iter()
                .map(|h| {
                    row.iter()
                        .find(|(k, _)| k == h)
                        .map(|(_, v)| v.clone())
                        .unwrap_or_default()
                })
                .collect()
        })
        .collect();
    (header, table)
}

/// JSON objects as a CSV document.
pub fn json_to_csv(rows: &[Value]) -> String {
    let (header, table) = flatten(rows);
    let mut out = Vec::new();
    // Writing to a Vec cannot fail.
    let _ = write_csv(&mut out, &header, &table);
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn csv_cells_cannot_inject_formulas() {
        assert_eq!(csv_cell("=HYPERLINK(\"x\")"), "\"'=HYPERLINK(\"\"x\"\")\"");
        assert_eq!(csv_cell("a,b"), "\"a,b\"");
        assert_eq!(csv_cell("-5"), "-5");
        assert_eq!(csv_cell("plain"), "plain");
    }

    #[test]
    fn nested_rows_flatten_into_columns() {
        let rows = [
            json!({"a": 1, "e": {"x": 2, "y": null}, "s": "=1+1"}),
            json!({"a": 3, "e": {"x": 4, "y": 5}, "s": "ok"}),
        ];
        assert_eq!(json_to_csv(&rows), "a,e_x,e_y,s\n1,2,,'=1+1\n3,4,5,ok\n");
    }
}

//! A real SMTP (or webhook) server on loopback for the tests: one of the Python scripts in
//! tests/data (aiosmtpd's `smtp_sink.py`, `webhook_sink.py`), writing each message it accepts
//! to a directory as JSON.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use serde_json::Value;

use super::python_module;

/// A running SMTP (or webhook) sink; killed when dropped.
pub struct Sink {
    child: Option<Child>,
    pub port: u16,
    pub dir: PathBuf,
    script: &'static str,
    args: Vec<String>,
}

pub fn aiosmtpd_available() -> bool {
    python_module("aiosmtpd", "aiosmtpd", "SMTP tests")
}

impl Sink {
    pub fn new(dir: PathBuf, port: u16) -> Sink {
        std::fs::create_dir_all(&dir).unwrap();
        Sink {
            child: None,
            port,
            dir,
            script: "smtp_sink.py",
            args: vec![],
        }
    }

    /// A sink started by `script` in tests/data with `args` after its port and directory.
    pub fn with(mut self, script: &'static str, args: &[&str]) -> Sink {
        self.script = script;
        self.args = args.iter().map(|a| a.to_string()).collect();
        self
    }

    pub fn start(&mut self) {
        use std::io::BufRead;
        let mut child = Command::new("python3")
            .arg(
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("tests/data")
                    .join(self.script),
            )
            .arg(self.port.to_string())
            .arg(&self.dir)
            .args(&self.args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 runs");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "the sink {} started", self.script);
        self.child = Some(child);
    }

    pub fn messages(&self) -> Vec<Value> {
        received(&self.dir)
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The `.json` records a sink wrote to `dir`, oldest first (none when `dir` is missing).
pub fn received(dir: &Path) -> Vec<Value> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| Some(e.ok()?.path())).collect())
        .unwrap_or_default();
    names.retain(|p| p.extension().is_some_and(|x| x == "json"));
    names.sort();
    names
        .iter()
        .map(|p| serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap())
        .collect()
}

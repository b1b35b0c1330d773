//! Faults `keywatch run` survives, each against the real thing (issue 9): PostgreSQL cut off
//! while it runs (a TCP proxy of the test's own in front of the real server, so the shared
//! server is never stopped), SQLite on a real full or read-only file system (a tmpfs mounted
//! by the test), a tailed file deleted, truncated, replaced by a directory or unreadable
//! (keywatch run as an unprivileged user, so permissions bite even when the tests run as
//! root), and GeoIP databases missing, corrupt or overwritten in place under a running
//! daemon. Every test ends by comparing the usage totals with an oracle: nothing lost, nothing
//! counted twice.

mod common;

use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// A `keywatch run`, killed when the test ends (also when it fails).
struct Daemon {
    child: Child,
    addr: String,
    stderr: PathBuf,
}

impl Daemon {
    /// Starts `cmd` (a keywatch command line up to the options of `run`) on a free port, with
    /// its stderr in `stderr`, and waits until it answers `/healthz`.
    fn start(mut cmd: Command, stderr: PathBuf) -> Daemon {
        let addr = format!("127.0.0.1:{}", free_port());
        let child = cmd
            .args(["--listen", &addr])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("keywatch starts");
        let mut d = Daemon {
            child,
            addr,
            stderr,
        };
        let up = wait_until(Duration::from_secs(30), || {
            get(&d.addr, "/healthz", "*/*").is_some_and(|r| r.0 == 200)
        });
        assert!(
            up && d.alive(),
            "keywatch run answers /healthz:\n{}",
            d.log()
        );
        d
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// The sum of every series of the metric `name`.
    fn metric(&self, name: &str) -> f64 {
        scrape(&self.addr)
            .lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|r| r.starts_with(' ') || r.starts_with('{'))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    fn readyz(&self) -> (u16, String) {
        let (status, _, body) = get(&self.addr, "/readyz", "*/*").expect("/readyz answers");
        (status, body)
    }

    fn signal(&self, signal: &str) {
        Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill runs");
    }

    fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < within {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }

    /// SIGTERM, then the exit status (a clean stop commits what was read).
    fn stop(mut self) -> ExitStatus {
        self.signal("TERM");
        let status = self.wait_exit(Duration::from_secs(60));
        status.unwrap_or_else(|| panic!("keywatch did not stop on SIGTERM:\n{}", self.log()))
    }

    /// Waits until the log has `text`.
    fn logged(&self, text: &str) -> bool {
        wait_until(Duration::from_secs(30), || self.log().contains(text))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `n` simulated lines (their keys created in `db`).
fn lines(db: &TestDb, n: u64, keys: u64, seed: &str) -> Vec<String> {
    let log = db.path(&format!("gen-{seed}.log"));
    simulate(
        db,
        &log,
        &[
            "--keys",
            &keys.to_string(),
            "--lines",
            &n.to_string(),
            "--seed",
            seed,
        ],
    );
    std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// `keywatch [global options] run --source file:LOG` against `url`.
fn run_file(url: &str, log: &Path, global: &[&str]) -> Command {
    let mut cmd = keywatch();
    cmd.args(["--database-url", url])
        .args(global)
        .arg("run")
        .arg("--source")
        .arg(format!("file:{}", log.display()));
    cmd
}

/// What the oracle counts per key in `lines`.
fn expected(db: &TestDb, lines: &[String]) -> std::collections::BTreeMap<Option<String>, Tally> {
    let all = db.path("expected.log");
    std::fs::write(&all, lines.join("\n") + "\n").unwrap();
    oracle(&all).0
}

/// Waits for the reported total to reach `want`, then checks it stays there and that every
/// key's counts are the oracle's.
fn assert_exact(db: &TestDb, all: &[String]) {
    let want = all.len() as u64;
    let reached = wait_until(Duration::from_secs(90), || total_requests(db) >= want);
    let got = total_requests(db);
    assert!(reached, "reported {got} of {want} requests");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(total_requests(db), want, "nothing counted twice");
    assert_eq!(
        reported(db, "key"),
        expected(db, all),
        "per-key totals exact"
    );
}

fn no_panic(log: &str) {
    assert!(
        !log.contains("panicked") && !log.contains("RUST_BACKTRACE"),
        "{log}"
    );
}

/// A TCP proxy in front of a real server that the test cuts: while cut, every connection
/// through it is reset and new ones are closed at once (as when the server restarts or the
/// network drops), until it is restored.
struct Proxy {
    port: u16,
    up: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    fn start(upstream: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (up2, conns2) = (Arc::clone(&up), Arc::clone(&conns));
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                // Under the lock, so that a cut closes every connection it let through.
                let mut live = conns2.lock().unwrap();
                if !up2.load(Ordering::SeqCst) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(&upstream) else {
                    continue;
                };
                for s in [&client, &server] {
                    live.push(s.try_clone().unwrap());
                }
                pipe(client.try_clone().unwrap(), server.try_clone().unwrap());
                pipe(server, client);
            }
        });
        Proxy { port, up, conns }
    }

    fn cut(&self) {
        let mut live = self.conns.lock().unwrap();
        self.up.store(false, Ordering::SeqCst);
        for s in live.drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut from, &mut to);
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    });
}

/// PostgreSQL cut off while keywatch follows a file: it reads up to its bounded buffer and
/// then stops reading (never drops), says so in the log, in `keywatch_commits_blocked` and in
/// `/readyz`, reconnects with backoff once the server is back, and catches up exactly. Then
/// cuts at random moments while lines keep coming (a COMMIT whose answer is lost included):
/// still exact. The outage is 15 s rather than a minute: past the pool's 10 s connect timeout,
/// the behaviour no longer changes with its length.
#[test]
fn postgres_cut_off_holds_the_sources_back_and_loses_nothing() {
    let Some(db) = TestDb::new(Backend::Postgres) else {
        return;
    };
    let (base, rest) = db.url.split_once('@').expect("user@host in the URL");
    let (upstream, name) = rest.split_once('/').expect("/database in the URL");
    let proxy = Proxy::start(upstream.to_owned());
    let via_proxy = format!("{base}@127.0.0.1:{}/{name}", proxy.port);
    let all = lines(&db, 80_000, 20, "91");
    let log = db.path("requests.log");
    append(&log, &all[..5_000]);
    let cmd = run_file(&via_proxy, &log, &["--log", "info"]);
    let mut d = Daemon::start(cmd, db.path("stderr.log"));
    assert_exact(&db, &all[..5_000]);
    assert_eq!(d.metric("keywatch_commits_blocked"), 0.0);

    let cut_at = Instant::now();
    proxy.cut();
    // About 36 MiB of lines, more than the pipeline buffers: a batch (at most 25,000 lines)
    // and 8 chunks of 1 MiB.
    append(&log, &all[5_000..65_000]);
    let read = |d: &Daemon| d.metric("keywatch_lines_ingested_total");
    let stalled = wait_until(Duration::from_secs(60), || {
        let before = read(&d);
        std::thread::sleep(Duration::from_secs(2));
        d.metric("keywatch_commits_blocked") == 1.0 && read(&d) == before
    });
    let held = read(&d);
    assert!(stalled, "reading stops while commits fail:\n{}", d.log());
    assert!(
        held < 50_000.0,
        "reading stopped well before the end of the file (65,000 lines), at {held} lines"
    );
    let (status, body) = d.readyz();
    assert_eq!(status, 503, "{body}");
    assert!(body.starts_with("commits have failed for "), "{body}");
    assert!(body.contains("the sources are held back"), "{body}");
    assert!(d.logged("Cannot commit counts; holding the sources back"));
    while cut_at.elapsed() < Duration::from_secs(15) {
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(d.alive(), "keywatch keeps running:\n{}", d.log());
    assert_eq!(
        read(&d),
        held,
        "nothing more read while the database is away"
    );

    proxy.restore();
    let restored = Instant::now();
    assert_exact(&db, &all[..65_000]);
    eprintln!(
        "measured: {held} of 65,000 lines read during a {} s cut; all counted {:.1} s after the restore (1.5 s of that is assert_exact's settle check)",
        cut_at.elapsed().as_secs() - restored.elapsed().as_secs(),
        restored.elapsed().as_secs_f64()
    );
    assert!(d.logged("Commits succeed again; reading resumes."));
    assert_eq!(d.metric("keywatch_commits_blocked"), 0.0);
    assert!(wait_until(Duration::from_secs(10), || d.readyz().0 == 200));

    // Short cuts at random moments while lines keep coming.
    let writer = {
        let (log, rest) = (log.clone(), all[65_000..].to_vec());
        std::thread::spawn(move || {
            for part in rest.chunks(100) {
                append(&log, part);
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let mut rng = Rng(0x5eed_0009);
    for _ in 0..6 {
        std::thread::sleep(Duration::from_millis(300 + rng.below(1_700)));
        proxy.cut();
        std::thread::sleep(Duration::from_millis(200 + rng.below(1_300)));
        proxy.restore();
    }
    writer.join().unwrap();
    assert_exact(&db, &all);
    assert!(d.stop().success());
    no_panic(&std::fs::read_to_string(db.path("stderr.log")).unwrap());
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

/// Whether this process may mount file systems (root). Without it the test is skipped,
/// except under CI, which runs as root.
fn can_mount(what: &str) -> bool {
    let root = is_root();
    if !root {
        assert!(
            std::env::var("CI").is_err(),
            "CI is set but the tests do not run as root: the {what} must run"
        );
        eprintln!("skipped: {what} (needs root to mount a tmpfs)");
    }
    root
}

/// A tmpfs of the test's own, unmounted when the test ends (also when it fails).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: PathBuf, size_kib: u64) -> Tmpfs {
        std::fs::create_dir_all(&at).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_kib}k"), "tmpfs"])
            .arg(&at)
            .status()
            .expect("mount runs");
        assert!(ok.success(), "mount -t tmpfs at {}", at.display());
        Tmpfs(at)
    }

    fn remount(&self, options: &str) {
        let ok = Command::new("mount")
            .args(["-o", &format!("remount,{options}")])
            .arg(&self.0)
            .status()
            .expect("mount runs");
        assert!(ok.success(), "mount -o remount,{options}");
    }

    fn used_kib(&self) -> u64 {
        let out = Command::new("du")
            .args(["-sk"])
            .arg(&self.0)
            .output()
            .expect("du runs");
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .expect("du prints a size")
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A test database whose SQLite file is on a 64 MiB tmpfs of its own, and `n` lines of
/// `keys` keys in a log beside it (not on the tmpfs). `None` when the test cannot mount.
fn on_tmpfs(
    what: &str,
    n: u64,
    keys: u64,
    seed: &str,
) -> Option<(TestDb, Tmpfs, Vec<String>, PathBuf)> {
    if !can_mount(what) {
        return None;
    }
    let mut db = TestDb::new(Backend::Sqlite).unwrap();
    let fs = Tmpfs::mount(db.path("fs"), 64 * 1024);
    db.url = format!("sqlite://{}", fs.0.join("keywatch.db").display());
    let all = lines(&db, n, keys, seed);
    let log = db.path("requests.log");
    Some((db, fs, all, log))
}

/// Counts committed and the checkpoint of `log`, read straight from the SQLite file.
fn committed(db: &TestDb, log: &Path) -> (u64, u64) {
    let total = db.query("SELECT CAST(COALESCE(SUM(requests), 0) AS TEXT) FROM kw_usage_day");
    let cp = db.query(&format!(
        "SELECT CAST(line_no AS TEXT) FROM kw_checkpoints WHERE path = '{}'",
        log.display()
    ));
    let n = |v: Option<&Option<String>>| v.and_then(|s| s.as_deref()?.parse().ok()).unwrap_or(0);
    (n(total[0].first()), n(cp.first().and_then(|r| r.first())))
}

/// The SQLite file's disk fills up while keywatch runs: it stops at once with one sentence
/// saying so (not a retry loop, not a panic), the last committed checkpoint matches the
/// counts committed with it, and a restart after space is freed continues with exact counts.
#[test]
fn sqlite_disk_full_stops_cleanly_and_a_restart_continues_exactly() {
    let Some((db, fs, all, log)) = on_tmpfs("full-disk test", 100_000, 200, "92") else {
        return;
    };
    let url = db.url.clone();
    append(&log, &all[..2_000]);
    let run = || run_file(&url, &log, &[]);
    let mut d = Daemon::start(run(), db.path("stderr.log"));
    assert_exact(&db, &all[..2_000]);

    // Leave about 600 KiB free: the next batches fill it.
    fs.remount(&format!("size={}k", fs.used_kib() + 600));
    append(&log, &all[2_000..]);
    let status = d.wait_exit(Duration::from_secs(60));
    let log_text = d.log();
    let status = status.unwrap_or_else(|| panic!("keywatch stops on a full disk:\n{log_text}"));
    assert_eq!(status.code(), Some(1), "{log_text}");
    let last = log_text.lines().last().unwrap_or_default();
    assert!(
        last.starts_with(&format!(
            "keywatch: cannot write to the database at {url}: the disk is full ("
        )) && last.ends_with(
            "keywatch stopped with every count and checkpoint up to its last commit kept, so fix this and start it again to continue from there"
        ),
        "{log_text}"
    );
    no_panic(&log_text);

    fs.remount("size=65536k");
    let (total, line_no) = committed(&db, &log);
    eprintln!("measured: stopped on a full disk with {line_no} of 100,000 lines committed");
    assert!(
        (2_000..100_000).contains(&line_no),
        "stopped part way: {line_no}"
    );
    assert_eq!(
        total, line_no,
        "the checkpoint and the counts committed with it agree"
    );
    let d = Daemon::start(run(), db.path("stderr-2.log"));
    assert_exact(&db, &all);
    assert!(d.stop().success());
}

/// A SQLite file on a read-only file system: keywatch refuses to start with one sentence
/// naming the problem, and starts and counts once the file system is writable again.
#[test]
fn sqlite_read_only_refuses_to_start_with_the_reason() {
    let Some((db, fs, all, log)) = on_tmpfs("read-only test", 3_000, 10, "93") else {
        return;
    };
    let url = db.url.clone();
    append(&log, &all);
    // (A file system with a writer cannot be made read-only: mount refuses while keywatch
    // runs, so the read-only case is met at start.)
    fs.remount("ro");
    let out = run_file(&url, &log, &[])
        .args(["--listen", "127.0.0.1:0"])
        .output()
        .expect("keywatch runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let dir = fs.0.display();
    assert_eq!(
        stderr.lines().last().unwrap_or_default(),
        format!(
            "keywatch: cannot open the database at {url}: its directory {dir} is not writable (Read-only file system (os error 30)), and SQLite must write beside the file (its journal)"
        ),
        "{stderr}"
    );
    fs.remount("rw");
    let d = Daemon::start(run_file(&url, &log, &[]), db.path("stderr.log"));
    assert_exact(&db, &all);
    assert!(d.stop().success());
}

/// When the tests run as root, keywatch runs as `nobody` in the file test, so that a file it
/// may not read is really unreadable to it.
fn unprivileged(cmd: Command, dir: &Path) -> Command {
    if !is_root() {
        return cmd;
    }
    let ok = Command::new("chown")
        .args(["-R", "65534:65534"])
        .arg(dir)
        .status()
        .expect("chown runs");
    assert!(ok.success());
    let mut c = Command::new("setpriv");
    c.current_dir(dir);
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    c
}

/// The tailed file deleted, truncated, replaced by a directory, replaced by a file keywatch
/// may not read, and made unreadable while open: each is logged and retried, keywatch keeps
/// running, and every line that was readable is counted exactly once.
#[test]
fn a_tailed_file_deleted_truncated_replaced_or_unreadable_is_retried() {
    let db = TestDb::new(Backend::Sqlite).unwrap();
    let all = lines(&db, 6_000, 10, "94");
    let parts: Vec<&[String]> = all.chunks(1_000).collect();
    let log = db.path("requests.log");
    let set_mode = |p: &Path, mode: u32| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    append(&log, parts[0]);
    let cmd = unprivileged(run_file(&db.url, &log, &["--log", "info"]), db.dir.path());
    let mut d = Daemon::start(cmd, db.path("stderr.log"));
    let counted = |n: usize| assert_exact(&db, &all[..n]);
    counted(1_000);

    // Deleted, then created again.
    std::fs::remove_file(&log).unwrap();
    assert!(d.logged("File is missing; waiting for it to appear."));
    append(&log, parts[1]);
    counted(2_000);

    // Truncated in place, then written again.
    std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&log)
        .unwrap();
    assert!(d.logged("File was truncated; reading it again from the start."));
    append(&log, parts[2]);
    counted(3_000);

    // Moved away and replaced by a directory for a while, then by a new file.
    std::fs::rename(&log, db.path("requests.log.1")).unwrap();
    std::fs::create_dir(&log).unwrap();
    assert!(d.logged("the path is a directory"));
    assert!(d.alive() && d.readyz().0 == 200);
    std::fs::remove_dir(&log).unwrap();
    append(&log, parts[3]);
    counted(4_000);

    // Rotated to a new file keywatch may not read, until its mode is fixed.
    let fresh = db.path("requests.log.new");
    append(&fresh, parts[4]);
    set_mode(&fresh, 0o000);
    std::fs::rename(&fresh, &log).unwrap();
    assert!(d.logged("Permission denied"));
    std::thread::sleep(Duration::from_secs(1));
    assert!(d.alive() && d.readyz().0 == 200);
    set_mode(&log, 0o644);
    counted(5_000);

    // Made unreadable while open: what is appended is still read through the open file, as
    // `tail -F` does.
    set_mode(&log, 0o000);
    append(&log, parts[5]);
    counted(6_000);
    set_mode(&log, 0o644);

    let text = d.log();
    assert!(d.stop().success(), "{text}");
    no_panic(&text);
}

const GEO_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/geoip");

/// Lines from known keys, all from 81.2.69.160 (London in GeoIP2-City-Test).
fn london_lines(db: &TestDb, n: u64, seed: &str) -> Vec<String> {
    lines(db, n, 5, seed)
        .into_iter()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(&l).unwrap();
            v["source_ip"] = "81.2.69.160".into();
            v.to_string()
        })
        .collect()
}

/// Requests of known keys that keywatch placed in `country`.
fn placed_in(db: &TestDb, country: &str) -> u64 {
    let rows = db.query(&format!(
        "SELECT CAST(COALESCE(SUM(requests), 0) AS TEXT) FROM kw_key_activity WHERE facet = 'country' AND value = '{country}'"
    ));
    rows[0][0].as_deref().unwrap_or("0").parse().unwrap()
}

fn requests_of_known_keys(db: &TestDb) -> u64 {
    reported(db, "key")
        .iter()
        .filter(|(k, _)| k.is_some())
        .map(|(_, t)| t.requests)
        .sum()
}

/// A missing or corrupt GeoIP database at start: one sentence naming the file and the fault.
#[test]
fn a_missing_or_corrupt_geoip_database_is_refused_at_start() {
    let db = TestDb::new(Backend::Sqlite).unwrap();
    let log = db.path("requests.log");
    std::fs::write(&log, "").unwrap();
    let start = |geo: &Path| {
        let geoip = geo.display().to_string();
        let out = run_file(&db.url, &log, &["--geoip", &geoip])
            .args(["--listen", "127.0.0.1:0"])
            .output()
            .expect("keywatch runs");
        assert_eq!(out.status.code(), Some(1));
        String::from_utf8(out.stderr).unwrap()
    };
    let missing = db.path("nowhere.mmdb");
    assert_eq!(
        start(&missing).lines().last().unwrap(),
        format!(
            "keywatch: cannot read the GeoIP path {}: No such file or directory (os error 2)",
            missing.display()
        )
    );
    let truncated = db.path("truncated.mmdb");
    let city = std::fs::read(Path::new(GEO_DIR).join("GeoIP2-City-Test.mmdb")).unwrap();
    std::fs::write(&truncated, &city[..city.len() / 2]).unwrap();
    for (path, fault) in [
        (
            Path::new(GEO_DIR).join("GeoIP2-City-Test-Invalid-Node-Count.mmdb"),
            "the MaxMind DB file's search tree extends beyond the metadata section",
        ),
        (truncated, "could not find MaxMind DB metadata"),
        (
            Path::new(GEO_DIR).join("GeoIP2-City-Test-Broken-Double-Format.mmdb"),
            ": double of size ",
        ),
    ] {
        let err = start(&path);
        let last = err.lines().last().unwrap();
        assert!(
            last.starts_with(&format!(
                "keywatch: {} is not a usable MaxMind DB file (",
                path.display()
            )) && last.contains(fault)
                && last.ends_with("); replace it or point --geoip elsewhere"),
            "{err}"
        );
    }
}

/// The GeoIP database overwritten in place (truncated, then written: what a plain `cp` over
/// it does) under a running daemon: keywatch, which reads databases into memory rather than
/// mapping them, keeps running and locating with the database it loaded; SIGHUP then refuses
/// the broken file and a deleted one with a log line each and keeps the previous database,
/// and takes a good one.
#[test]
fn a_geoip_database_overwritten_in_place_or_deleted_keeps_the_previous_one() {
    let db = TestDb::new(Backend::Sqlite).unwrap();
    let live = db.path("geo.mmdb");
    let city = std::fs::read(Path::new(GEO_DIR).join("GeoIP2-City-Test.mmdb")).unwrap();
    std::fs::write(&live, &city).unwrap();
    let all = london_lines(&db, 3_000, "95");
    let log = db.path("requests.log");
    append(&log, &all[..1_000]);
    let geoip = live.display().to_string();
    let cmd = run_file(&db.url, &log, &["--log", "info", "--geoip", &geoip]);
    let mut d = Daemon::start(cmd, db.path("stderr.log"));
    assert_exact(&db, &all[..1_000]);
    let known = requests_of_known_keys(&db);
    assert!(known > 900, "{known}");
    assert_eq!(placed_in(&db, "GB"), known, "every request placed in GB");

    // Overwritten in place by a broken file much shorter than the old one.
    std::fs::write(&live, &city[..1_000]).unwrap();
    append(&log, &all[1_000..2_000]);
    assert_exact(&db, &all[..2_000]);
    assert!(d.alive(), "{}", d.log());
    d.signal("HUP");
    assert!(d.logged("A replaced GeoIP database does not open; keeping the previous one."));
    assert!(d.log().contains(&format!(
        "{} is not a usable MaxMind DB file",
        live.display()
    )));

    // Deleted.
    std::fs::remove_file(&live).unwrap();
    d.signal("HUP");
    assert!(d.logged("No such file or directory"));
    append(&log, &all[2_000..]);
    assert_exact(&db, &all);
    assert!(d.alive());
    assert_eq!(
        placed_in(&db, "GB"),
        requests_of_known_keys(&db),
        "the previous database stayed in use"
    );
    scrape(&d.addr)
        .lines()
        .find(|l| {
            l.starts_with("keywatch_geoip_database_build_timestamp_seconds{")
                && l.contains("GeoIP2-City")
        })
        .expect("the City database is still the one in use");

    // A good database again, written in place too.
    let asn = std::fs::read(Path::new(GEO_DIR).join("GeoLite2-ASN-Test.mmdb")).unwrap();
    std::fs::write(&live, asn).unwrap();
    d.signal("HUP");
    let swapped = wait_until(Duration::from_secs(20), || {
        scrape(&d.addr).contains("database_type=\"GeoLite2-ASN\"")
    });
    assert!(swapped, "{}", d.log());
    let text = d.log();
    assert!(d.stop().success(), "{text}");
    no_panic(&text);
}

/// A PostgreSQL cluster of the test's own (initdb in a temp dir, on a free port; as the
/// `postgres` user when the tests run as root, since PostgreSQL refuses root), stopped at
/// once when the test ends, also when it fails.
struct Cluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
}

impl Cluster {
    fn new() -> Option<Cluster> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| Some(e.ok()?.path().join("bin")))
            .filter(|b| b.join("initdb").is_file())
            .max();
        let Some(bin) = bin else {
            assert!(
                std::env::var("CI").is_err(),
                "CI is set but no PostgreSQL server binaries are in /usr/lib/postgresql: the restart test must run"
            );
            eprintln!("skipped: PostgreSQL restart test (no /usr/lib/postgresql/*/bin/initdb)");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let c = Cluster {
            dir,
            bin,
            port: free_port(),
        };
        if is_root() {
            let ok = Command::new("chown")
                .args(["-R", "postgres"])
                .arg(c.dir.path())
                .status()
                .unwrap();
            assert!(ok.success());
        }
        let data = c.dir.path().join("data");
        c.pg("initdb", &["-A", "trust", "-U", "root", "-D"], &data);
        c.ctl("start");
        Some(c)
    }

    fn url(&self) -> String {
        format!("postgres://root@127.0.0.1:{}/postgres", self.port)
    }

    fn pg(&self, tool: &str, args: &[&str], last: &Path) -> bool {
        let exe = self.bin.join(tool);
        let mut cmd = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        };
        cmd.args(args)
            .arg(last)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// `pg_ctl ACTION` (start, stop), waiting for it to finish.
    fn ctl(&self, action: &str) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("server.log").display().to_string();
        let args = ["-w", "-m", "fast", "-o", &opts, "-l", &log, action, "-D"];
        let ok = self.pg("pg_ctl", &args, &self.dir.path().join("data"));
        assert!(ok, "pg_ctl {action}");
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        self.pg("pg_ctl", &["-w", "-m", "immediate", "stop", "-D"], &data);
    }
}

/// The PostgreSQL server itself stopped for a while and started again (a real restart, of a
/// cluster of the test's own) while keywatch follows a file: keywatch holds back, reconnects
/// and counts every line once.
#[test]
fn postgres_restarted_while_running_loses_nothing() {
    let Some(cluster) = Cluster::new() else {
        return;
    };
    let mut db = TestDb::new(Backend::Sqlite).unwrap();
    db.url = cluster.url();
    let all = lines(&db, 20_000, 10, "96");
    let log = db.path("requests.log");
    append(&log, &all[..5_000]);
    let cmd = run_file(&db.url, &log, &["--log", "info"]);
    let mut d = Daemon::start(cmd, db.path("stderr.log"));
    assert_exact(&db, &all[..5_000]);
    cluster.ctl("stop");
    append(&log, &all[5_000..15_000]);
    assert!(
        d.logged("Cannot commit counts; holding the sources back"),
        "{}",
        d.log()
    );
    assert_eq!(d.metric("keywatch_commits_blocked"), 1.0);
    std::thread::sleep(Duration::from_secs(5));
    assert!(d.alive(), "{}", d.log());
    cluster.ctl("start");
    append(&log, &all[15_000..]);
    assert_exact(&db, &all);
    assert!(d.logged("Commits succeed again; reading resumes."));
    let text = d.log();
    assert!(d.stop().success(), "{text}");
    no_panic(&text);
}

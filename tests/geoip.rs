//! GeoIP databases while `keywatch run` runs: a database replaced on disk (renamed over, as
//! geoipupdate does) is used after SIGHUP without a restart; a broken replacement is refused
//! with a log line and the previous database stays in use.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::{Backend, TestDb, free_port, get, keywatch, scrape, wait_until};

const TEST_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/geoip");

fn replace(live: &Path, from: &str) {
    let tmp = live.with_extension("tmp");
    std::fs::copy(Path::new(TEST_DIR).join(from), &tmp).unwrap();
    std::fs::rename(&tmp, live).unwrap();
}

fn database_types(addr: &str) -> Vec<String> {
    scrape(addr)
        .lines()
        .filter(|l| l.starts_with("keywatch_geoip_database_build_timestamp_seconds{"))
        .filter_map(|l| l.split("database_type=\"").nth(1))
        .filter_map(|r| r.split('"').next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn a_replaced_database_is_picked_up_on_sighup_and_a_broken_one_is_refused() {
    let db = TestDb::new(Backend::Sqlite).unwrap();
    let live = db.path("geo.mmdb");
    replace(&live, "GeoLite2-ASN-Test.mmdb");
    let log = db.path("requests.log");
    std::fs::write(&log, "").unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let mut child = keywatch()
        .args(["--database-url", &db.url, "--log", "info"])
        .arg("--geoip")
        .arg(&live)
        .args(["run", "--listen", &addr])
        .arg("--source")
        .arg(format!("file:{}", log.display()))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(db.path("stderr.log")).unwrap())
        .spawn()
        .unwrap();
    let hup = |pid: u32| {
        std::process::Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .unwrap();
    };
    let up = wait_until(Duration::from_secs(30), || {
        get(&addr, "/healthz", "*/*").is_some_and(|r| r.0 == 200)
    });
    assert!(up, "keywatch run answers /healthz");
    assert_eq!(database_types(&addr), ["GeoLite2-ASN"]);

    replace(&live, "GeoIP2-City-Test.mmdb");
    hup(child.id());
    let swapped = wait_until(Duration::from_secs(20), || {
        database_types(&addr) == ["GeoIP2-City"]
    });
    assert!(swapped, "{:?}", database_types(&addr));

    replace(&live, "GeoIP2-City-Test-Invalid-Node-Count.mmdb");
    hup(child.id());
    let stderr = db.path("stderr.log");
    let logged = wait_until(Duration::from_secs(20), || {
        std::fs::read_to_string(&stderr)
            .unwrap_or_default()
            .contains("keeping the previous one")
    });
    assert!(logged, "{}", std::fs::read_to_string(&stderr).unwrap());
    assert_eq!(
        database_types(&addr),
        ["GeoIP2-City"],
        "the previous database stays"
    );
    assert!(get(&addr, "/healthz", "*/*").is_some_and(|r| r.0 == 200));

    std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(child.wait().unwrap().success());
}

//! GeoIP: where an address is, from MaxMind DB files read into memory.
//!
//! Owns opening `.mmdb` files (one file or a directory of them) and reading a country from
//! either record layout in use: MaxMind's GeoIP2 (`country.iso_code`) and the flat
//! ip-location-db one (`country_code`), which the shipped DB-IP database uses, plus the ASN of
//! an ASN database. [`GeoHandle`] swaps in a database replaced on disk (as `geoipupdate`
//! does) without a restart, keeping the previous one when the new file is broken. It keeps no
//! per-key state: callers decide what to remember.
//!
//! A database is read whole into memory and checked (every record decoded once) before it is
//! used, never memory-mapped: a file overwritten in place (truncated, then written) under a
//! live mapping makes the next lookup fault (SIGBUS) and kills the process, and a half-written
//! or corrupt file must be refused at open, not found out lookup by lookup. Replacing the file
//! in any way is therefore safe; the cost is the file's size in memory (8 MiB for the
//! shipped country database).

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use maxminddb::Reader;
use serde::Deserialize;

/// The directory of the shipped default database, relative to the working directory.
pub const DEFAULT_DIR: &str = "geoip";

#[derive(Debug, thiserror::Error)]
pub enum GeoError {
    #[error("cannot read the GeoIP path {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} is not a usable MaxMind DB file ({source}); replace it or point --geoip elsewhere"
    )]
    Open {
        path: String,
        #[source]
        source: maxminddb::MaxMindDbError,
    },
    #[error("no .mmdb file in {path}; point --geoip at a .mmdb file or a directory of them")]
    Empty { path: String },
}

/// Country of an address, as two ASCII letters.
pub type Country = [u8; 2];

/// Where an address is, as far as the databases say.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Location {
    pub country: Option<Country>,
    pub city: Option<String>,
    /// Latitude and longitude in degrees.
    pub lat_lon: Option<(f64, f64)>,
    /// How far from `lat_lon` the address may really be, in km.
    pub accuracy_km: Option<f64>,
    /// The autonomous system (network) the address belongs to, from an ASN database.
    pub asn: Option<u32>,
}

/// A record in either layout: GeoIP2 nests (`country.iso_code`, `city.names.en`,
/// `location.latitude`), ip-location-db is flat (`country_code`, `latitude`). Unknown fields
/// are skipped. ip-location-db's own `city` field is a plain string, which this layout does
/// not read (a City database of that family gives countries and coordinates).
#[derive(Deserialize)]
struct LocationRecord<'a> {
    #[serde(borrow, default)]
    country: Option<GeoIp2Country<'a>>,
    #[serde(borrow, default)]
    city: Option<GeoIp2City<'a>>,
    #[serde(default)]
    location: Option<GeoIp2Location>,
    #[serde(borrow, default)]
    country_code: Option<&'a str>,
    #[serde(borrow, default)]
    city_name: Option<&'a str>,
    #[serde(default)]
    latitude: Option<f64>,
    #[serde(default)]
    longitude: Option<f64>,
    #[serde(default)]
    autonomous_system_number: Option<u32>,
}

#[derive(Deserialize)]
struct GeoIp2Country<'a> {
    #[serde(borrow, default)]
    iso_code: Option<&'a str>,
}

#[derive(Deserialize)]
struct GeoIp2City<'a> {
    #[serde(borrow, default)]
    names: std::collections::BTreeMap<&'a str, &'a str>,
}

#[derive(Deserialize)]
struct GeoIp2Location {
    latitude: Option<f64>,
    longitude: Option<f64>,
    accuracy_radius: Option<u16>,
}

fn country_code(code: &str) -> Option<Country> {
    match code.as_bytes() {
        [a, b] if a.is_ascii_alphabetic() && b.is_ascii_alphabetic() => {
            Some([a.to_ascii_uppercase(), b.to_ascii_uppercase()])
        }
        _ => None,
    }
}

/// One opened database file.
pub struct GeoFile {
    pub path: PathBuf,
    reader: Reader<Vec<u8>>,
}

impl GeoFile {
    /// The database's type, as its metadata names it (for example `GeoIP2-City`).
    pub fn database_type(&self) -> &str {
        &self.reader.metadata().database_type
    }

    /// When the database was built, as a Unix time.
    pub fn build_epoch(&self) -> u64 {
        self.reader.metadata().build_epoch
    }
}

/// The configured GeoIP databases.
pub struct GeoDb {
    files: Vec<GeoFile>,
}

impl std::fmt::Debug for GeoDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.files.iter().map(|g| &g.path))
            .finish()
    }
}

impl GeoDb {
    /// Opens a `.mmdb` file, or every `.mmdb` file in a directory.
    pub fn open(path: &Path) -> Result<GeoDb, GeoError> {
        let shown = path.display().to_string();
        let io = |source| GeoError::Io {
            path: shown.clone(),
            source,
        };
        let mut paths = Vec::new();
        if std::fs::metadata(path).map_err(io)?.is_dir() {
            for entry in std::fs::read_dir(path).map_err(io)? {
                let p = entry.map_err(io)?.path();
                if p.extension().is_some_and(|e| e == "mmdb") {
                    paths.push(p);
                }
            }
            paths.sort();
        } else {
            paths.push(path.to_path_buf());
        }
        if paths.is_empty() {
            return Err(GeoError::Empty { path: shown });
        }
        let mut files = Vec::with_capacity(paths.len());
        for p in paths {
            let broken = |source| GeoError::Open {
                path: p.display().to_string(),
                source,
            };
            let bytes = std::fs::read(&p).map_err(|source| GeoError::Io {
                path: p.display().to_string(),
                source,
            })?;
            let reader = Reader::from_source(bytes).map_err(broken)?;
            check(&reader).map_err(broken)?;
            files.push(GeoFile { path: p, reader });
        }
        Ok(GeoDb { files })
    }

    /// Opens `path`, or the shipped default directory when it exists and no path was given.
    pub fn open_configured(path: Option<&Path>) -> Result<Option<GeoDb>, GeoError> {
        match path {
            Some(p) => GeoDb::open(p).map(Some),
            None if Path::new(DEFAULT_DIR).is_dir() => {
                GeoDb::open(Path::new(DEFAULT_DIR)).map(Some)
            }
            None => Ok(None),
        }
    }

    pub fn files(&self) -> &[GeoFile] {
        &self.files
    }

    /// Where `ip` is: each field from the first database that has it (a City database for
    /// coordinates, the shipped country database for the rest). Private, loopback and
    /// unknown addresses give an empty location.
    pub fn locate(&self, ip: IpAddr) -> Location {
        let mut loc = Location::default();
        for f in &self.files {
            // A record this reader cannot decode is treated as absent, not as an error: one
            // odd network must not stop counting.
            let Ok(Some(rec)) = f
                .reader
                .lookup(ip)
                .and_then(|r| r.decode::<LocationRecord<'_>>())
            else {
                continue;
            };
            if loc.country.is_none() {
                loc.country = rec
                    .country
                    .and_then(|c| c.iso_code)
                    .or(rec.country_code)
                    .and_then(country_code);
            }
            if loc.city.is_none() {
                loc.city = rec
                    .city
                    .and_then(|c| c.names.get("en").map(|n| (*n).to_owned()))
                    .or(rec.city_name.map(str::to_owned));
            }
            if loc.lat_lon.is_none() {
                let (lat, lon, acc) = match &rec.location {
                    Some(l) => (l.latitude, l.longitude, l.accuracy_radius.map(f64::from)),
                    None => (rec.latitude, rec.longitude, None),
                };
                if let (Some(lat), Some(lon)) = (lat, lon) {
                    loc.lat_lon = Some((lat, lon));
                    loc.accuracy_km = acc;
                }
            }
            loc.asn = loc.asn.or(rec.autonomous_system_number);
        }
        loc
    }

    /// The country of `ip`, as [`GeoDb::locate`] finds it.
    pub fn country(&self, ip: IpAddr) -> Option<Country> {
        self.locate(ip).country
    }
}

/// Walks the whole search tree and decodes every distinct record, every field of it, so that
/// a damaged file is refused when it is opened rather than found out lookup by lookup. Each
/// record is decoded once however many networks share it, so this costs a walk of the tree.
/// (maxminddb's own `verify` also refuses databases with an empty description, such as the
/// shipped DB-IP one.)
fn check(reader: &Reader<Vec<u8>>) -> Result<(), maxminddb::MaxMindDbError> {
    let mut seen = std::collections::HashSet::new();
    // Aliases too (IPv4 space seen through 6to4 and Teredo): a lookup can land in them.
    let all = maxminddb::WithinOptions::default().include_aliased_networks();
    for found in reader.networks(all)? {
        let found = found?;
        if let Some(offset) = found.offset()
            && seen.insert(offset)
        {
            found.decode::<AnyValue>()?;
        }
    }
    Ok(())
}

/// Any value, decoded whole and kept nowhere: skipping a field would not read it.
struct AnyValue;

impl<'de> Deserialize<'de> for AnyValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<AnyValue, D::Error> {
        d.deserialize_any(AnyVisitor)
    }
}

struct AnyVisitor;

impl<'de> serde::de::Visitor<'de> for AnyVisitor {
    type Value = AnyValue;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any MaxMind DB value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<AnyValue, E> {
        Ok(AnyValue)
    }
    fn visit_i64<E>(self, _: i64) -> Result<AnyValue, E> {
        Ok(AnyValue)
    }
    fn visit_u64<E>(self, _: u64) -> Result<AnyValue, E> {
        Ok(AnyValue)
    }
    fn visit_u128<E>(self, _: u128) -> Result<AnyValue, E> {
        Ok(AnyValue)
    }
    fn visit_f64<E>(self, _: f64) -> Result<AnyValue, E> {
        Ok(AnyValue)
    }
    fn visit_str<E>(self, _: &str) -> Result<AnyValue, E> {
        Ok(AnyValue)
    }
    fn visit_bytes<E>(self, _: &[u8]) -> Result<AnyValue, E> {
        Ok(AnyValue)
    }
    fn visit_unit<E>(self) -> Result<AnyValue, E> {
        Ok(AnyValue)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<AnyValue, A::Error> {
        while seq.next_element::<AnyValue>()?.is_some() {}
        Ok(AnyValue)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<AnyValue, A::Error> {
        while map.next_entry::<AnyValue, AnyValue>()?.is_some() {}
        Ok(AnyValue)
    }
}

/// What identifies the files a [`GeoDb`] was opened from: each `.mmdb` path with its
/// modification time and length. A different stamp means the databases were replaced.
fn stamp(path: &Path) -> Vec<(PathBuf, Option<std::time::SystemTime>, u64)> {
    let one = |p: PathBuf| {
        let m = std::fs::metadata(&p).ok();
        let modified = m.as_ref().and_then(|m| m.modified().ok());
        (p, modified, m.map_or(0, |m| m.len()))
    };
    match std::fs::read_dir(path) {
        Ok(dir) => {
            let mut v: Vec<_> = dir
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "mmdb"))
                .map(one)
                .collect();
            v.sort();
            v
        }
        Err(_) => vec![one(path.to_path_buf())],
    }
}

/// The GeoIP databases in use, replaceable while keywatch runs: [`GeoHandle::reload`] opens
/// the path again when its files changed and swaps the new databases in; a file that does
/// not open leaves the previous databases in use. Readers take the current databases with
/// [`GeoHandle::current`], once per batch of lines, so a swap never happens mid-line.
pub struct GeoHandle {
    path: PathBuf,
    current: std::sync::RwLock<std::sync::Arc<GeoDb>>,
    stamp: std::sync::Mutex<Vec<(PathBuf, Option<std::time::SystemTime>, u64)>>,
}

impl std::fmt::Debug for GeoHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GeoHandle")
            .field("path", &self.path)
            .finish()
    }
}

impl GeoHandle {
    /// Opens `path` (a file or a directory of `.mmdb` files).
    pub fn open(path: &Path) -> Result<GeoHandle, GeoError> {
        let stamp = stamp(path);
        let db = GeoDb::open(path)?;
        Ok(GeoHandle {
            path: path.to_path_buf(),
            current: std::sync::RwLock::new(std::sync::Arc::new(db)),
            stamp: std::sync::Mutex::new(stamp),
        })
    }

    /// [`GeoHandle::open`] of the `--geoip` path, or of the shipped default directory.
    pub fn open_configured(path: Option<&Path>) -> Result<Option<GeoHandle>, GeoError> {
        match path {
            Some(p) => GeoHandle::open(p).map(Some),
            None if Path::new(DEFAULT_DIR).is_dir() => {
                GeoHandle::open(Path::new(DEFAULT_DIR)).map(Some)
            }
            None => Ok(None),
        }
    }

    /// The databases in use now.
    pub fn current(&self) -> std::sync::Arc<GeoDb> {
        let g = self.current.read().unwrap_or_else(|e| e.into_inner());
        std::sync::Arc::clone(&g)
    }

    /// Opens the path again if its files changed since the last (re)load. `Ok(true)` when new
    /// databases are in use; `Err` (with the previous databases still in use) when the new
    /// files do not open. A broken file is not retried until it changes again.
    pub fn reload(&self) -> Result<bool, GeoError> {
        let now = stamp(&self.path);
        {
            let mut seen = self.stamp.lock().unwrap_or_else(|e| e.into_inner());
            if *seen == now {
                return Ok(false);
            }
            *seen = now;
        }
        let db = GeoDb::open(&self.path)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = std::sync::Arc::new(db);
        Ok(true)
    }
}

/// Addresses a [`LocationCache`] remembers before it starts over.
const CACHE_ENTRIES: usize = 65_536;

/// Locations already looked up, by address, for the databases they came from: a client sends
/// many requests from one address, and a lookup walks the database's tree and decodes a record.
/// Bounded: once full it is emptied and refills with the addresses in use.
#[derive(Debug, Default)]
pub struct LocationCache {
    /// The databases the entries came from; others (a reload swapped them) empty the cache.
    db: Option<std::sync::Arc<GeoDb>>,
    entries: std::collections::HashMap<IpAddr, Location>,
}

impl LocationCache {
    /// [`GeoDb::locate`] of `ip` in `db`, remembered.
    pub fn locate(&mut self, db: &std::sync::Arc<GeoDb>, ip: IpAddr) -> &Location {
        if !self
            .db
            .as_ref()
            .is_some_and(|d| std::sync::Arc::ptr_eq(d, db))
        {
            self.db = Some(std::sync::Arc::clone(db));
            self.entries.clear();
        }
        if self.entries.len() >= CACHE_ENTRIES && !self.entries.contains_key(&ip) {
            self.entries.clear();
        }
        self.entries.entry(ip).or_insert_with(|| db.locate(ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEST_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/geoip");

    #[test]
    fn reads_both_record_layouts() {
        let city = GeoDb::open(&Path::new(TEST_DIR).join("GeoIP2-City-Test.mmdb")).unwrap();
        assert_eq!(city.country("81.2.69.160".parse().unwrap()), Some(*b"GB"));
        assert_eq!(city.country("89.160.20.112".parse().unwrap()), Some(*b"SE"));
        assert_eq!(city.country("127.0.0.1".parse().unwrap()), None);
        let london = city.locate("81.2.69.160".parse().unwrap());
        assert_eq!(london.city.as_deref(), Some("London"));
        let (lat, lon) = london.lat_lon.unwrap();
        assert!(
            (lat - 51.5).abs() < 0.2 && (lon + 0.1).abs() < 0.2,
            "{lat} {lon}"
        );
        assert!(london.accuracy_km.is_some());
        let dbip = GeoDb::open(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/geoip"))).unwrap();
        assert_eq!(dbip.country("81.2.69.160".parse().unwrap()), Some(*b"GB"));
        assert_eq!(dbip.country("10.0.0.1".parse().unwrap()), None);
    }

    #[test]
    fn the_cache_answers_as_the_database_and_follows_a_swap() {
        let city = std::sync::Arc::new(
            GeoDb::open(&Path::new(TEST_DIR).join("GeoIP2-City-Test.mmdb")).unwrap(),
        );
        let asn = std::sync::Arc::new(
            GeoDb::open(&Path::new(TEST_DIR).join("GeoLite2-ASN-Test.mmdb")).unwrap(),
        );
        let mut cache = LocationCache::default();
        let ip: IpAddr = "81.2.69.160".parse().unwrap();
        assert_eq!(cache.locate(&city, ip), &city.locate(ip));
        assert_eq!(cache.locate(&city, ip).city.as_deref(), Some("London"));
        assert_eq!(
            cache.locate(&asn, ip),
            &Location::default(),
            "other databases are asked again"
        );
        for i in 0..(CACHE_ENTRIES as u32 + 10) {
            cache.locate(&city, IpAddr::from(i.to_be_bytes()));
        }
        assert!(cache.entries.len() <= CACHE_ENTRIES, "bounded");
        assert_eq!(cache.locate(&city, ip).city.as_deref(), Some("London"));
    }

    #[test]
    fn broken_files_are_refused_with_their_path() {
        let e = GeoDb::open(&Path::new(TEST_DIR).join("GeoIP2-City-Test-Invalid-Node-Count.mmdb"));
        assert!(e.is_err());
        let e = GeoDb::open(Path::new("/nonexistent/geo.mmdb")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/geo.mmdb"), "{e}");
    }

    #[test]
    fn a_database_with_a_record_that_does_not_decode_is_refused() {
        // Its tree and metadata are sound; a record holds a double of the wrong size.
        let path = Path::new(TEST_DIR).join("GeoIP2-City-Test-Broken-Double-Format.mmdb");
        let e = GeoDb::open(&path).unwrap_err().to_string();
        assert!(
            e.contains("is not a usable MaxMind DB file (invalid database at offset "),
            "{e}"
        );
        assert!(e.contains(": double of size "), "{e}");
    }

    #[test]
    fn a_database_overwritten_in_place_leaves_the_loaded_one_intact() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("geo.mmdb");
        let city = std::fs::read(Path::new(TEST_DIR).join("GeoIP2-City-Test.mmdb")).unwrap();
        std::fs::write(&live, &city).unwrap();
        let h = GeoHandle::open(&live).unwrap();
        let ip: IpAddr = "81.2.69.160".parse().unwrap();
        // Truncated, then written: a memory-mapped reader would now fault (SIGBUS).
        std::fs::write(&live, &city[..1_000]).unwrap();
        assert_eq!(h.current().country(ip), Some(*b"GB"));
        let e = h.reload().unwrap_err().to_string();
        assert!(e.contains("is not a usable MaxMind DB file"), "{e}");
        assert_eq!(h.current().country(ip), Some(*b"GB"));
    }

    #[test]
    fn an_asn_database_gives_the_network() {
        let asn = GeoDb::open(&Path::new(TEST_DIR).join("GeoLite2-ASN-Test.mmdb")).unwrap();
        assert_eq!(asn.locate("1.128.0.0".parse().unwrap()).asn, Some(1221));
    }

    #[test]
    fn a_replaced_database_is_swapped_in_and_a_broken_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("geo.mmdb");
        let copy_over = |from: &str| {
            // As geoipupdate does: a new file renamed over the old one.
            let tmp = dir.path().join("geo.mmdb.tmp");
            std::fs::copy(Path::new(TEST_DIR).join(from), &tmp).unwrap();
            std::fs::rename(&tmp, &live).unwrap();
        };
        copy_over("GeoLite2-ASN-Test.mmdb");
        let h = GeoHandle::open(&live).unwrap();
        let ip: IpAddr = "81.2.69.160".parse().unwrap();
        assert_eq!(
            h.current().country(ip),
            None,
            "an ASN database has no countries"
        );
        assert!(!h.reload().unwrap(), "unchanged");
        copy_over("GeoIP2-City-Test.mmdb");
        assert!(h.reload().unwrap());
        assert_eq!(h.current().country(ip), Some(*b"GB"));
        copy_over("GeoIP2-City-Test-Invalid-Node-Count.mmdb");
        let e = h.reload().unwrap_err();
        assert!(e.to_string().contains("geo.mmdb"), "{e}");
        assert_eq!(
            h.current().country(ip),
            Some(*b"GB"),
            "the previous database stays"
        );
        assert!(
            !h.reload().unwrap(),
            "the broken file is not retried until it changes"
        );
    }
}

//! Secrets (the SMTP password, HMAC secrets, webhook signing secrets): where keywatch may take
//! them from, and how it refuses the rest.
//!
//! A secret comes from an environment variable `NAME`, or from a file named by `NAME_FILE`
//! (or a `--...-file` flag) that only its owner can read: a secret on the command line is in
//! every user's `ps`, and one in a group- or world-readable file is not a secret. Owns those
//! rules and their messages; it never logs, prints or stores a secret, and its errors name
//! the setting and the file, never the value.

use std::path::{Path, PathBuf};

/// Why a secret could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read the secret file {path} ({setting}): {source}")]
    Read {
        setting: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the secret file {path} ({setting}) can be read by other users (mode {mode:04o}); make it readable by its owner only: chmod 600 {path}"
    )]
    Exposed {
        setting: String,
        path: PathBuf,
        mode: u32,
    },
    #[error("the secret file {path} ({setting}) is empty")]
    Empty { setting: String, path: PathBuf },
}

/// The secret in the environment variable `var`, else in the file that `var_FILE` names.
/// Empty variables count as unset.
pub fn from_env(var: &str) -> Result<Option<String>, SecretError> {
    from(var, None)
}

/// The secret in `file` (a `--...-file` flag, or its `*_FILE` variable through clap), else
/// in the environment variable `var`, else in the file `var_FILE` names.
pub fn from(var: &str, file: Option<&Path>) -> Result<Option<String>, SecretError> {
    let file_var = format!("{var}_FILE");
    if let Some(path) = file {
        return read_file(&file_var, path).map(Some);
    }
    if let Some(v) = std::env::var(var).ok().filter(|v| !v.is_empty()) {
        return Ok(Some(v));
    }
    match std::env::var_os(&file_var).filter(|v| !v.is_empty()) {
        Some(path) => read_file(&file_var, Path::new(&path)).map(Some),
        None => Ok(None),
    }
}

/// Reads a secret file, refusing one that anyone but its owner may read. One trailing newline
/// (as `echo` writes) is not part of the secret.
pub fn read_file(setting: &str, path: &Path) -> Result<String, SecretError> {
    let read_err = |source| SecretError::Read {
        setting: setting.to_owned(),
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(read_err)?;
    let mode = permissions(&meta);
    if mode & 0o077 != 0 {
        return Err(SecretError::Exposed {
            setting: setting.to_owned(),
            path: path.to_path_buf(),
            mode,
        });
    }
    let text = std::fs::read_to_string(path).map_err(read_err)?;
    let secret = text
        .strip_suffix('\n')
        .map(|t| t.strip_suffix('\r').unwrap_or(t))
        .unwrap_or(&text);
    if secret.is_empty() {
        return Err(SecretError::Empty {
            setting: setting.to_owned(),
            path: path.to_path_buf(),
        });
    }
    Ok(secret.to_owned())
}

#[cfg(unix)]
fn permissions(meta: &std::fs::Metadata) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    meta.permissions().mode() & 0o7777
}

#[cfg(not(unix))]
fn permissions(_: &std::fs::Metadata) -> u32 {
    0o600
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn file(dir: &Path, text: &str, mode: u32) -> PathBuf {
        let p = dir.join(format!("secret-{mode:o}"));
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn owner_only_files_are_read_and_others_refused_without_the_value() {
        let dir = tempfile::tempdir().unwrap();
        let ok = file(dir.path(), "s3cret-value\n", 0o600);
        assert_eq!(read_file("X_FILE", &ok).unwrap(), "s3cret-value");
        let open = file(dir.path(), "s3cret-value\n", 0o644);
        let e = read_file("X_FILE", &open).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "the secret file {0} (X_FILE) can be read by other users (mode 0644); make it readable by its owner only: chmod 600 {0}",
                open.display()
            )
        );
        let group = file(dir.path(), "s3cret-value", 0o640);
        assert!(read_file("X_FILE", &group).is_err());
        let empty = file(dir.path(), "\n", 0o400);
        assert!(matches!(
            read_file("X_FILE", &empty),
            Err(SecretError::Empty { .. })
        ));
        let missing = read_file("X_FILE", &dir.path().join("nope")).unwrap_err();
        assert!(
            missing
                .to_string()
                .starts_with("cannot read the secret file ")
        );
    }
}

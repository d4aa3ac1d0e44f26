//! Finding the PostgreSQL server binaries (`initdb`, `pg_ctl`, `postgres`).

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::{Error, ErrorKind};

/// The programs a directory must hold to count as a server bin directory.
const SERVER_PROGRAMS: [&str; 3] = ["initdb", "pg_ctl", "postgres"];

/// Finds the directory holding the PostgreSQL server binaries.
///
/// Search order, first hit wins:
/// 1. the `PG_BIN` environment variable (if set, it must hold the binaries, else
///    this is an error: it is never silently ignored);
/// 2. `pg_config --bindir` (if that directory holds `initdb`; `pg_config` from a
///    client-only package points at a directory without the server);
/// 3. the directory of `initdb` found on `PATH` (symlinks resolved);
/// 4. the newest `/usr/lib/postgresql/<version>/bin` (Debian/Ubuntu layout).
///
/// A directory counts when it contains executable `initdb`, `pg_ctl` and `postgres`.
///
/// ```no_run
/// let dir = pgengine_testing::find_bin_dir()?;
/// println!("using PostgreSQL binaries in {}", dir.display());
/// # Ok::<(), pgengine_testing::Error>(())
/// ```
pub fn find_bin_dir() -> Result<PathBuf, Error> {
    Search {
        pg_bin: std::env::var_os("PG_BIN").filter(|v| !v.is_empty()),
        path: std::env::var_os("PATH"),
        pg_config: true,
        lib_root: PathBuf::from("/usr/lib/postgresql"),
    }
    .run()
}

/// The inputs of the search, separated from the process environment for testing.
pub(crate) struct Search {
    pub(crate) pg_bin: Option<OsString>,
    pub(crate) path: Option<OsString>,
    pub(crate) pg_config: bool,
    pub(crate) lib_root: PathBuf,
}

impl Search {
    pub(crate) fn run(&self) -> Result<PathBuf, Error> {
        let mut looked = Vec::new();

        if let Some(pg_bin) = &self.pg_bin {
            let dir = PathBuf::from(pg_bin);
            return match missing_programs(&dir) {
                None => Ok(dir),
                Some(missing) => Err(Error::new(
                    ErrorKind::BinariesNotFound,
                    format!(
                        "PG_BIN={} does not contain the PostgreSQL server program(s) {}; \
                         point PG_BIN at the directory holding initdb, pg_ctl and postgres \
                         (e.g. /usr/lib/postgresql/15/bin), or unset it",
                        dir.display(),
                        missing.join(", ")
                    ),
                )),
            };
        }
        looked.push("$PG_BIN (unset)".to_string());

        if self.pg_config {
            match pg_config_bindir() {
                Some(dir) if missing_programs(&dir).is_none() => return Ok(dir),
                Some(dir) => looked.push(format!(
                    "`pg_config --bindir` ({}, no server binaries there)",
                    dir.display()
                )),
                None => looked.push("`pg_config --bindir` (no pg_config)".to_string()),
            }
        }

        if let Some(path) = &self.path {
            for entry in std::env::split_paths(path) {
                let initdb = entry.join("initdb");
                if !is_executable(&initdb) {
                    continue;
                }
                // Resolve symlinks (e.g. /usr/local/bin/initdb -> /usr/lib/postgresql/15/bin/initdb)
                // so that pg_ctl and postgres are taken from the same installation.
                let real = std::fs::canonicalize(&initdb).unwrap_or(initdb);
                if let Some(dir) = real.parent()
                    && missing_programs(dir).is_none()
                {
                    return Ok(dir.to_path_buf());
                }
                if missing_programs(&entry).is_none() {
                    return Ok(entry);
                }
            }
            looked.push("`initdb` on PATH".to_string());
        }

        if let Some(dir) = newest_versioned_bin(&self.lib_root) {
            return Ok(dir);
        }
        looked.push(format!("{}/*/bin", self.lib_root.display()));

        Err(Error::new(
            ErrorKind::BinariesNotFound,
            format!(
                "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found; looked at: {}. \
                 Install the PostgreSQL server (e.g. `apt-get install postgresql`) or set PG_BIN \
                 to its bin directory, or set DATABASE_URL to use an existing server instead \
                 (e.g. DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres)",
                looked.join(", ")
            ),
        ))
    }
}

/// `None` when `dir` holds all server programs, else the names of the missing ones.
fn missing_programs(dir: &Path) -> Option<Vec<&'static str>> {
    let missing: Vec<_> = SERVER_PROGRAMS
        .iter()
        .copied()
        .filter(|p| !is_executable(&dir.join(p)))
        .collect();
    if missing.is_empty() {
        None
    } else {
        Some(missing)
    }
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn pg_config_bindir() -> Option<PathBuf> {
    let out = Command::new("pg_config")
        .arg("--bindir")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?;
    let text = text.trim();
    (!text.is_empty()).then(|| PathBuf::from(text))
}

/// The `<root>/<version>/bin` with the highest numeric version that holds the binaries.
fn newest_versioned_bin(root: &Path) -> Option<PathBuf> {
    let mut candidates: Vec<(Vec<u64>, PathBuf)> = std::fs::read_dir(root)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let version: Option<Vec<u64>> = name.split('.').map(|p| p.parse().ok()).collect();
            Some((version?, e.path().join("bin")))
        })
        .filter(|(_, bin)| missing_programs(bin).is_none())
        .collect();
    candidates.sort();
    candidates.pop().map(|(_, bin)| bin)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_install(root: &Path, version: &str) -> PathBuf {
        let bin = root.join(version).join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        for p in SERVER_PROGRAMS {
            let f = bin.join(p);
            std::fs::write(&f, "#!/bin/sh\n").unwrap();
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        bin
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "pgengine-unit-{name}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn newest_version_wins_numerically() {
        let root = scratch("versions");
        fake_install(&root, "9.6");
        let want = fake_install(&root, "15");
        fake_install(&root, "13");
        std::fs::create_dir_all(root.join("17/bin")).unwrap(); // incomplete install
        let found = Search {
            pg_bin: None,
            path: None,
            pg_config: false,
            lib_root: root.clone(),
        }
        .run()
        .unwrap();
        assert_eq!(found, want);
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn pg_bin_wins_and_is_validated() {
        let root = scratch("pgbin");
        let a = fake_install(&root, "a");
        let lib = root.join("lib");
        let newest = fake_install(&lib, "16");
        let search = |pg_bin: Option<&Path>| Search {
            pg_bin: pg_bin.map(|p| p.as_os_str().to_owned()),
            path: Some(std::env::join_paths([&newest]).unwrap()),
            pg_config: false,
            lib_root: lib.clone(),
        };
        assert_eq!(search(Some(&a)).run().unwrap(), a);
        assert_eq!(search(None).run().unwrap(), newest);
        let err = search(Some(&root.join("nope"))).run().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::BinariesNotFound);
        assert!(err.to_string().contains("PG_BIN="), "{err}");
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn nothing_found_says_how_to_fix() {
        let root = scratch("none");
        let err = Search {
            pg_bin: None,
            path: Some(root.as_os_str().to_owned()),
            pg_config: false,
            lib_root: root.join("missing"),
        }
        .run()
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("apt-get install postgresql"), "{msg}");
        assert!(msg.contains("DATABASE_URL"), "{msg}");
        std::fs::remove_dir_all(root).unwrap();
    }
}

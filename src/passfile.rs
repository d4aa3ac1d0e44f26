//! The password file (`PGPASSFILE`, else `~/.pgpass`), read as libpq reads it: lines of
//! `hostname:port:database:username:password`, `*` matching anything in the first four
//! fields, `\` escaping `:` and `\`; a file that group or others can read is ignored.

use std::path::{Path, PathBuf};

/// The password the file at `path` (or libpq's default file) gives for a connection,
/// if any.
pub(crate) fn lookup(
    path: Option<&Path>,
    host: &str,
    port: u16,
    dbname: &str,
    user: &str,
) -> Option<String> {
    let path = match path {
        Some(path) => path.to_path_buf(),
        None => default_path()?,
    };
    let text = readable_only_by_owner(&path)?;
    let port = port.to_string();
    let wanted = [host, port.as_str(), dbname, user];
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .map(fields)
        .filter(|fields| fields.len() == 5)
        .find(|fields| {
            fields[..4]
                .iter()
                .zip(wanted)
                .all(|(field, value)| field == "*" || field == value)
        })
        .map(|mut fields| fields.swap_remove(4))
}

/// `PGPASSFILE`, else `~/.pgpass`.
fn default_path() -> Option<PathBuf> {
    match std::env::var_os("PGPASSFILE") {
        Some(path) => Some(PathBuf::from(path)),
        None => Some(Path::new(&std::env::var_os("HOME")?).join(".pgpass")),
    }
}

/// The file's text, or `None` when it is missing, not a plain file, or open to group or
/// others (libpq warns and ignores it then).
fn readable_only_by_owner(path: &Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_file() {
        return None;
    }
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(
            target: "pgengine",
            path = %path.display(),
            "password file has group or world access; permissions should be u=rw (0600) or less; ignored"
        );
        return None;
    }
    std::fs::read_to_string(path).ok()
}

/// The `:`-separated fields of a line, unescaped.
fn fields(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut chars = line.trim_end_matches('\r').chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => fields.last_mut().expect("one field").extend(chars.next()),
            ':' if fields.len() < 5 => fields.push(String::new()),
            ':' => break, // the password ends at an unescaped `:`
            c => fields.last_mut().expect("one field").push(c),
        }
    }
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_unescape_colons_and_backslashes() {
        assert_eq!(
            fields(r"h:5432:db:u:pa\:ss\\w"),
            ["h", "5432", "db", "u", r"pa:ss\w"]
        );
        assert_eq!(fields("*:*:*:u:a:b"), ["*", "*", "*", "u", "a"]);
        assert_eq!(fields("h:1:db"), ["h", "1", "db"]);
    }
}

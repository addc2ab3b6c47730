//! The password file, found and read as libpq does: the `passfile` key, else `PGPASSFILE`, else
//! `~/.pgpass`; lines `host:port:database:user:password` with `*` wildcards and `\` escaping `:`
//! and `\`; `#` comments; the first matching line wins. A file that group or others may read is
//! ignored with a warning, logged once per file.

use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Where the password file is, whether or not it exists.
pub fn location(passfile: Option<&str>) -> Option<PathBuf> {
    if let Some(p) = passfile {
        return Some(PathBuf::from(p));
    }
    if let Some(p) = std::env::var_os("PGPASSFILE").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    home().map(|h| h.join(".pgpass"))
}

/// The home directory: `HOME`, else the password database's entry.
pub fn home() -> Option<PathBuf> {
    if let Some(h) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        return Some(PathBuf::from(h));
    }
    // SAFETY: getpwuid returns static storage or null; the path is copied out at once.
    unsafe {
        let pw = libc::getpwuid(libc::geteuid());
        if pw.is_null() || (*pw).pw_dir.is_null() {
            return None;
        }
        Some(PathBuf::from(
            std::ffi::CStr::from_ptr((*pw).pw_dir)
                .to_string_lossy()
                .into_owned(),
        ))
    }
}

/// Socket directories that libpq treats as its default, so that a line for `localhost` matches
/// them.
const DEFAULT_SOCKET_DIRS: [&str; 3] = ["/var/run/postgresql", "/run/postgresql", "/tmp"];

/// The password for this server and user from the file at `path`, if the file exists, is
/// private enough, and has a matching line.
pub fn lookup(path: &Path, host: &str, port: u16, dbname: &str, user: &str) -> Option<String> {
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_file() {
        return None;
    }
    if meta.permissions().mode() & 0o077 != 0 {
        warn_once(path);
        return None;
    }
    let text = std::fs::read_to_string(path).ok()?;
    // As libpq: an empty host or a default socket directory is `localhost`.
    let host = if host.is_empty() || DEFAULT_SOCKET_DIRS.contains(&host) {
        "localhost"
    } else {
        host
    };
    find(&text, host, &port.to_string(), dbname, user)
}

fn warn_once(path: &Path) {
    static WARNED: Mutex<Option<HashSet<PathBuf>>> = Mutex::new(None);
    let mut warned = WARNED.lock().unwrap_or_else(|e| e.into_inner());
    if warned
        .get_or_insert_with(HashSet::new)
        .insert(path.to_path_buf())
    {
        tracing::warn!(
            file = %path.display(),
            "password file {} has group or world access and is ignored; permissions should be u=rw (0600) or less",
            path.display()
        );
    }
}

/// The first line of a password file's text that matches; pure, for tests.
pub fn find(text: &str, host: &str, port: &str, dbname: &str, user: &str) -> Option<String> {
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut rest = line;
        let mut ok = true;
        for want in [host, port, dbname, user] {
            match field_matches(rest, want) {
                Some(after) => rest = after,
                None => {
                    ok = false;
                    break;
                }
            }
        }
        if ok {
            return Some(unescape(rest));
        }
    }
    None
}

/// If the line starts with a field matching `want` followed by `:`, the rest after the colon.
fn field_matches<'a>(line: &'a str, want: &str) -> Option<&'a str> {
    if let Some(rest) = line.strip_prefix("*:") {
        return Some(rest);
    }
    let mut w = want.chars();
    let mut it = line.char_indices();
    while let Some((i, c)) = it.next() {
        let c = match c {
            ':' => {
                return w.next().is_none().then(|| &line[i + 1..]);
            }
            '\\' => match it.next() {
                Some((_, e)) => e,
                None => return None,
            },
            c => c,
        };
        if w.next() != Some(c) {
            return None;
        }
    }
    None
}

fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars();
    while let Some(c) = it.next() {
        if c == '\\' {
            if let Some(e) = it.next() {
                out.push(e);
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "# comment:*:*:*:nope\n\
        db1:5432:shop:app:first\n\
        db1:5432:shop:app:second\n\
        *:*:*:report:wild\\:card\\\\pw\n\
        we\\:ird:6000:*:app:colon host\n\
        localhost:5432:*:app:local\r\n";

    #[test]
    fn first_matching_line_wins_with_wildcards_and_escapes() {
        assert_eq!(
            find(FILE, "db1", "5432", "shop", "app").as_deref(),
            Some("first")
        );
        assert_eq!(
            find(FILE, "anything", "1", "x", "report").as_deref(),
            Some(r"wild:card\pw")
        );
        assert_eq!(
            find(FILE, "we:ird", "6000", "db", "app").as_deref(),
            Some("colon host")
        );
        assert_eq!(
            find(FILE, "localhost", "5432", "x", "app").as_deref(),
            Some("local")
        );
        assert_eq!(find(FILE, "db1", "5433", "shop", "app"), None);
        assert_eq!(find(FILE, "db", "5432", "shop", "app"), None);
        assert_eq!(find(FILE, "# comment", "*", "*", "*"), None);
    }

    #[test]
    fn file_modes_and_socket_hosts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pgpass");
        std::fs::write(&path, "localhost:5432:*:app:sock\n/srv/pg:5432:*:app:own\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            lookup(&path, "/var/run/postgresql", 5432, "db", "app").as_deref(),
            Some("sock")
        );
        assert_eq!(
            lookup(&path, "/srv/pg", 5432, "db", "app").as_deref(),
            Some("own")
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(lookup(&path, "localhost", 5432, "db", "app"), None);
        assert_eq!(
            lookup(&dir.path().join("missing"), "localhost", 5432, "db", "app"),
            None
        );
    }
}

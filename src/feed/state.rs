//! The state folder's files (`edge_state`): where URL sources keep their last good documents.
//! Each is written whole under a temporary name unique to its writer, flushed to disk, then
//! renamed over the old one, and the folder flushed too, so that a power cut leaves either
//! version, never an empty file. Temporary files of writers that are gone, the candidates of
//! masters that are gone, the image files earlier versions of the module published here, and
//! the files of URL sources no longer configured (a URL changed) once untouched for a week,
//! are tidied away; the configured sources' files are touched daily, so that another nginx
//! sharing the folder never takes them for stale.

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// How old a file of an earlier version of the module must be before it is removed: its
/// workers mapped it within a second of its publication.
pub const LEGACY_AGE: Duration = Duration::from_secs(60);
/// How long the files of a URL source that no configuration names are kept: another nginx on
/// the same folder touches its own daily (`TOUCH_AGE`).
pub const UNUSED_AGE: Duration = Duration::from_secs(7 * 86_400);
pub const TOUCH_AGE: Duration = Duration::from_secs(86_400);

/// The cache key of a URL source's accepted copy or state (`url-KEY.json`, `url-KEY.status`).
fn url_key(name: &str) -> Option<u64> {
    let rest = name.strip_prefix("url-")?;
    let hex = rest
        .strip_suffix(".json")
        .or_else(|| rest.strip_suffix(".status"))?;
    (hex.len() == 16)
        .then(|| u64::from_str_radix(hex, 16).ok())
        .flatten()
}

/// A name for a temporary file beside `path`, unique to this process and call:
/// `PATH.tmpPID-N`.
pub fn temporary(path: &Path) -> PathBuf {
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let mut name = path.as_os_str().to_owned();
    name.push(format!(
        ".tmp{}-{}",
        std::process::id(),
        COUNT.fetch_add(1, Relaxed)
    ));
    PathBuf::from(name)
}

/// Writes `bytes` to `path` as a whole: a temporary file, flushed, renamed over `path`, and
/// the folder flushed.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = temporary(path);
    let written = File::create(&tmp)
        .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()))
        .and_then(|()| fs::rename(&tmp, path));
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
        return written;
    }
    sync_folder(path)
}

/// Renames `from` over `to` (in the same folder) and flushes the folder.
pub fn rename(from: &Path, to: &Path) -> std::io::Result<()> {
    fs::rename(from, to)?;
    sync_folder(to)
}

fn sync_folder(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(folder) => File::open(folder)?.sync_all(),
        None => Ok(()),
    }
}

/// Whether a file of the state folder, named `name` and last changed `age` ago, is left over:
/// a temporary file of a process that `alive` says is gone, or an image an earlier version of
/// the module published here.
pub fn stale(name: &str, age: Duration, alive: &dyn Fn(i32) -> bool, keys: &[u64]) -> bool {
    // A URL source this configuration does not name, left alone for a week.
    if let Some(key) = url_key(name) {
        return !keys.contains(&key) && age >= UNUSED_AGE;
    }
    // A URL source's candidate, per master (see `caches`).
    if let Some((_, master)) = name.rsplit_once(".next.") {
        if let Ok(pid) = master.parse::<i32>() {
            return pid > 0 && !alive(pid);
        }
    }
    if let Some((_, tail)) = name.rsplit_once(".tmp") {
        let pid = tail.split('-').next().unwrap_or("");
        if let Ok(pid) = pid.parse::<i32>() {
            return pid > 0 && !alive(pid);
        }
    }
    let legacy =
        name.starts_with("routes-") && (name.ends_with(".img") || name.ends_with(".img.tmp"));
    legacy && age >= LEGACY_AGE
}

/// Removes the stale files of `folder`; returns how many. The files of the URL sources
/// `keys` (this configuration's) are touched when a day old.
pub fn tidy(folder: &Path, alive: &dyn Fn(i32) -> bool, keys: &[u64]) -> usize {
    let Ok(entries) = fs::read_dir(folder) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let age = entry
            .metadata()
            .ok()
            .filter(|m| m.is_file())
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.elapsed().ok());
        let Some(age) = age else { continue };
        if url_key(name).is_some_and(|k| keys.contains(&k)) && age >= TOUCH_AGE {
            // Neither following a link nor waiting on a FIFO put there since it was listed:
            // this runs in the event loop.
            let file = File::options()
                .append(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
                .open(entry.path());
            if let Ok(file) = file {
                let _ = file.set_modified(std::time::SystemTime::now());
            }
        }
        if stale(name, age, alive, keys) && fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn left_over_files_are_told_from_live_ones() {
        let alive = |pid: i32| pid == 42;
        let old = Duration::from_secs(3600);
        let new = Duration::from_secs(1);
        let week = UNUSED_AGE;
        for (name, age, is_stale) in [
            ("url-00aa.json.tmp7-3", new, true),
            ("url-00aa.json.tmp7", new, true),
            ("url-00aa.json.next.7", new, true),
            ("url-00aa.json.next.42", old, false),
            ("url-00aa.json.next.42.tmp7-1", new, true),
            ("url-00aa.status.tmp42-0", old, false),
            ("url-00aa.json", old, false),
            ("url-00aa.status", old, false),
            ("routes-00aa-3.img", old, true),
            ("routes-00aa-4.img.tmp", old, true),
            ("routes-00aa-5.img", new, false),
            ("notes.txt", old, false),
            ("x.tmpfile", old, false),
            // A URL source no longer configured: kept a week.
            ("url-00000000000000bb.json", old, false),
            ("url-00000000000000bb.json", week, true),
            ("url-00000000000000bb.status", week, true),
            ("url-00000000000000aa.json", week, false),
            ("url-00000000000000aa.status", week, false),
            ("url-00aa.json", week, false),
        ] {
            assert_eq!(stale(name, age, &alive, &[0xaa]), is_stale, "{name}");
        }
    }

    #[test]
    fn a_write_replaces_the_file_whole_and_leaves_nothing_else() {
        let dir = std::env::temp_dir().join(format!("edge-state-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("url-1.json");
        write_atomically(&path, b"one").unwrap();
        write_atomically(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, ["url-1.json"]);
        assert_ne!(temporary(&path), temporary(&path));
        fs::write(dir.join("url-2.json.tmp2147483646-0"), b"left").unwrap();
        assert_eq!(tidy(&dir, &|pid| pid == std::process::id() as i32, &[]), 1);
        assert!(path.exists());
        fs::remove_dir_all(&dir).unwrap();
    }
}

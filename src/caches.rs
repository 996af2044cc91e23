//! The two files a URL source keeps in the state folder, and why a worker may trust them:
//!
//! - the *candidate* (`url-KEY.json.next.MASTER`, named by the workers after their master's
//!   pid): what its feed brought last, written by the worker that fetches it, for the
//!   table(s) that merge the source to read;
//! - the *accepted* copy (`url-KEY.json`): the last candidate a table merged, copied once it
//!   was; the master reads it at start, so that nginx started while the source is unreachable
//!   still routes, and never from a document the table refused.
//!
//! A worker records the SHA-256 of each file it writes in the zone, which no other process can
//! write. A worker reads either file only if its bytes match: a file written or changed by
//! another process (the folder is the workers' user's, and root's) is refused, never served.
//! The master, at start, has no such record: there the accepted copy is read as remote data,
//! which can only fall back (see `conf`).

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use crate::feed::state::write_atomically;
use crate::routes::document::Document;
use crate::zone::{self, Kept};

/// Bytes of a source's file: a larger one is not read, and not written.
pub const MAX_BYTES: u64 = 256 << 20;

pub type Digest = [u8; 32];

pub fn sha256(bytes: &[u8]) -> Digest {
    let mut digest = [0u8; 32];
    // SAFETY: OpenSSL's one-shot digest, into a buffer of its size.
    unsafe { nginx_sys::SHA256(bytes.as_ptr(), bytes.len(), digest.as_mut_ptr()) };
    digest
}

/// A URL source's files.
pub struct Files {
    /// The source's cache key: its files' names, and its entry in the zone.
    pub key: u64,
    pub accepted: PathBuf,
    /// Set in the workers (see `start`); the master reads the accepted version only.
    candidate: OnceLock<PathBuf>,
    /// Writes of this process, one at a time: the feed's and the promotions'.
    writing: Mutex<()>,
    /// The digest of the candidate as a table last read it.
    read: Mutex<Option<Digest>>,
    /// The document the feed made of the candidate it last wrote, by the candidate's digest:
    /// a table that reads those very bytes takes it rather than parsing them again (a large
    /// source's objects take longer to parse than to make routes of).
    made: Mutex<Option<(Digest, Arc<Document>)>>,
}

/// What a read of a source's file gave: its bytes, or the document this process made of them.
pub enum Contents {
    Bytes(Vec<u8>),
    Made(Arc<Document>),
}

impl Files {
    /// In `state`.
    pub fn new(state: &Path, key: u64) -> Files {
        Files {
            key,
            accepted: state.join(format!("url-{key:016x}.json")),
            candidate: OnceLock::new(),
            writing: Mutex::new(()),
            read: Mutex::new(None),
            made: Mutex::new(None),
        }
    }

    /// Names the candidate after the workers' master, `master` (candidates are per master:
    /// another nginx on the same folder, or a new master during a binary upgrade, has its
    /// own). At configuration time the master's pid is not known yet (`daemon on` forks
    /// after it); its workers know it.
    pub fn start(&self, master: i32) -> &Path {
        self.candidate.get_or_init(|| {
            let mut name = self.accepted.as_os_str().to_owned();
            name.push(format!(".next.{master}"));
            PathBuf::from(name)
        })
    }

    /// The candidate, once named.
    pub fn candidate(&self) -> Option<&Path> {
        self.candidate.get().map(PathBuf::as_path)
    }

    /// The file beside the accepted copy that holds the source's state, for every worker's
    /// `edge_status`.
    pub fn status(&self) -> PathBuf {
        self.accepted.with_extension("status")
    }

    fn which(&self, path: &Path) -> Kept {
        if self.candidate() == Some(path) {
            Kept::Candidate
        } else {
            Kept::Accepted
        }
    }

    /// Reads the candidate or the accepted copy for a table. In a worker, only bytes this
    /// nginx wrote are returned; in the master (at start) the accepted copy is taken as is.
    pub fn read(&self, path: &Path) -> Result<Vec<u8>, String> {
        self.read_checked(path).map(|(bytes, _)| bytes)
    }

    /// `read`, or the document the feed made of those bytes when it wrote them (see `made`).
    pub fn read_or_recall(&self, path: &Path) -> Result<Contents, String> {
        let (bytes, digest) = self.read_checked(path)?;
        let made = self.made.lock().unwrap_or_else(|e| e.into_inner());
        match (digest, made.as_ref()) {
            (Some(digest), Some((of, document))) if *of == digest => {
                Ok(Contents::Made(Arc::clone(document)))
            }
            _ => Ok(Contents::Bytes(bytes)),
        }
    }

    /// The bytes, and their digest once vouched for (in a worker).
    fn read_checked(&self, path: &Path) -> Result<(Vec<u8>, Option<Digest>), String> {
        let bytes = read_bounded(path)?;
        let Some(zone) = zone::current() else {
            return Ok((bytes, None));
        };
        let which = self.which(path);
        let digest = sha256(&bytes);
        match zone.vouches(self.key, which, &digest) {
            Some(true) => {}
            Some(false) => {
                return Err("changed by another process than this nginx: not read".into())
            }
            None => return Err("not written by this nginx: not read".into()),
        }
        if which == Kept::Candidate {
            *self.read.lock().unwrap_or_else(|e| e.into_inner()) = Some(digest);
        }
        Ok((bytes, Some(digest)))
    }

    /// What a feed starts from when it starts in a worker: the candidate this nginx wrote, or
    /// else the accepted copy — checked against the zone when this nginx wrote it, taken as
    /// the master took it at start otherwise, and then vouched for.
    pub fn seed(&self) -> Result<Option<Vec<u8>>, String> {
        if let Some(candidate) = self.candidate() {
            if let Ok(bytes) = self.read(candidate) {
                return Ok(Some(bytes));
            }
        }
        let bytes = match read_bounded(&self.accepted) {
            Ok(bytes) => bytes,
            Err(_) if !self.accepted.exists() => return Ok(None),
            Err(e) => return Err(e),
        };
        if let Some(zone) = zone::current() {
            let digest = sha256(&bytes);
            match zone.vouches(self.key, Kept::Accepted, &digest) {
                Some(false) => {
                    return Err(format!(
                        "{}: changed by another process than this nginx: not read",
                        self.accepted.display()
                    ))
                }
                Some(true) => {}
                None => {
                    zone.vouch(self.key, Kept::Accepted, &digest);
                }
            }
        }
        Ok(Some(bytes))
    }

    /// Writes what the feed brought as the candidate, and vouches for it; `made` is the
    /// document the feed made of it, for the table to take rather than parse the bytes again.
    pub fn write_candidate(&self, bytes: &[u8], made: Option<Arc<Document>>) -> Result<(), String> {
        let Some(candidate) = self.candidate() else {
            return Err("the candidate is not named yet".into());
        };
        if bytes.len() as u64 > MAX_BYTES {
            return Err(format!(
                "{} bytes, more than the limit of {} MiB",
                bytes.len(),
                MAX_BYTES >> 20
            ));
        }
        let _writing = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        let digest = sha256(bytes);
        // Forgotten first: while the file changes, its document is not the one of its bytes.
        // (Dropped out of the lock: a large document takes a while to free.)
        let before = self.made.lock().unwrap_or_else(|e| e.into_inner()).take();
        drop(before);
        self.write_vouched(candidate, Kept::Candidate, bytes, &digest)?;
        if let Some(made) = made {
            *self.made.lock().unwrap_or_else(|e| e.into_inner()) = Some((digest, made));
        }
        Ok(())
    }

    /// The digest of the candidate as a table read it last: what it accepted, when said right
    /// after its merge (see `promote`).
    pub fn read_digest(&self) -> Option<Digest> {
        *self.read.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A table accepted the version `digest` of the candidate: copies it to the accepted
    /// file, unless the candidate has changed since (the next one will be accepted in turn).
    pub fn promote(&self, digest: &Digest) -> Result<bool, String> {
        let Some(candidate) = self.candidate() else {
            return Ok(false);
        };
        let _writing = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        let bytes = read_bounded(candidate)?;
        if sha256(&bytes) != *digest {
            return Ok(false);
        }
        self.write_vouched(&self.accepted, Kept::Accepted, &bytes, digest)
            .map(|()| true)
    }

    /// Vouches for `digest`, then writes the file: a table that lists it reads it at once.
    /// A write that fails takes its vouch back.
    fn write_vouched(
        &self,
        path: &Path,
        copy: Kept,
        bytes: &[u8],
        digest: &Digest,
    ) -> Result<(), String> {
        let zone = zone::current();
        if let Some(zone) = zone {
            zone.vouch(self.key, copy, digest);
        }
        write_atomically(path, bytes).map_err(|e| {
            if let Some(zone) = zone {
                zone.unvouch(self.key, copy, digest);
            }
            format!("{}: {e}", path.display())
        })
    }
}

/// A file's bytes, refused past `MAX_BYTES` without reading them all. Only a regular file is
/// read, and not through a symlink: anyone able to write the state folder could put a FIFO
/// there (whose open and reads would never return) or a link to any file.
pub fn read_bounded(path: &Path) -> Result<Vec<u8>, String> {
    let shown = path.display();
    let mut bytes = Vec::new();
    let file = File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| format!("{shown}: {e}"))?;
    let meta = file.metadata().map_err(|e| format!("{shown}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("{shown}: not a regular file"));
    }
    file.take(MAX_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("{shown}: {e}"))?;
    if bytes.len() as u64 > MAX_BYTES {
        return Err(format!("{shown}: larger than {} MiB", MAX_BYTES >> 20));
    }
    Ok(bytes)
}

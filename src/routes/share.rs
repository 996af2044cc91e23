//! A table's image shared by the workers of an edge. The worker that builds a table writes its
//! image once into a memfd and seals it: from then on no process can write it, shrink it or
//! grow it, root included. Every worker maps it read-only, so the pages exist once however
//! many workers serve it. The others find it through the builder's `/proc/PID/fd/N` (the pid
//! and the descriptor are published in the zone) and check the seals, the prefix and the
//! image before they use it.
//!
//! A file in a folder would not do: anyone able to write the folder could truncate it under
//! the workers (a SIGBUS in each) or change the bytes they are reading.
//!
//! Layout: a 32-byte prefix (magic, the table's key, its generation, the image's length),
//! then the image.

use std::ffi::CString;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use super::image::Image;

const MAGIC: [u8; 8] = *b"EDGESHR1";
const PREFIX: usize = 32;
/// Every seal: no write, no shrink, no growth, and no change of the seals.
const SEALS: libc::c_int =
    libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;

/// A published image: the memfd (kept open by its publisher while it is the table in force,
/// so that the others can open it) and the publisher's own mapping of it.
pub struct Shared {
    pub fd: OwnedFd,
    pub image: Image,
}

/// Writes `image` (an image's bytes) into a new sealed memfd for the table `key`, generation
/// `generation`, and maps it.
pub fn publish(image: &[u8], key: u64, generation: u64) -> Result<Shared, String> {
    let name =
        CString::new(format!("edge-routes-{key:016x}-{generation}")).map_err(|e| e.to_string())?;
    // SAFETY: a plain syscall; the name is NUL-terminated.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(format!("memfd_create: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: a descriptor just made, owned here.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut prefix = [0u8; PREFIX];
    prefix[..8].copy_from_slice(&MAGIC);
    prefix[8..16].copy_from_slice(&key.to_le_bytes());
    prefix[16..24].copy_from_slice(&generation.to_le_bytes());
    prefix[24..32].copy_from_slice(&(image.len() as u64).to_le_bytes());
    let mut file = File::from(fd);
    file.write_all(&prefix)
        .and_then(|()| file.write_all(image))
        .map_err(|e| format!("writing the memfd: {e}"))?;
    let fd = OwnedFd::from(file);
    // SAFETY: fcntl on a descriptor owned here.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, SEALS) } != 0 {
        return Err(format!(
            "sealing the memfd: {}",
            std::io::Error::last_os_error()
        ));
    }
    let (_, image) = map(&fd, Some(key))?;
    Ok(Shared { fd, image })
}

/// A table another worker published, opened but not yet mapped.
#[derive(Debug)]
pub struct Published {
    fd: OwnedFd,
    /// Its length in bytes: whether mapping and checking it is small work.
    pub len: u64,
    path: String,
}

impl Published {
    /// Maps it, for the table `key`: its generation, and the image mapped. Refused unless it
    /// is of this table and a sound image.
    pub fn map(self, key: u64) -> Result<(u64, Image), String> {
        map(&self.fd, Some(key)).map_err(|e| format!("{}: {e}", self.path))
    }
}

/// Opens the descriptor `fd` of the process `pid`, without blocking whatever it is: refused
/// unless it is a memfd with every seal.
pub fn open_published(pid: i32, fd: i32) -> Result<Published, String> {
    let path = format!("/proc/{pid}/fd/{fd}");
    // Not blocking: a pid reused by another process could hold a FIFO at that number.
    let file = File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&path)
        .map_err(|e| format!("{path}: {e}"))?;
    if !file.metadata().is_ok_and(|m| m.is_file()) {
        return Err(format!("{path}: not a sealed memfd"));
    }
    let len = file.metadata().map_err(|e| format!("{path}: {e}"))?.len();
    let fd = OwnedFd::from(file);
    // SAFETY: fcntl on a descriptor owned here.
    let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
    if seals < 0 || seals & SEALS != SEALS {
        return Err(format!("{path}: not a sealed memfd"));
    }
    Ok(Published { fd, len, path })
}

/// Maps a sealed memfd read-only and checks its prefix (the table `key`, when given) and its
/// image.
fn map(fd: &OwnedFd, key: Option<u64>) -> Result<(u64, Image), String> {
    let len = File::from(fd.try_clone().map_err(|e| e.to_string())?)
        .metadata()
        .map_err(|e| e.to_string())?
        .len() as usize;
    if len < PREFIX {
        return Err(format!("{len} bytes, shorter than its prefix"));
    }
    // SAFETY: a fresh read-only shared mapping of the whole memfd, which its seals keep from
    // changing or shrinking for as long as it exists.
    let base = unsafe {
        libc::mmap(
            core::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(format!("mmap: {}", std::io::Error::last_os_error()));
    }
    let base = base.cast_const().cast::<u8>();
    // SAFETY: `len` bytes mapped at `base`.
    let prefix = unsafe { core::slice::from_raw_parts(base, PREFIX) };
    let word = |at: usize| u64::from_le_bytes(prefix[at..at + 8].try_into().unwrap_or([0; 8]));
    let (generation, image_len) = (word(16), word(24));
    let refused = if prefix[..8] != MAGIC {
        Some("not a table image".to_owned())
    } else if key.is_some_and(|k| k != word(8)) {
        Some("the image of another table".to_owned())
    } else if image_len != (len - PREFIX) as u64 {
        Some(format!(
            "the prefix says {image_len} bytes, there are {}",
            len - PREFIX
        ))
    } else {
        None
    };
    if let Some(why) = refused {
        // SAFETY: the mapping made above, not handed on.
        unsafe { libc::munmap(base.cast_mut().cast(), len) };
        return Err(why);
    }
    // SAFETY: mapped above for `len` bytes, immutable (sealed); the image takes the mapping.
    let image =
        unsafe { Image::mapped(base, len, PREFIX, len - PREFIX) }.map_err(|e| e.to_string())?;
    Ok((generation, image))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::document::UpstreamKind;
    use crate::routes::image::{Builder, Targets, UpstreamSpec};
    use crate::upstream::Policy;

    /// Opened and mapped at once, as a worker does.
    fn open(pid: i32, fd: i32, key: u64) -> Result<(u64, Image), String> {
        open_published(pid, fd)?.map(key)
    }

    fn image() -> Image {
        let kind = UpstreamKind::Nginx("vhosts".into());
        let policy = Policy::default();
        let mut b = Builder::default();
        b.upstream(UpstreamSpec {
            name: "u",
            kind: &kind,
            policy: &policy,
            check_name: None,
            discovered: false,
            port_map: &[],
        });
        b.exact(
            "a.test",
            Targets { tls: 0, http: 0 },
            crate::routes::image::NO_ORIGIN,
        );
        b.build()
    }

    fn me() -> i32 {
        std::process::id() as i32
    }

    #[test]
    fn a_published_image_opens_as_it_was_written() {
        let built = image();
        let shared = publish(built.bytes(), 7, 3).unwrap();
        assert_eq!(shared.image, built);
        let (generation, opened) = open(me(), shared.fd.as_raw_fd(), 7).unwrap();
        assert_eq!((generation, &opened), (3, &built));
        assert_eq!(
            opened.view().exact(b"a.test").map(|(k, _)| k),
            Some("a.test")
        );
        let err = open(me(), shared.fd.as_raw_fd(), 8).unwrap_err();
        assert!(err.ends_with("the image of another table"), "{err}");
    }

    /// What a hostile process of the workers' user (or root) could try: every change fails.
    #[test]
    fn nobody_can_change_a_published_image() {
        let built = image();
        let shared = publish(built.bytes(), 1, 1).unwrap();
        let path = format!("/proc/self/fd/{}", shared.fd.as_raw_fd());
        let mut file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        assert!(file.write_all(b"garbage").is_err(), "write");
        assert!(file.set_len(0).is_err(), "shrink");
        assert!(file.set_len(1 << 20).is_err(), "grow");
        // SAFETY: fcntl on a descriptor of this test.
        let unseal = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, 0) };
        assert_eq!(unseal, -1, "the seals are sealed");
        assert_eq!(shared.image, built);
    }

    #[test]
    fn what_is_not_a_sealed_image_is_refused() {
        // A memfd with the right bytes but no seals: its writer could still change it.
        let built = image();
        let name = CString::new("unsealed").unwrap();
        // SAFETY: a plain syscall.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: owned here.
        let mut file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let mut prefix = [0u8; PREFIX];
        prefix[..8].copy_from_slice(&MAGIC);
        prefix[8..16].copy_from_slice(&1u64.to_le_bytes());
        prefix[24..32].copy_from_slice(&(built.bytes().len() as u64).to_le_bytes());
        file.write_all(&prefix).unwrap();
        file.write_all(built.bytes()).unwrap();
        let err = open(me(), file.as_raw_fd(), 1).unwrap_err();
        assert!(err.ends_with("not a sealed memfd"), "{err}");
        // A regular file, and a descriptor that is not open.
        let plain = File::open("/proc/self/status").unwrap();
        assert!(open(me(), plain.as_raw_fd(), 1).is_err());
        assert!(open(me(), 1_000_000, 1)
            .unwrap_err()
            .contains("No such file"));
    }

    #[test]
    fn a_damaged_image_is_refused_before_it_is_sealed_in() {
        let mut bytes = image().bytes().to_vec();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        let err = publish(&bytes, 1, 1).map(|_| ()).unwrap_err();
        assert_eq!(err, "checksum mismatch");
    }
}

//! The few primitives a QUIC Initial packet needs (RFC 9001 §5), from the OpenSSL libcrypto
//! that every nginx serving TLS already has loaded: HMAC-SHA-256 (for HKDF), one AES-128 block
//! (header protection) and AES-128-GCM (the packet's AEAD). No cipher is written here.

use core::ffi::{c_int, c_uchar, c_uint, c_void};
use core::ptr;

#[allow(non_camel_case_types)]
type EVP_CIPHER_CTX = c_void;
#[allow(non_camel_case_types)]
type EVP_CIPHER = c_void;
#[allow(non_camel_case_types)]
type EVP_MD = c_void;

const EVP_CTRL_GCM_SET_IVLEN: c_int = 0x9;
const EVP_CTRL_GCM_GET_TAG: c_int = 0x10;
const EVP_CTRL_GCM_SET_TAG: c_int = 0x11;

// The module resolves these against the libcrypto nginx is linked with; the pure builds (unit
// tests, fuzz targets) link it themselves.
#[cfg_attr(any(test, not(feature = "module")), link(name = "crypto"))]
extern "C" {
    fn EVP_sha256() -> *const EVP_MD;
    fn HMAC(
        md: *const EVP_MD,
        key: *const c_void,
        key_len: c_int,
        data: *const c_uchar,
        data_len: usize,
        md_out: *mut c_uchar,
        md_len: *mut c_uint,
    ) -> *mut c_uchar;
    fn EVP_aes_128_ecb() -> *const EVP_CIPHER;
    fn EVP_aes_128_gcm() -> *const EVP_CIPHER;
    fn EVP_CIPHER_CTX_new() -> *mut EVP_CIPHER_CTX;
    fn EVP_CIPHER_CTX_free(ctx: *mut EVP_CIPHER_CTX);
    fn EVP_CIPHER_CTX_set_padding(ctx: *mut EVP_CIPHER_CTX, pad: c_int) -> c_int;
    fn EVP_CIPHER_CTX_ctrl(
        ctx: *mut EVP_CIPHER_CTX,
        kind: c_int,
        arg: c_int,
        ptr: *mut c_void,
    ) -> c_int;
    /// `enc`: 1 to encrypt, 0 to decrypt, -1 to leave as set.
    fn EVP_CipherInit_ex(
        ctx: *mut EVP_CIPHER_CTX,
        cipher: *const EVP_CIPHER,
        engine: *mut c_void,
        key: *const c_uchar,
        iv: *const c_uchar,
        enc: c_int,
    ) -> c_int;
    fn EVP_CipherUpdate(
        ctx: *mut EVP_CIPHER_CTX,
        out: *mut c_uchar,
        out_len: *mut c_int,
        input: *const c_uchar,
        in_len: c_int,
    ) -> c_int;
    fn EVP_CipherFinal_ex(
        ctx: *mut EVP_CIPHER_CTX,
        out: *mut c_uchar,
        out_len: *mut c_int,
    ) -> c_int;
}

/// HMAC-SHA-256 of the concatenation of `parts` (at most 300 bytes in all: HKDF labels).
pub fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut data = [0u8; 300];
    let mut len = 0;
    for part in parts {
        data[len..len + part.len()].copy_from_slice(part);
        len += part.len();
    }
    let mut out = [0u8; 32];
    let mut out_len: c_uint = 0;
    // SAFETY: every pointer is to a live buffer of the length given; the output holds a
    // SHA-256 digest. HMAC returns NULL only on an allocation failure, which leaves `out`
    // zero: a key that opens nothing.
    unsafe {
        HMAC(
            EVP_sha256(),
            key.as_ptr().cast(),
            key.len() as c_int,
            data.as_ptr(),
            len,
            out.as_mut_ptr(),
            &mut out_len,
        );
    }
    out
}

/// A cipher context, freed on drop.
struct Ctx(*mut EVP_CIPHER_CTX);

impl Ctx {
    fn new() -> Option<Ctx> {
        // SAFETY: a plain allocation; NULL is checked.
        let ctx = unsafe { EVP_CIPHER_CTX_new() };
        (!ctx.is_null()).then_some(Ctx(ctx))
    }
}

impl Drop for Ctx {
    fn drop(&mut self) {
        // SAFETY: allocated by EVP_CIPHER_CTX_new, freed once.
        unsafe { EVP_CIPHER_CTX_free(self.0) }
    }
}

/// One AES-128 block: the header-protection mask of RFC 9001 §5.4.3. None if libcrypto fails.
pub fn aes128_block(key: &[u8; 16], block: &[u8; 16]) -> Option<[u8; 16]> {
    let ctx = Ctx::new()?;
    let mut out = [0u8; 32];
    let mut len: c_int = 0;
    // SAFETY: a context of ours; ECB takes no IV; the output has room for a block and more.
    let ok = unsafe {
        EVP_CipherInit_ex(
            ctx.0,
            EVP_aes_128_ecb(),
            ptr::null_mut(),
            key.as_ptr(),
            ptr::null(),
            1,
        ) == 1
            && EVP_CIPHER_CTX_set_padding(ctx.0, 0) == 1
            && EVP_CipherUpdate(ctx.0, out.as_mut_ptr(), &mut len, block.as_ptr(), 16) == 1
    };
    (ok && len == 16).then(|| out[..16].try_into().expect("16 bytes"))
}

/// Opens an AES-128-GCM payload in place (`data` without its 16-byte `tag`). False when the
/// tag does not match (or libcrypto fails): `data` is then garbage.
pub fn aes128_gcm_open(
    key: &[u8; 16],
    nonce: &[u8; 12],
    aad: &[u8],
    data: &mut [u8],
    tag: &[u8; 16],
) -> bool {
    let mut tag = *tag;
    aes128_gcm(key, nonce, aad, data, &mut tag, false)
}

/// Seals an AES-128-GCM payload in place and returns its tag: what a client does, for tests
/// and fuzz targets that build Initial packets.
#[cfg(any(test, not(feature = "module")))]
pub fn aes128_gcm_seal(
    key: &[u8; 16],
    nonce: &[u8; 12],
    aad: &[u8],
    data: &mut [u8],
) -> Option<[u8; 16]> {
    let mut tag = [0u8; 16];
    aes128_gcm(key, nonce, aad, data, &mut tag, true).then_some(tag)
}

/// AES-128-GCM in place: seals `data` and writes its `tag`, or opens it and checks `tag`.
fn aes128_gcm(
    key: &[u8; 16],
    nonce: &[u8; 12],
    aad: &[u8],
    data: &mut [u8],
    tag: &mut [u8; 16],
    seal: bool,
) -> bool {
    let Some(ctx) = Ctx::new() else {
        return false;
    };
    let (Ok(data_len), Ok(aad_len)) = (c_int::try_from(data.len()), c_int::try_from(aad.len()))
    else {
        return false;
    };
    let mut len: c_int = 0;
    let inout = data.as_mut_ptr();
    // SAFETY: a context of ours; key, nonce, AAD, data and tag are live buffers of the lengths
    // given; GCM writes exactly as many bytes as it reads, in place, and nothing at Final.
    unsafe {
        EVP_CipherInit_ex(
            ctx.0,
            EVP_aes_128_gcm(),
            ptr::null_mut(),
            ptr::null(),
            ptr::null(),
            c_int::from(seal),
        ) == 1
            && EVP_CIPHER_CTX_ctrl(ctx.0, EVP_CTRL_GCM_SET_IVLEN, 12, ptr::null_mut()) == 1
            && EVP_CipherInit_ex(
                ctx.0,
                ptr::null(),
                ptr::null_mut(),
                key.as_ptr(),
                nonce.as_ptr(),
                -1,
            ) == 1
            && EVP_CipherUpdate(ctx.0, ptr::null_mut(), &mut len, aad.as_ptr(), aad_len) == 1
            && EVP_CipherUpdate(ctx.0, inout, &mut len, inout, data_len) == 1
            && (seal
                || EVP_CIPHER_CTX_ctrl(ctx.0, EVP_CTRL_GCM_SET_TAG, 16, tag.as_mut_ptr().cast())
                    == 1)
            && EVP_CipherFinal_ex(ctx.0, inout.add(data.len()), &mut len) == 1
            && (!seal
                || EVP_CIPHER_CTX_ctrl(ctx.0, EVP_CTRL_GCM_GET_TAG, 16, tag.as_mut_ptr().cast())
                    == 1)
    }
}

//! How a blob is turned into the bytes a store holds, and back: the one place
//! where a plain and an encrypted volume differ. Below it is the store (which
//! sees only what [`Codec::seal`] gives it); above it, [`crate::store`] and
//! everything that builds trees, which see only plain blobs
//! ([`crate::object`]'s encodings).
//!
//! A blob's name (its key in the store) is always the SHA-256 of the stored
//! bytes, so any store, `fsclient fsck` and the collector can verify a blob
//! without a key.
//!
//! **Plain:** stored bytes are the blob itself.
//!
//! **Encrypted (convergent):** with a volume master key `M` (from a key file,
//! or a passphrase through Argon2id), keys are derived with HKDF-SHA256:
//! `K_enc2` and `K_enc` (AES-256-GCM-SIV), `K_conv` (the convergence
//! secret) and `K_check`. A volume made now ([`Format::Deterministic`],
//! config `encryption=aes-256-gcm-siv-det`) stores a blob `P` as
//!
//! ```text
//! 0xE1 | 0x02 | AES-256-GCM-SIV(K_enc2, nonce = 12 zero bytes, aad = 0xE1 0x02, P) (ciphertext + 16-byte tag)
//! ```
//!
//! AES-GCM-SIV (RFC 8452) with a fixed nonce is a deterministic AEAD: its
//! synthetic IV is a keyed function (POLYVAL under a key derived from
//! `K_enc2`) of the plaintext, so the same blob always encrypts to the same
//! bytes under the same key, and equal files deduplicate, while someone
//! without the key cannot confirm a guess of a file's content by encrypting
//! it; two different blobs reveal only that they differ. The first format
//! ([`Format::SyntheticNonce`], `encryption=aes-256-gcm-siv`, still read
//! and written for the volumes made with it) derived the nonce with one more
//! pass over the blob:
//!
//! ```text
//! 0xE1 | 0x01 | nonce[12] | AES-256-GCM-SIV(K_enc, nonce, aad = 0xE1 0x01, P) (ciphertext + 16-byte tag)
//! nonce = HMAC-SHA256(K_conv, P)[..12]
//! ```
//!
//! Dropping that pass seals 1.4× as fast (402 to 570 MB/s here, hash of the
//! stored bytes included; `speed_of_the_parts`). docs/FORMAT.md has the
//! threat model.

use aes_gcm_siv::aead::{AeadInPlace, KeyInit};
use aes_gcm_siv::{Aes256GcmSiv, Nonce};
use bytes::Bytes;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::object::Hash;

/// First byte of an encrypted blob: never a plain blob's tag (1..=6).
pub const ENCRYPTED_TAG: u8 = 0xE1;
const NONCE: usize = 12;
const TAG: usize = 16;

/// How a volume's blobs are encrypted (its config says which).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Format 1: the nonce is an HMAC of the plaintext, stored in the blob.
    SyntheticNonce = 1,
    /// Format 2: AES-GCM-SIV under a fixed nonce (a deterministic AEAD).
    Deterministic = 2,
}

impl Format {
    /// The config's name of the cipher.
    pub fn config_name(self) -> &'static str {
        match self {
            Format::SyntheticNonce => "aes-256-gcm-siv",
            Format::Deterministic => "aes-256-gcm-siv-det",
        }
    }

    pub fn from_config_name(name: &str) -> Option<Format> {
        [Format::SyntheticNonce, Format::Deterministic]
            .into_iter()
            .find(|f| f.config_name() == name)
    }

    /// What encryption adds to a blob's size.
    pub fn overhead(self) -> usize {
        match self {
            Format::SyntheticNonce => 2 + NONCE + TAG,
            Format::Deterministic => 2 + TAG,
        }
    }
}

/// Why stored bytes could not be turned back into a blob.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("its content does not match its hash")]
    Corrupt,
    #[error("it is encrypted, and this volume was opened without a key")]
    NeedsKey,
    #[error("it does not decrypt with this volume's key (another volume's blob, or damaged)")]
    WrongKey,
    #[error("unknown encryption format {0}")]
    UnknownVersion(u8),
}

/// The keys of an encrypted volume, derived from its master key.
pub struct Keys {
    /// Tells keys apart in this process (for caches of sealed names).
    id: u64,
    /// How this volume's blobs are written (both formats are read).
    format: Format,
    /// Format 1's cipher.
    cipher: Aes256GcmSiv,
    /// Format 2's cipher.
    deterministic: Aes256GcmSiv,
    convergence: Zeroizing<[u8; 32]>,
    check: Zeroizing<[u8; 32]>,
}

impl Keys {
    /// Derives the volume's keys from a master key (any length; 32 random
    /// bytes from a key file, or Argon2id's output for a passphrase).
    pub fn from_master(master: &[u8], format: Format) -> Keys {
        let hk = hkdf::Hkdf::<Sha256>::new(Some(b"dictfs"), master);
        let derive = |info: &[u8]| {
            let mut k = Zeroizing::new([0u8; 32]);
            hk.expand(info, &mut k[..])
                .expect("32 bytes is a valid HKDF length");
            k
        };
        let enc = derive(b"dictfs v1 blob encryption");
        let enc2 = derive(b"dictfs v2 blob encryption");
        let check = derive(b"dictfs v1 key check");
        let id = u64::from_le_bytes(check[..8].try_into().expect("8 bytes")) ^ ((format as u64) << 8);
        Keys {
            id: id | 1,
            format,
            cipher: Aes256GcmSiv::new_from_slice(&enc[..]).expect("32-byte key"),
            deterministic: Aes256GcmSiv::new_from_slice(&enc2[..]).expect("32-byte key"),
            convergence: derive(b"dictfs v1 convergence"),
            check,
        }
    }

    /// A value kept in the volume's config that tells a right key from a
    /// wrong one without revealing anything about the key (an HMAC output).
    pub fn check_value(&self) -> String {
        hex::encode(&hmac(&self.check[..], &[b"dictfs key check"])[..16])
    }

    fn nonce(&self, plain: &[u8]) -> [u8; NONCE] {
        let mut nonce = [0u8; NONCE];
        nonce.copy_from_slice(&hmac(&self.convergence[..], &[plain])[..NONCE]);
        nonce
    }

    /// The cipher and nonce of `format`'s blobs (the nonce of format 1 is
    /// derived from the plaintext, `plain`).
    fn cipher_and_nonce(&self, format: Format, plain: &[u8]) -> (&Aes256GcmSiv, [u8; NONCE]) {
        match format {
            Format::SyntheticNonce => (&self.cipher, self.nonce(plain)),
            Format::Deterministic => (&self.deterministic, [0u8; NONCE]),
        }
    }

    fn encrypt(&self, plain: &[u8]) -> Bytes {
        let format = self.format;
        let (cipher, nonce) = self.cipher_and_nonce(format, plain);
        let head = [ENCRYPTED_TAG, format as u8];
        // One copy: the plain bytes into place, encrypted there.
        let mut out = Vec::with_capacity(plain.len() + format.overhead());
        out.extend_from_slice(&head);
        if format == Format::SyntheticNonce {
            out.extend_from_slice(&nonce);
        }
        let body = out.len();
        out.extend_from_slice(plain);
        let tag = cipher
            .encrypt_in_place_detached(Nonce::from_slice(&nonce), &head, &mut out[body..])
            .expect("a blob is far below GCM-SIV's 2^36-byte limit");
        out.extend_from_slice(&tag);
        Bytes::from(out)
    }

    fn decrypt(&self, stored: &[u8]) -> Result<Bytes, CodecError> {
        let format = match stored.get(1) {
            Some(1) => Format::SyntheticNonce,
            Some(2) => Format::Deterministic,
            Some(&other) => return Err(CodecError::UnknownVersion(other)),
            None => return Err(CodecError::WrongKey),
        };
        if stored.len() < format.overhead() {
            return Err(CodecError::WrongKey);
        }
        let head = &stored[..2];
        let (cipher, nonce, body) = match format {
            Format::SyntheticNonce => (&self.cipher, &stored[2..2 + NONCE], &stored[2 + NONCE..]),
            Format::Deterministic => (&self.deterministic, &[0u8; NONCE][..], &stored[2..]),
        };
        let (body, tag) = body.split_at(body.len() - TAG);
        let mut plain = body.to_vec();
        cipher
            .decrypt_in_place_detached(Nonce::from_slice(nonce), head, &mut plain, tag.into())
            .map_err(|_| CodecError::WrongKey)?;
        Ok(Bytes::from(plain))
    }
}

/// HMAC-SHA256 under `key` of `parts`, one after another.
fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

/// A blob ready for the store: its name, its plain bytes (what readers above
/// the store see, and what the cache keeps) and the bytes stored.
#[derive(Clone)]
pub struct Sealed {
    pub hash: Hash,
    pub plain: Bytes,
    pub stored: Bytes,
}

/// Plain or encrypted (see the module's doc).
#[derive(Default)]
pub enum Codec {
    #[default]
    Plain,
    Encrypted(Box<Keys>),
}

impl Codec {
    pub fn is_encrypted(&self) -> bool {
        matches!(self, Codec::Encrypted(_))
    }

    /// Whether this codec holds the keys whose check value is `check`.
    pub fn has_check(&self, check: &str) -> bool {
        matches!(self, Codec::Encrypted(keys) if keys.check_value() == check)
    }

    /// The hash that decides where a large directory is cut into parts
    /// (docs/FORMAT.md, "Large directories"): SHA-256 for a plain volume; for
    /// an encrypted one HMAC-SHA256 under the convergence key, prefixed
    /// `dictfs dir split` (never a blob's first byte), since the parts' sizes
    /// are visible and a public cut rule would let anyone test for a name.
    pub fn split_hash(&self, salted: &[u8]) -> [u8; 32] {
        match self {
            Codec::Plain => Hash::of(salted).0,
            Codec::Encrypted(keys) => hmac(&keys.convergence[..], &[b"dictfs dir split", salted]),
        }
    }

    /// Equal for codecs that seal alike (0 for plain), so a cache of sealed
    /// names can be shared between volumes.
    pub fn id(&self) -> u64 {
        match self {
            Codec::Plain => 0,
            Codec::Encrypted(keys) => keys.id,
        }
    }

    /// The stored form of `plain` and its name.
    pub fn seal(&self, plain: Bytes) -> Sealed {
        let stored = match self {
            Codec::Plain => plain.clone(),
            Codec::Encrypted(keys) => keys.encrypt(&plain),
        };
        Sealed {
            hash: Hash::of(&stored),
            plain,
            stored,
        }
    }

    /// The name `plain` is stored under (without keeping the stored form).
    pub fn name(&self, plain: &[u8]) -> Hash {
        match self {
            Codec::Plain => Hash::of(plain),
            Codec::Encrypted(keys) => Hash::of(&keys.encrypt(plain)),
        }
    }

    /// The blob named `h`, from bytes read from the store: checked against
    /// the name first (a store's damage is found without a key), then
    /// decrypted (and authenticated) if it is encrypted.
    pub fn open(&self, h: &Hash, stored: Bytes) -> Result<Bytes, CodecError> {
        // A large encrypted blob is checked and decrypted at once, on two
        // cores (one random read waits for both passes over its chunk); what
        // is decrypted is returned only if the check passed.
        if self.is_encrypted() && stored.len() >= 256 << 10 {
            let (named, opened) = std::thread::scope(|s| {
                let check = s.spawn(|| Hash::of(&stored));
                let opened = self.open_trusted(stored.clone());
                (check.join().expect("hashing does not panic"), opened)
            });
            return if named == *h {
                opened
            } else {
                Err(CodecError::Corrupt)
            };
        }
        if Hash::of(&stored) != *h {
            return Err(CodecError::Corrupt);
        }
        self.open_trusted(stored)
    }

    /// [`Codec::open`] for bytes this client sealed itself (uploads not yet
    /// acknowledged): nothing to check them against.
    pub fn open_trusted(&self, stored: Bytes) -> Result<Bytes, CodecError> {
        match (stored.first(), self) {
            (Some(&ENCRYPTED_TAG), Codec::Encrypted(keys)) => keys.decrypt(&stored),
            (Some(&ENCRYPTED_TAG), Codec::Plain) => Err(CodecError::NeedsKey),
            // A plain blob, even in an encrypted volume's store (a volume
            // shares its store with others); its own decoder checks it.
            _ => Ok(stored),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(master: &[u8]) -> Codec {
        Codec::Encrypted(Box::new(Keys::from_master(master, Format::Deterministic)))
    }

    #[test]
    fn sealing_is_deterministic_and_opens_back() {
        let c = keys(b"0123456789abcdef0123456789abcdef");
        let blob = Bytes::from_static(b"\x01\x01hello world");
        let a = c.seal(blob.clone());
        let b = c.seal(blob.clone());
        assert_eq!(a.stored, b.stored, "convergent: the same blob seals the same");
        assert_eq!(a.hash, c.name(&blob));
        assert_eq!(a.stored.len(), blob.len() + Format::Deterministic.overhead());
        assert!(!a.stored.windows(5).any(|w| w == b"hello"));
        assert_eq!(c.open(&a.hash, a.stored.clone()).unwrap(), blob);
    }

    #[test]
    fn another_key_seals_otherwise_and_cannot_open() {
        let (c1, c2) = (keys(b"key one"), keys(b"key two"));
        let blob = Bytes::from_static(b"\x01\x01same content");
        let (a, b) = (c1.seal(blob.clone()), c2.seal(blob.clone()));
        assert_ne!(a.stored, b.stored);
        assert_eq!(c2.open(&a.hash, a.stored.clone()), Err(CodecError::WrongKey));
        assert_eq!(
            Codec::Plain.open(&a.hash, a.stored.clone()),
            Err(CodecError::NeedsKey)
        );
    }

    #[test]
    fn any_changed_byte_is_refused() {
        let c = keys(b"k");
        let s = c.seal(Bytes::from_static(b"\x01\x01some file bytes"));
        for i in 0..s.stored.len() {
            let mut bad = s.stored.to_vec();
            bad[i] ^= 0x40;
            // Against the name: corrupt. Trusted (no name to check): the tag.
            assert_eq!(
                c.open(&s.hash, Bytes::from(bad.clone())),
                Err(CodecError::Corrupt)
            );
            // (A changed first byte makes it a plain blob, which its decoder refuses.)
            if i > 0 {
                assert!(c.open_trusted(Bytes::from(bad)).is_err(), "byte {i}");
            }
        }
    }

    /// Large blobs are checked and decrypted side by side: a damaged one is
    /// still refused, never returned.
    #[test]
    fn a_large_damaged_blob_is_refused() {
        let c = keys(b"k");
        let mut blob = vec![1u8, 1];
        blob.extend((0..1u32 << 20).map(|i| (i * 7) as u8));
        let s = c.seal(Bytes::from(blob.clone()));
        assert_eq!(c.open(&s.hash, s.stored.clone()).unwrap(), blob);
        for at in [0, 5, s.stored.len() / 2, s.stored.len() - 1] {
            let mut bad = s.stored.to_vec();
            bad[at] ^= 1;
            assert_eq!(
                c.open(&s.hash, Bytes::from(bad)),
                Err(CodecError::Corrupt),
                "byte {at}"
            );
        }
    }

    #[test]
    fn plain_blobs_are_stored_as_they_are() {
        let blob = Bytes::from_static(b"\x01\x01plain");
        let s = Codec::Plain.seal(blob.clone());
        assert_eq!(s.stored, blob);
        assert_eq!(s.hash, Hash::of(&blob));
        // An encrypted volume's client still reads plain blobs.
        assert_eq!(keys(b"k").open(&s.hash, s.stored).unwrap(), blob);
    }

    /// Speeds of the parts of sealing, for tuning (run with --release --ignored --nocapture).
    #[test]
    #[ignore]
    fn speed_of_the_parts() {
        let blob = Bytes::from(vec![7u8; 1 << 20]);
        let k = Keys::from_master(b"speed", Format::SyntheticNonce);
        let time = |what: &str, f: &dyn Fn()| {
            let t = std::time::Instant::now();
            for _ in 0..256 {
                f();
            }
            eprintln!("{what}: {:.0} MB/s", 256.0 * 1.048576 / t.elapsed().as_secs_f64());
        };
        time("sha256", &|| {
            std::hint::black_box(Hash::of(&blob));
        });
        time("hmac nonce", &|| {
            std::hint::black_box(k.nonce(&blob));
        });
        time("encrypt", &|| {
            std::hint::black_box(k.encrypt(&blob));
        });
        let sealed = k.encrypt(&blob);
        time("decrypt", &|| {
            std::hint::black_box(k.decrypt(&sealed).unwrap());
        });
        for format in [Format::SyntheticNonce, Format::Deterministic] {
            let c = Codec::Encrypted(Box::new(Keys::from_master(b"speed", format)));
            time(&format!("seal, {format:?}"), &|| {
                std::hint::black_box(c.seal(blob.clone()));
            });
            let s = c.seal(blob.clone());
            time(&format!("open, {format:?}"), &|| {
                std::hint::black_box(c.open(&s.hash, s.stored.clone()).unwrap());
            });
        }
    }

    /// The encrypted format, pinned: these bytes must never change (a volume
    /// written today must open with every later fsclient).
    #[test]
    fn golden_vectors() {
        let master = [7u8; 32];
        let blob = Bytes::from_static(b"\x01\x01dictfs");
        for (format, stored, name) in [
            (Format::SyntheticNonce, GOLDEN_STORED_1, GOLDEN_NAME_1),
            (Format::Deterministic, GOLDEN_STORED_2, GOLDEN_NAME_2),
        ] {
            let k = Keys::from_master(&master, format);
            assert_eq!(k.check_value(), GOLDEN_CHECK);
            let c = Codec::Encrypted(Box::new(k));
            let s = c.seal(blob.clone());
            assert_eq!(hex::encode(&s.stored), stored, "{format:?}");
            assert_eq!(s.hash.hex(), name, "{format:?}");
            // Either format's client reads both formats.
            let other = match format {
                Format::SyntheticNonce => Format::Deterministic,
                Format::Deterministic => Format::SyntheticNonce,
            };
            let reader = Codec::Encrypted(Box::new(Keys::from_master(&master, other)));
            assert_eq!(reader.open(&s.hash, s.stored).unwrap(), blob);
        }
    }

    // Computed outside this code, with Python's `cryptography` (OpenSSL's
    // HKDF, HMAC and AES-GCM-SIV) following the module's doc.
    const GOLDEN_CHECK: &str = "5090386f88f6f6c121c692258e67c05a";
    const GOLDEN_STORED_1: &str =
        "e101c3db96b1b03ce31f51937280980c0f14729e2a87b7cd00215d184df141bf704b795f9787";
    const GOLDEN_NAME_1: &str = "aa73230ba5a1983c7396fa36fe1f1af46d1a0866c729099fa96342f1ca0d2a07";
    const GOLDEN_STORED_2: &str = "e102c69caa05c1eb2cba39b0013b560727b22853aa4d05106014";
    const GOLDEN_NAME_2: &str = "98e4f0d06f338f7686a161994bb6a6121a55c5c1c2795aabf76356aae2f0086c";
}

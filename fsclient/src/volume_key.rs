//! An encrypted volume's key: where it comes from (a key file, or a
//! passphrase through Argon2id), and the settings kept in the volume's config
//! key that let a client tell a right key from a wrong one before it reads
//! anything ([`crate::codec`] has the encryption itself).
//!
//! Config fields (beside the chunk sizes, `name=value` words):
//! `encryption=aes-256-gcm-siv-det` (volumes made since format 2;
//! `aes-256-gcm-siv` for format 1: [`crate::codec::Format`]), `key=file` or `key=argon2id salt=HEX m=KIB
//! t=N p=N`, and `check=HEX` (an HMAC under a key derived from the master
//! key: it reveals nothing about the key, and a wrong key gives another value).

use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use crate::codec::{Codec, Format, Keys};

/// Where a volume's master key comes from.
pub enum KeySource {
    /// A file: 64 hex digits (what `fsclient keygen` writes), or any other
    /// bytes (at least 16), used as they are.
    File(PathBuf),
    /// A passphrase, stretched with Argon2id and the volume's salt.
    Passphrase(Zeroizing<String>),
}

/// Argon2id's cost for a passphrase: 64 MiB, 3 passes, one lane (about a
/// third of a second here; OWASP asks at least 19 MiB and 2 passes).
const ARGON2_MEMORY_KIB: u32 = 64 << 10;
const ARGON2_PASSES: u32 = 3;
const ARGON2_LANES: u32 = 1;

/// The encryption settings of a volume's config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lock {
    format: Format,
    kdf: Kdf,
    check: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Kdf {
    File,
    Argon2id { salt: Vec<u8>, m: u32, t: u32, p: u32 },
}

impl Lock {
    /// New settings for a volume being created, and its keys.
    pub fn create(source: &KeySource) -> Result<(Lock, Keys), String> {
        let kdf = match source {
            KeySource::File(_) => Kdf::File,
            KeySource::Passphrase(_) => Kdf::Argon2id {
                salt: rand::random::<[u8; 16]>().to_vec(),
                m: ARGON2_MEMORY_KIB,
                t: ARGON2_PASSES,
                p: ARGON2_LANES,
            },
        };
        let format = Format::Deterministic;
        let keys = Keys::from_master(&master(&kdf, source)?, format);
        let lock = Lock {
            format,
            kdf,
            check: keys.check_value(),
        };
        Ok((lock, keys))
    }

    /// The volume's keys from `source`, if it is the volume's key.
    pub fn unlock(&self, volume: &str, source: &KeySource) -> Result<Keys, String> {
        match (&self.kdf, source) {
            (Kdf::File, KeySource::Passphrase(_)) => {
                return Err(format!(
                    "volume '{volume}' is encrypted with a key file: give it with --key-file or DICTFS_KEY_FILE"
                ))
            }
            (Kdf::Argon2id { .. }, KeySource::File(_)) => {
                return Err(format!(
                    "volume '{volume}' is encrypted with a passphrase: give it in DICTFS_PASSPHRASE or on a terminal"
                ))
            }
            _ => {}
        }
        let keys = Keys::from_master(&master(&self.kdf, source)?, self.format);
        if keys.check_value() != self.check {
            return Err(format!("wrong key for encrypted volume '{volume}'"));
        }
        Ok(keys)
    }

    /// Whether `codec` holds this volume's keys.
    pub fn opens_with(&self, codec: &Codec) -> bool {
        codec.has_check(&self.check)
    }

    /// The config words for these settings.
    pub fn to_config(&self) -> String {
        let kdf = match &self.kdf {
            Kdf::File => "key=file".to_string(),
            Kdf::Argon2id { salt, m, t, p } => {
                format!("key=argon2id salt={} m={m} t={t} p={p}", hex::encode(salt))
            }
        };
        format!(
            "encryption={} {kdf} check={}",
            self.format.config_name(),
            self.check
        )
    }

    /// The settings in a volume's config; `None` for a plain volume.
    pub fn from_config(text: &str) -> Result<Option<Lock>, String> {
        let field = |name: &str| {
            text.split_whitespace()
                .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
        };
        let Some(cipher) = field("encryption") else {
            return Ok(None);
        };
        let Some(format) = Format::from_config_name(cipher) else {
            return Err(format!(
                "the volume is encrypted with '{cipher}', which this fsclient does not know (a newer one does)"
            ));
        };
        let need = |name: &str| field(name).ok_or_else(|| format!("encrypted volume config lacks '{name}='"));
        let number = |name: &str| -> Result<u32, String> {
            need(name)?
                .parse()
                .map_err(|_| format!("bad encrypted volume config value '{name}'"))
        };
        let kdf = match need("key")? {
            "file" => Kdf::File,
            "argon2id" => Kdf::Argon2id {
                salt: hex::decode(need("salt")?).map_err(|_| "bad encrypted volume salt".to_string())?,
                m: number("m")?,
                t: number("t")?,
                p: number("p")?,
            },
            other => return Err(format!("unknown key derivation '{other}' in the volume config")),
        };
        Ok(Some(Lock {
            format,
            kdf,
            check: need("check")?.to_string(),
        }))
    }
}

fn master(kdf: &Kdf, source: &KeySource) -> Result<Zeroizing<Vec<u8>>, String> {
    match (kdf, source) {
        (Kdf::File, KeySource::File(path)) => read_key_file(path),
        (Kdf::Argon2id { salt, m, t, p }, KeySource::Passphrase(phrase)) => {
            let params =
                argon2::Params::new(*m, *t, *p, Some(32)).map_err(|e| format!("bad Argon2 settings: {e}"))?;
            let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
            let mut out = Zeroizing::new(vec![0u8; 32]);
            argon
                .hash_password_into(phrase.as_bytes(), salt, &mut out)
                .map_err(|e| format!("cannot derive the key from the passphrase: {e}"))?;
            Ok(out)
        }
        _ => Err("the key source does not match the volume's key derivation".into()),
    }
}

fn read_key_file(path: &Path) -> Result<Zeroizing<Vec<u8>>, String> {
    let raw = Zeroizing::new(
        std::fs::read(path).map_err(|e| format!("cannot read key file '{}': {e}", path.display()))?,
    );
    let text = std::str::from_utf8(&raw).map(str::trim).unwrap_or("");
    if text.len() == 64 {
        if let Ok(key) = hex::decode(text) {
            return Ok(Zeroizing::new(key));
        }
    }
    if raw.len() < 16 {
        return Err(format!(
            "key file '{}' is too short: make one with `fsclient keygen FILE`",
            path.display()
        ));
    }
    Ok(Zeroizing::new(raw.to_vec()))
}

/// Writes a new random key file (64 hex digits, mode 0600); refuses to
/// overwrite one (a lost key is a lost volume).
pub fn keygen(path: &Path) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let key = Zeroizing::new(hex::encode(rand::random::<[u8; 32]>()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("cannot create key file '{}': {e}", path.display()))?;
    f.write_all(format!("{}\n", key.as_str()).as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| format!("cannot write key file '{}': {e}", path.display()))
}

/// The codec for a volume with this config text. `source` is asked for the
/// key only if the volume is encrypted, so a plain volume never prompts.
pub fn codec_for(
    volume: &str,
    config: Option<&str>,
    source: impl FnOnce() -> Result<KeySource, String>,
) -> Result<Codec, String> {
    let Some(lock) = config.map(Lock::from_config).transpose()?.flatten() else {
        return Ok(Codec::Plain);
    };
    Ok(Codec::Encrypted(Box::new(lock.unlock(volume, &source()?)?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_file_unlocks_and_another_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        keygen(&a).unwrap();
        keygen(&b).unwrap();
        assert!(keygen(&a).is_err(), "never overwrites a key");
        let (lock, keys) = Lock::create(&KeySource::File(a.clone())).unwrap();
        let text = format!("min=1 avg=2 max=3 {}", lock.to_config());
        let parsed = Lock::from_config(&text).unwrap().unwrap();
        assert_eq!(parsed, lock);
        let again = parsed.unlock("v", &KeySource::File(a)).unwrap();
        assert_eq!(again.check_value(), keys.check_value());
        let wrong = parsed.unlock("v", &KeySource::File(b)).err().unwrap();
        assert_eq!(wrong, "wrong key for encrypted volume 'v'");
        assert!(Lock::from_config("min=1 avg=2 max=3").unwrap().is_none());
        let none = codec_for("v", Some(&text), || Err("no key offered".into())).err();
        assert_eq!(none.as_deref(), Some("no key offered"));
        let plain = codec_for("v", Some("min=1 avg=2 max=3"), || {
            panic!("a plain volume asked for a key")
        });
        assert!(!plain.unwrap().is_encrypted());
    }

    /// A volume made before format 2 keeps its format: its config names the
    /// first cipher, and its key writes format 1 blobs. A cipher this
    /// client does not know is a clear error.
    #[test]
    fn a_format_1_volume_keeps_its_format() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        keygen(&a).unwrap();
        let (lock, keys) = Lock::create(&KeySource::File(a.clone())).unwrap();
        assert!(lock.to_config().starts_with("encryption=aes-256-gcm-siv-det "));
        let new = Codec::Encrypted(Box::new(keys)).seal(bytes::Bytes::from_static(b"\x01\x01x"));
        assert_eq!(&new.stored[..2], &[0xE1, 2]);
        let old = lock.to_config().replace("aes-256-gcm-siv-det", "aes-256-gcm-siv");
        let parsed = Lock::from_config(&old).unwrap().unwrap();
        assert_eq!(parsed.to_config(), old);
        let codec = Codec::Encrypted(Box::new(parsed.unlock("v", &KeySource::File(a)).unwrap()));
        let s = codec.seal(bytes::Bytes::from_static(b"\x01\x01x"));
        assert_eq!(&s.stored[..2], &[0xE1, 1]);
        assert_eq!(codec.open(&new.hash, new.stored).unwrap(), &b"\x01\x01x"[..]);
        let future = Lock::from_config("encryption=aes-512-future key=file check=00").err();
        assert!(future.unwrap().contains("which this fsclient does not know"));
    }

    #[test]
    fn a_passphrase_unlocks_and_another_does_not() {
        let phrase = |p: &str| KeySource::Passphrase(Zeroizing::new(p.to_string()));
        let (lock, _) = Lock::create(&phrase("correct horse")).unwrap();
        let parsed = Lock::from_config(&lock.to_config()).unwrap().unwrap();
        assert!(parsed.unlock("v", &phrase("correct horse")).is_ok());
        assert!(parsed.unlock("v", &phrase("wrong horse")).is_err());
        // Two volumes with the same passphrase have their own salts.
        let (other, _) = Lock::create(&phrase("correct horse")).unwrap();
        assert_ne!(other.check, lock.check);
    }
}

//! The on-store format: typed, self-verifying blobs (see docs/FORMAT.md).
//!
//! A blob's bytes are a one-byte type tag, a format version byte, and a payload;
//! its key is the SHA-256 of all of it. Encodings are deterministic: the same
//! tree always gives the same bytes and so the same keys. Decoders never panic
//! on bad input: anything malformed is [`FormatError`].

use std::collections::BTreeMap;
use std::fmt;

use bytes::{BufMut, Bytes, BytesMut};
use sha2::{Digest, Sha256};

pub const FORMAT_VERSION: u8 = 1;

/// A SHA-256 digest: the key of a blob.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Hash(pub [u8; 32]);

impl Hash {
    pub fn of(bytes: &[u8]) -> Hash {
        Hash(Sha256::digest(bytes).into())
    }

    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn from_hex(s: &str) -> Option<Hash> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(Hash(out))
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", &self.hex()[..12])
    }
}

/// What a blob is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tag {
    Chunk = 1,
    File = 2,
    Dir = 3,
    /// An index over the parts of a large directory.
    DirIndex = 4,
    Commit = 5,
    /// The hard-linked files of a commit: inode id -> entry and link count.
    Inodes = 6,
}

impl Tag {
    fn from_u8(b: u8) -> Option<Tag> {
        match b {
            1 => Some(Tag::Chunk),
            2 => Some(Tag::File),
            3 => Some(Tag::Dir),
            4 => Some(Tag::DirIndex),
            5 => Some(Tag::Commit),
            6 => Some(Tag::Inodes),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("blob is truncated")]
    Truncated,
    #[error("unknown blob type {0}")]
    UnknownTag(u8),
    #[error("expected a {expected:?} blob, found {found:?}")]
    WrongType { expected: Tag, found: Tag },
    #[error("unsupported format version {0}")]
    Version(u8),
    #[error("malformed blob: {0}")]
    Malformed(&'static str),
}

/// A point in time with nanoseconds (seconds may be negative: before 1970).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Time {
    pub secs: i64,
    pub nanos: u32,
}

impl Time {
    pub fn now() -> Time {
        let d = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Time {
            secs: d.as_secs() as i64,
            nanos: d.subsec_nanos(),
        }
    }
}

/// Metadata of a directory entry. uid/gid are recorded, not enforced: security
/// lives at the store (AUTH, TLS).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Meta {
    /// Permission bits (0o7777 at most; the kind is in `Content`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: Time,
    pub ctime: Time,
    /// The last access, kept with `relatime` rules by a mount; `None` until
    /// the first (an entry without one shows its mtime, and is encoded
    /// byte for byte as before access times existed).
    pub atime: Option<Time>,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl Meta {
    /// The access time to show: the recorded one, else the mtime.
    pub fn atime(&self) -> Time {
        self.atime.unwrap_or(self.mtime)
    }
}

/// What an entry is, and where its data lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Content {
    /// A regular file: its manifest and size.
    File {
        manifest: Hash,
        size: u64,
    },
    /// A directory: its directory blob.
    Dir {
        tree: Hash,
    },
    Symlink {
        target: Vec<u8>,
    },
    Fifo,
    /// A character or block device (its device number) or a socket.
    Device {
        kind: DeviceKind,
        rdev: u64,
    },
    /// A name of a hard-linked file: its metadata and content are the inode
    /// table's entry `id` (the entry's own metadata is all zeros).
    Inode {
        id: u64,
    },
}

/// What a [`Content::Device`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    Char = 0,
    Block = 1,
    Socket = 2,
}

impl Content {
    /// The blob this entry's data lives in: a file's manifest, a directory's tree.
    pub fn blob(&self) -> Option<Hash> {
        match self {
            Content::File { manifest, .. } => Some(*manifest),
            Content::Dir { tree } => Some(*tree),
            Content::Symlink { .. } | Content::Fifo | Content::Device { .. } | Content::Inode { .. } => None,
        }
    }

    fn kind(&self) -> u8 {
        match self {
            Content::File { .. } => 1,
            Content::Dir { .. } => 2,
            Content::Symlink { .. } => 3,
            Content::Fifo => 5,
            Content::Inode { .. } => 6,
            Content::Device { .. } => 7,
        }
    }
}

/// A commit's hard-linked files: inode id -> (entry, number of names).
pub type Inodes = BTreeMap<u64, (Entry, u32)>;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub meta: Meta,
    pub content: Content,
}

impl Entry {
    /// Equal but perhaps for the access time: what a diff or a merge counts
    /// as unchanged (reading a file is not changing it).
    pub fn same_but_atime(&self, other: &Entry) -> bool {
        self.content == other.content
            && Meta {
                atime: None,
                ..self.meta.clone()
            } == Meta {
                atime: None,
                ..other.meta.clone()
            }
    }
}

/// A directory: entries sorted by name (bytes, as on Linux).
pub type Dir = BTreeMap<Vec<u8>, Entry>;

/// A file's content: its chunks in order, with their lengths.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Manifest {
    pub chunks: Vec<(Hash, u32)>,
}

impl Manifest {
    pub fn size(&self) -> u64 {
        self.chunks.iter().map(|(_, l)| *l as u64).sum()
    }
}

/// One version of a volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Commit {
    pub root: Hash,
    pub parent: Option<Hash>,
    pub time: Time,
    /// Who wrote it (host and process), for `log` and conflict copy names.
    pub writer: String,
    pub message: String,
    /// The inode table (tag 6), if any file has more than one name.
    pub inodes: Option<Hash>,
    /// The root directory's own mode, owner, times and xattrs (every other
    /// directory's are in its parent's entry). `None` in commits made before
    /// they were kept: the root then shows mode 0755, owned by root.
    pub root_meta: Option<Meta>,
}

/// A commit's file system: its root directory, its inode table and the
/// root directory's own metadata (what [`crate::links`] merges and counts).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tree {
    pub root: Hash,
    pub inodes: Option<Hash>,
    pub root_meta: Option<Meta>,
}

impl Commit {
    /// The file system this commit holds.
    pub fn tree(&self) -> Tree {
        Tree {
            root: self.root,
            inodes: self.inodes,
            root_meta: self.root_meta.clone(),
        }
    }
}

fn start(tag: Tag, capacity: usize) -> BytesMut {
    let mut b = BytesMut::with_capacity(2 + capacity);
    b.put_u8(tag as u8);
    b.put_u8(FORMAT_VERSION);
    b
}

pub fn encode_chunk(data: &[u8]) -> Bytes {
    let mut b = start(Tag::Chunk, data.len());
    b.put_slice(data);
    b.freeze()
}

pub fn encode_manifest(m: &Manifest) -> Bytes {
    let mut b = start(Tag::File, 12 + m.chunks.len() * 36);
    b.put_u64_le(m.size());
    b.put_u32_le(m.chunks.len() as u32);
    for (h, len) in &m.chunks {
        b.put_slice(&h.0);
        b.put_u32_le(*len);
    }
    b.freeze()
}

fn put_time(b: &mut BytesMut, t: Time) {
    b.put_i64_le(t.secs);
    b.put_u32_le(t.nanos);
}

fn put_bytes16(b: &mut BytesMut, s: &[u8]) {
    b.put_u16_le(s.len() as u16);
    b.put_slice(s);
}

fn put_bytes32(b: &mut BytesMut, s: &[u8]) {
    b.put_u32_le(s.len() as u32);
    b.put_slice(s);
}

pub fn encode_dir(dir: &Dir) -> Bytes {
    let mut b = start(Tag::Dir, 64 * dir.len());
    b.put_u32_le(dir.len() as u32);
    for (name, e) in dir {
        put_bytes16(&mut b, name);
        put_entry(&mut b, e);
    }
    b.freeze()
}

/// The inode table: ids ascending, each with its link count and entry.
pub fn encode_inodes(inodes: &Inodes) -> Bytes {
    let mut b = start(Tag::Inodes, 80 * inodes.len());
    b.put_u32_le(inodes.len() as u32);
    for (id, (e, nlink)) in inodes {
        b.put_u64_le(*id);
        b.put_u32_le(*nlink);
        put_entry(&mut b, e);
    }
    b.freeze()
}

/// An entry's kind byte has this bit set when an access time follows its
/// ctime. A reader from before access times meets an unknown kind and
/// rejects the directory, never misreads it.
const HAS_ATIME: u8 = 0x80;

/// An entry's metadata: mode, uid, gid, mtime, ctime, the atime if `with_atime`
/// (an entry's kind byte says so), then the xattrs. The root's metadata in a
/// commit carries its atime in an extension of its own instead.
fn put_meta(b: &mut BytesMut, m: &Meta, with_atime: bool) {
    b.put_u32_le(m.mode);
    b.put_u32_le(m.uid);
    b.put_u32_le(m.gid);
    put_time(b, m.mtime);
    put_time(b, m.ctime);
    if let (true, Some(t)) = (with_atime, m.atime) {
        put_time(b, t);
    }
    b.put_u16_le(m.xattrs.len() as u16);
    for (k, v) in &m.xattrs {
        put_bytes16(b, k);
        put_bytes32(b, v);
    }
}

fn put_entry(b: &mut BytesMut, e: &Entry) {
    {
        let flag = if e.meta.atime.is_some() { HAS_ATIME } else { 0 };
        b.put_u8(e.content.kind() | flag);
        put_meta(b, &e.meta, true);
        match &e.content {
            Content::File { manifest, size } => {
                b.put_u64_le(*size);
                b.put_slice(&manifest.0);
            }
            Content::Dir { tree } => b.put_slice(&tree.0),
            Content::Symlink { target } => put_bytes32(b, target),
            Content::Fifo => {}
            Content::Inode { id } => b.put_u64_le(*id),
            Content::Device { kind, rdev } => {
                b.put_u8(*kind as u8);
                b.put_u64_le(*rdev);
            }
        }
    }
}

/// One child of a directory index: the first name it holds, its blob, and its
/// level (0: a part holding entries, a tag-3 blob; n > 0: an index).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexChild {
    pub first: Vec<u8>,
    pub blob: Hash,
    pub level: u8,
}

pub fn encode_dir_index(children: &[IndexChild]) -> Bytes {
    let mut b = start(Tag::DirIndex, children.len() * 48);
    b.put_u32_le(children.len() as u32);
    for c in children {
        put_bytes16(&mut b, &c.first);
        b.put_slice(&c.blob.0);
        b.put_u8(c.level);
    }
    b.freeze()
}

pub fn decode_dir_index(blob: &[u8]) -> Result<Vec<IndexChild>, FormatError> {
    let mut r = payload(blob, Tag::DirIndex)?;
    let n = r.u32()? as usize;
    if n < 2 || n > r.buf.len() / 35 {
        return Err(FormatError::Malformed("bad index child count"));
    }
    let mut out: Vec<IndexChild> = Vec::with_capacity(n);
    for _ in 0..n {
        let first = r.bytes16()?;
        if out.last().is_some_and(|l| l.first >= first) {
            return Err(FormatError::Malformed("index children not sorted"));
        }
        let blob = r.hash()?;
        out.push(IndexChild {
            first,
            blob,
            level: r.u8()?,
        });
    }
    r.end()?;
    Ok(out)
}

pub fn encode_commit(c: &Commit) -> Bytes {
    let mut b = start(Tag::Commit, 128 + c.writer.len() + c.message.len());
    b.put_slice(&c.root.0);
    match c.parent {
        Some(p) => {
            b.put_u8(1);
            b.put_slice(&p.0);
        }
        None => b.put_u8(0),
    }
    put_time(&mut b, c.time);
    put_bytes16(&mut b, c.writer.as_bytes());
    put_bytes32(&mut b, c.message.as_bytes());
    // Extensions, each a tag byte and its payload, in tag order: 1, the
    // inode table's hash; 2, the root directory's metadata. A commit without
    // them ends here, byte for byte as before they existed.
    if let Some(h) = c.inodes {
        b.put_u8(1);
        b.put_slice(&h.0);
    }
    if let Some(m) = &c.root_meta {
        b.put_u8(2);
        put_meta(&mut b, m, false);
        // 3: the root directory's access time, when it has one.
        if let Some(t) = m.atime {
            b.put_u8(3);
            put_time(&mut b, t);
        }
    }
    b.freeze()
}

/// A cursor over a blob's payload that fails instead of panicking.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
        if self.buf.len() < n {
            return Err(FormatError::Truncated);
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, FormatError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, FormatError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }

    fn u32(&mut self) -> Result<u32, FormatError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }

    fn u64(&mut self) -> Result<u64, FormatError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }

    fn hash(&mut self) -> Result<Hash, FormatError> {
        Ok(Hash(self.take(32)?.try_into().expect("32 bytes")))
    }

    fn time(&mut self) -> Result<Time, FormatError> {
        let secs = self.u64()? as i64;
        let nanos = self.u32()?;
        if nanos >= 1_000_000_000 {
            return Err(FormatError::Malformed("nanoseconds out of range"));
        }
        Ok(Time { secs, nanos })
    }

    fn bytes16(&mut self) -> Result<Vec<u8>, FormatError> {
        let n = self.u16()? as usize;
        Ok(self.take(n)?.to_vec())
    }

    fn bytes32(&mut self) -> Result<Vec<u8>, FormatError> {
        let n = self.u32()? as usize;
        Ok(self.take(n)?.to_vec())
    }

    fn end(&self) -> Result<(), FormatError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(FormatError::Malformed("trailing bytes"))
        }
    }
}

/// The tag of a blob, with its version checked; and the payload.
pub fn split(blob: &[u8]) -> Result<(Tag, &[u8]), FormatError> {
    let (&tag, rest) = blob.split_first().ok_or(FormatError::Truncated)?;
    let tag = Tag::from_u8(tag).ok_or(FormatError::UnknownTag(tag))?;
    let (&version, payload) = rest.split_first().ok_or(FormatError::Truncated)?;
    if version != FORMAT_VERSION {
        return Err(FormatError::Version(version));
    }
    Ok((tag, payload))
}

fn payload(blob: &[u8], expected: Tag) -> Result<Reader<'_>, FormatError> {
    let (found, payload) = split(blob)?;
    if found != expected {
        return Err(FormatError::WrongType { expected, found });
    }
    Ok(Reader { buf: payload })
}

/// A chunk's data (the blob without its two-byte header).
pub fn decode_chunk(blob: &Bytes) -> Result<Bytes, FormatError> {
    payload(blob, Tag::Chunk)?;
    Ok(blob.slice(2..))
}

pub fn decode_manifest(blob: &[u8]) -> Result<Manifest, FormatError> {
    let mut r = payload(blob, Tag::File)?;
    let size = r.u64()?;
    let n = r.u32()? as usize;
    if n > r.buf.len() / 36 {
        return Err(FormatError::Truncated);
    }
    let mut chunks = Vec::with_capacity(n);
    for _ in 0..n {
        chunks.push((r.hash()?, r.u32()?));
    }
    r.end()?;
    let m = Manifest { chunks };
    if m.size() != size {
        return Err(FormatError::Malformed("file size does not match its chunks"));
    }
    Ok(m)
}

pub fn decode_dir(blob: &[u8]) -> Result<Dir, FormatError> {
    let mut r = payload(blob, Tag::Dir)?;
    let n = r.u32()? as usize;
    let mut dir = Dir::new();
    let mut last: Option<Vec<u8>> = None;
    for _ in 0..n {
        let name = r.bytes16()?;
        if name.is_empty() || name.contains(&b'/') || name.contains(&0) || name == b"." || name == b".." {
            return Err(FormatError::Malformed("invalid entry name"));
        }
        if last.as_ref().is_some_and(|l| *l >= name) {
            return Err(FormatError::Malformed("entries not sorted"));
        }
        let entry = entry(&mut r)?;
        last = Some(name.clone());
        dir.insert(name, entry);
    }
    r.end()?;
    Ok(dir)
}

pub fn decode_inodes(blob: &[u8]) -> Result<Inodes, FormatError> {
    let mut r = payload(blob, Tag::Inodes)?;
    let n = r.u32()? as usize;
    let mut out = Inodes::new();
    for _ in 0..n {
        let id = r.u64()?;
        if out.last_key_value().is_some_and(|(&l, _)| l >= id) {
            return Err(FormatError::Malformed("inodes not sorted"));
        }
        let nlink = r.u32()?;
        let e = entry(&mut r)?;
        if matches!(e.content, Content::Dir { .. } | Content::Inode { .. }) {
            return Err(FormatError::Malformed("an inode must be a file, symlink or fifo"));
        }
        out.insert(id, (e, nlink));
    }
    r.end()?;
    Ok(out)
}

fn meta(r: &mut Reader<'_>, with_atime: bool) -> Result<Meta, FormatError> {
    let mut meta = Meta {
        mode: r.u32()?,
        uid: r.u32()?,
        gid: r.u32()?,
        mtime: r.time()?,
        ctime: r.time()?,
        atime: None,
        xattrs: BTreeMap::new(),
    };
    if with_atime {
        meta.atime = Some(r.time()?);
    }
    for _ in 0..r.u16()? {
        let k = r.bytes16()?;
        let v = r.bytes32()?;
        meta.xattrs.insert(k, v);
    }
    Ok(meta)
}

fn entry(r: &mut Reader<'_>) -> Result<Entry, FormatError> {
    {
        let flagged = r.u8()?;
        let meta = meta(r, flagged & HAS_ATIME != 0)?;
        let content = match flagged & !HAS_ATIME {
            1 => {
                let size = r.u64()?;
                Content::File {
                    manifest: r.hash()?,
                    size,
                }
            }
            2 => Content::Dir { tree: r.hash()? },
            3 => Content::Symlink { target: r.bytes32()? },
            5 => Content::Fifo,
            6 => Content::Inode { id: r.u64()? },
            7 => {
                let kind = match r.u8()? {
                    0 => DeviceKind::Char,
                    1 => DeviceKind::Block,
                    2 => DeviceKind::Socket,
                    _ => return Err(FormatError::Malformed("unknown device kind")),
                };
                Content::Device { kind, rdev: r.u64()? }
            }
            _ => return Err(FormatError::Malformed("unknown entry kind")),
        };
        Ok(Entry { meta, content })
    }
}

pub fn decode_commit(blob: &[u8]) -> Result<Commit, FormatError> {
    let mut r = payload(blob, Tag::Commit)?;
    let root = r.hash()?;
    let parent = match r.u8()? {
        0 => None,
        1 => Some(r.hash()?),
        _ => return Err(FormatError::Malformed("bad parent flag")),
    };
    let time = r.time()?;
    let writer =
        String::from_utf8(r.bytes16()?).map_err(|_| FormatError::Malformed("writer is not UTF-8"))?;
    let message =
        String::from_utf8(r.bytes32()?).map_err(|_| FormatError::Malformed("message is not UTF-8"))?;
    let (mut inodes, mut root_meta) = (None, None);
    let mut last = 0;
    while !r.buf.is_empty() {
        let tag = r.u8()?;
        if tag <= last {
            return Err(FormatError::Malformed("commit extensions out of order"));
        }
        last = tag;
        match tag {
            1 => inodes = Some(r.hash()?),
            2 => root_meta = Some(meta(&mut r, false)?),
            3 => match root_meta.as_mut() {
                Some(m) => m.atime = Some(r.time()?),
                None => {
                    return Err(FormatError::Malformed(
                        "a root access time without the root's metadata",
                    ))
                }
            },
            _ => {
                return Err(FormatError::Malformed(
                    "unknown commit extension (a newer fsclient wrote it)",
                ))
            }
        }
    }
    r.end()?;
    Ok(Commit {
        root,
        parent,
        time,
        writer,
        message,
        inodes,
        root_meta,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_dir() -> Dir {
        let mut dir = Dir::new();
        let meta = Meta {
            mode: 0o644,
            uid: 1000,
            gid: 1000,
            mtime: Time {
                secs: 1_700_000_000,
                nanos: 123_456_789,
            },
            ctime: Time {
                secs: 1_700_000_001,
                nanos: 0,
            },
            atime: None,
            xattrs: [(b"user.k".to_vec(), b"v".to_vec())].into_iter().collect(),
        };
        let empty = Hash::of(&encode_manifest(&Manifest::default()));
        dir.insert(
            b"a.txt".to_vec(),
            Entry {
                meta: meta.clone(),
                content: Content::File {
                    manifest: empty,
                    size: 0,
                },
            },
        );
        dir.insert(
            b"link".to_vec(),
            Entry {
                meta: meta.clone(),
                content: Content::Symlink {
                    target: b"a.txt".to_vec(),
                },
            },
        );
        dir.insert(
            b"sub".to_vec(),
            Entry {
                meta,
                content: Content::Dir {
                    tree: Hash::of(&encode_dir(&Dir::new())),
                },
            },
        );
        dir
    }

    #[test]
    fn round_trips() {
        let dir = sample_dir();
        assert_eq!(decode_dir(&encode_dir(&dir)).unwrap(), dir);
        let m = Manifest {
            chunks: vec![(Hash::of(b"x"), 10), (Hash::of(b"y"), 20)],
        };
        assert_eq!(decode_manifest(&encode_manifest(&m)).unwrap(), m);
        let c = Commit {
            root: Hash::of(b"r"),
            parent: Some(Hash::of(b"p")),
            time: Time { secs: 5, nanos: 6 },
            writer: "host:1".into(),
            message: "msg".into(),
            inodes: None,
            root_meta: None,
        };
        assert_eq!(decode_commit(&encode_commit(&c)).unwrap(), c);
        let c = Commit {
            inodes: Some(Hash::of(b"i")),
            ..c
        };
        assert_eq!(decode_commit(&encode_commit(&c)).unwrap(), c);
        let c = Commit {
            root_meta: Some(sample_dir().into_values().next().unwrap().meta),
            ..c
        };
        assert_eq!(decode_commit(&encode_commit(&c)).unwrap(), c);
        let c = Commit { inodes: None, ..c };
        assert_eq!(decode_commit(&encode_commit(&c)).unwrap(), c);
        let mut inodes = Inodes::new();
        let file = dir
            .values()
            .find(|e| matches!(e.content, Content::File { .. }))
            .unwrap();
        inodes.insert(7, (file.clone(), 2));
        inodes.insert(1 << 62, (file.clone(), 3));
        assert_eq!(decode_inodes(&encode_inodes(&inodes)).unwrap(), inodes);
        let mut linked = Dir::new();
        linked.insert(
            b"x".to_vec(),
            Entry {
                meta: Meta::default(),
                content: Content::Inode { id: 7 },
            },
        );
        assert_eq!(decode_dir(&encode_dir(&linked)).unwrap(), linked);
        // A directory cannot be an inode.
        let d = dir
            .values()
            .find(|e| matches!(e.content, Content::Dir { .. }))
            .unwrap();
        inodes.insert(9, (d.clone(), 1));
        assert!(decode_inodes(&encode_inodes(&inodes)).is_err());
    }

    /// Golden vectors: these bytes and keys must never change (docs/FORMAT.md).
    #[test]
    fn golden_vectors() {
        // A commit without an inode table is byte for byte what it was before
        // tables existed; with one, one flag byte and the hash follow.
        let mut c = Commit {
            root: Hash(std::array::from_fn(|i| i as u8)),
            parent: None,
            time: Time {
                secs: 1_700_000_000,
                nanos: 5,
            },
            writer: "w".into(),
            message: "m".into(),
            inodes: None,
            root_meta: None,
        };
        let v1 = "0501000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f00\
                  00f153650000000005000000010077010000006d";
        assert_eq!(hex::encode(encode_commit(&c)), v1);
        c.inodes = Some(Hash([0xaa; 32]));
        assert_eq!(
            hex::encode(encode_commit(&c)),
            format!("{v1}01{}", "aa".repeat(32))
        );
        // The root's metadata: extension 2, then mode, uid, gid, mtime, ctime
        // and the xattrs as in an entry.
        c.root_meta = Some(Meta {
            mode: 0o700,
            uid: 1000,
            gid: 100,
            mtime: Time { secs: 7, nanos: 8 },
            ctime: Time { secs: 9, nanos: 10 },
            atime: None,
            xattrs: BTreeMap::new(),
        });
        assert_eq!(
            hex::encode(encode_commit(&c)),
            format!(
                "{v1}01{}02c0010000e8030000640000000700000000000000080000000900000000000000\
                 0a0000000000",
                "aa".repeat(32)
            )
        );
        // The root's access time: extension 3, after its metadata.
        let mut with_atime = c.clone();
        with_atime.root_meta.as_mut().unwrap().atime = Some(Time { secs: 11, nanos: 12 });
        let encoded = encode_commit(&with_atime);
        assert_eq!(
            hex::encode(&encoded),
            format!(
                "{v1}01{}02c0010000e8030000640000000700000000000000080000000900000000000000\
                 0a0000000000030b000000000000000c000000",
                "aa".repeat(32)
            )
        );
        assert_eq!(decode_commit(&encoded).unwrap(), with_atime);
        // Extensions out of order, or unknown to this version, are errors.
        let mut bad = encode_commit(&Commit {
            inodes: None,
            ..c.clone()
        })
        .to_vec();
        bad.extend_from_slice(&[1; 33]);
        assert!(decode_commit(&bad).is_err());
        let mut unknown = encode_commit(&Commit {
            inodes: None,
            root_meta: None,
            ..c.clone()
        })
        .to_vec();
        unknown.push(9);
        assert!(decode_commit(&unknown).is_err());
        let mut inodes = Inodes::new();
        let fifo = Entry {
            meta: Meta {
                mode: 0o644,
                uid: 1,
                gid: 2,
                mtime: Time { secs: 3, nanos: 4 },
                ctime: Time { secs: 5, nanos: 6 },
                atime: None,
                xattrs: BTreeMap::new(),
            },
            content: Content::Fifo,
        };
        inodes.insert(7, (fifo, 2));
        assert_eq!(
            hex::encode(encode_inodes(&inodes)),
            "06010100000007000000000000000200000005a4010000010000000200000003000000000000000400\
             00000500000000000000060000000000"
        );
        // A character device (entry kind 7: device kind u8, rdev u64), as the
        // only entry of a directory.
        let mut dev_dir = Dir::new();
        dev_dir.insert(
            b"tty".to_vec(),
            Entry {
                meta: Meta::default(),
                content: Content::Device {
                    kind: DeviceKind::Char,
                    rdev: 0x0504,
                },
            },
        );
        let dev = encode_dir(&dev_dir);
        assert_eq!(decode_dir(&dev).unwrap(), dev_dir);
        assert_eq!(
            hex::encode(&dev),
            // tag 3, version 1, one entry; name "tty"; kind 7; mode, uid, gid,
            // mtime, ctime and no xattrs, all zero; char (0); rdev 0x0504.
            "0301010000000300747479070000000000000000000000000000000000000000000000000000000000000000000000000000000405000000000000"
        );
        // An access time: the kind byte's high bit (0x87 for a device), the
        // atime after the ctime. Entries without one are encoded as before.
        dev_dir.get_mut(b"tty".as_slice()).unwrap().meta.atime = Some(Time { secs: 1, nanos: 2 });
        let dev = encode_dir(&dev_dir);
        assert_eq!(decode_dir(&dev).unwrap(), dev_dir);
        assert_eq!(
            hex::encode(&dev),
            // tag 3, version 1, one entry "tty"; kind 0x87; mode, uid, gid,
            // mtime, ctime (36 zero bytes); atime 1 s 2 ns; no xattrs; char;
            // rdev 0x0504.
            format!(
                "030101000000030074747987{}0100000000000000020000000000000405000000000000",
                "00".repeat(36)
            )
        );
        let chunk = encode_chunk(b"hello");
        assert_eq!(hex::encode(&chunk), "010168656c6c6f");
        assert_eq!(
            Hash::of(&chunk).hex(),
            "8cb0d11b45aa844e92436fe452d29b1ca33cc8a42a99110108d2f5e98e775b6f"
        );
        let empty_manifest = encode_manifest(&Manifest::default());
        assert_eq!(hex::encode(&empty_manifest), "0201000000000000000000000000");
        let empty_dir = encode_dir(&Dir::new());
        assert_eq!(hex::encode(&empty_dir), "030100000000");
        assert_eq!(
            Hash::of(&encode_dir(&sample_dir())).hex(),
            "13dcbdd1e8b21843f83c8b7c6b7807bbeed905730ce78fc300e55681ea8547e1"
        );
    }

    proptest::proptest! {
        #[test]
        fn decoders_never_panic(data in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let _ = decode_dir(&data);
            let _ = decode_manifest(&data);
            let _ = decode_inodes(&data);
            let _ = decode_commit(&data);
            let _ = decode_dir_index(&data);
            let _ = decode_chunk(&Bytes::from(data));
        }
    }
}

//! dictfs's file system client: a whole file system as an immutable Merkle tree
//! in a key-value store, changed by one atomic root swap.
//!
//! Data flows one way: the command line ([`cli`], the grammar; [`ops`], the
//! operations) -> [`volume`]
//! (commits, conflicts) -> [`tree`] (path operations on immutable trees) and
//! [`merge`] -> [`store`] (blobs, cache; [`lease`], the writer's half of
//! garbage collection) -> [`codec`] (a blob's stored bytes: verification,
//! encryption) -> [`dict`] (the store). [`gc`] collects over the same store.
//! [`object`] defines the bytes; docs/FORMAT.md specifies them. A mount is
//! [`mount`] (FUSE types, translation only) -> [`vfs`] (inodes, handles, the
//! dirty overlay, commits) -> the same layers.

pub mod cli;
pub mod codec;
pub mod daemon;
pub mod dict;
pub mod fstab;
pub mod gc;
pub mod history;
pub mod lease;
pub mod links;
pub mod merge;
pub mod metrics;
pub mod mount;
pub mod object;
pub mod ops;
pub mod status;
pub mod store;
pub mod tree;
pub mod vfs;
pub mod volume;
pub mod volume_key;
pub mod write_behind;

#[cfg(test)]
mod tests;

//! kvd: a keystore server that speaks the Redis protocol.
//!
//! Data flows one way through the modules:
//! socket -> [`protocol`] (framing) -> [`command`] (typed parse, Redis's checks and
//! errors) -> [`db`] (key semantics: expiry, WATCH, the transaction gate) ->
//! [`store`] (the engine). [`reply`] encodes the answer for the connection's
//! protocol version; [`server`] owns connections and sessions.

pub mod clients;
pub mod cluster;
pub mod command;
pub mod config;
pub mod databases;
pub mod db;
pub mod durable;
pub mod failpoint;
pub mod glob;
pub mod latency;
pub mod metrics;
pub mod monitor;
pub mod notify;
pub mod protocol;
pub mod pubsub;
pub mod replica;
pub mod reply;
pub mod server;
pub mod session;
pub mod shared;
pub mod stats;
pub mod store;
pub mod sync;
pub mod tls;

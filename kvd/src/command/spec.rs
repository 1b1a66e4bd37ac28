//! The command table: for every command kvd implements, what Redis's command
//! table says of it (arity, flags, key positions, ACL categories, docs).
//!
//! It drives the arity check before a command runs, `COMMAND INFO / DOCS / COUNT /
//! LIST / GETKEYS`, and so the key positions that cluster clients (redis-py) read
//! from `COMMAND`. Argument docs are written in Redis's own syntax summary form
//! (`key value [NX | XX]`); `COMMAND DOCS` turns them into the structured
//! argument list redis-cli uses for its hints.

use std::collections::HashMap;
use std::sync::OnceLock;

/// One row of the table.
#[derive(Debug)]
pub struct Spec {
    /// Lowercase; `container|sub` for subcommands.
    pub name: &'static str,
    /// Redis arity: positive is exact, negative is a minimum, both count the name.
    pub arity: i32,
    pub flags: &'static [&'static str],
    pub first_key: i32,
    pub last_key: i32,
    pub step: i32,
    pub group: &'static str,
    pub since: &'static str,
    pub summary: &'static str,
    pub complexity: &'static str,
    /// Arguments after the name (after the subcommand for subcommands).
    pub args: &'static str,
    pub subcommands: &'static [Spec],
}

impl Spec {
    pub fn arity_ok(&self, argc: usize) -> bool {
        let a = self.arity;
        (a > 0 && argc as i32 == a) || (a < 0 && argc as i32 >= -a)
    }

    /// `client|kill` -> `client kill` for messages that print the full name.
    pub fn display_name(&self) -> String {
        self.name.replace('|', " ")
    }

    /// ACL categories as Redis derives them: the group's own, plus flag-derived ones.
    pub fn acl_categories(&self) -> Vec<&'static str> {
        let mut cats = Vec::new();
        let has = |f: &str| self.flags.contains(&f);
        if has("write") {
            cats.push("@write");
        }
        if has("readonly") && self.group != "scripting" {
            cats.push("@read");
        }
        match self.group {
            "string" => cats.push("@string"),
            "generic" => cats.push("@keyspace"),
            "pubsub" => cats.push("@pubsub"),
            "transactions" => cats.push("@transaction"),
            "connection" => cats.push("@connection"),
            _ => {}
        }
        if has("admin") {
            cats.push("@admin");
            cats.push("@dangerous");
        }
        if has("fast") {
            cats.push("@fast");
        } else if !has("pubsub_slow_free") {
            cats.push("@slow");
        }
        cats
    }

    /// Positions of the key arguments in `args` (name at 0), from first/last/step.
    pub fn key_positions(&self, argc: usize) -> Vec<usize> {
        self.keys(argc).collect()
    }

    /// The same positions without allocating (the cluster's per-request path).
    pub fn keys(&self, argc: usize) -> impl Iterator<Item = usize> {
        let last = if self.last_key < 0 {
            argc as i32 + self.last_key
        } else {
            self.last_key
        };
        let (first, step) = (self.first_key, self.step.max(1) as usize);
        let end = if first <= 0 {
            0
        } else {
            (last + 1).clamp(0, argc as i32) as usize
        };
        (first.max(1) as usize..end).step_by(step)
    }
}

macro_rules! spec {
    ($name:literal, $arity:expr, [$($flag:literal),*], $fk:expr, $lk:expr, $step:expr, $group:literal, $since:literal,
     $summary:literal, $complexity:literal, $args:literal) => {
        Spec {
            name: $name,
            arity: $arity,
            flags: &[$($flag),*],
            first_key: $fk,
            last_key: $lk,
            step: $step,
            group: $group,
            since: $since,
            summary: $summary,
            complexity: $complexity,
            args: $args,
            subcommands: &[],
        }
    };
}

macro_rules! container {
    ($name:literal, $group:literal, $since:literal, $summary:literal, $subs:expr) => {
        Spec {
            name: $name,
            arity: -2,
            flags: &[],
            first_key: 0,
            last_key: 0,
            step: 0,
            group: $group,
            since: $since,
            summary: $summary,
            complexity: "Depends on subcommand.",
            args: "",
            subcommands: $subs,
        }
    };
}

/// Every command kvd answers.
pub static COMMANDS: &[Spec] = &[
    // ---- strings ----
    spec!("get", 2, ["readonly", "fast"], 1, 1, 1, "string", "1.0.0", "Returns the string value of a key.", "O(1)", "key"),
    spec!("set", -3, ["write", "denyoom"], 1, 1, 1, "string", "1.0.0",
        "Sets the string value of a key, ignoring its type. The key is created if it doesn't exist.", "O(1)",
        "key value [NX | XX] [GET] [EX seconds | PX milliseconds | EXAT unix-time-seconds | PXAT unix-time-milliseconds | KEEPTTL]"),
    spec!("setnx", 3, ["write", "denyoom", "fast"], 1, 1, 1, "string", "1.0.0", "Set the string value of a key only when the key doesn't exist.", "O(1)", "key value"),
    spec!("setex", 4, ["write", "denyoom"], 1, 1, 1, "string", "2.0.0", "Sets the string value and expiration time of a key. Creates the key if it doesn't exist.", "O(1)", "key seconds value"),
    spec!("psetex", 4, ["write", "denyoom"], 1, 1, 1, "string", "2.6.0", "Sets both string value and expiration time in milliseconds of a key. The key is created if it doesn't exist.", "O(1)", "key milliseconds value"),
    spec!("getset", 3, ["write", "denyoom", "fast"], 1, 1, 1, "string", "1.0.0", "Returns the previous string value of a key after setting it to a new value.", "O(1)", "key value"),
    spec!("getdel", 2, ["write", "fast"], 1, 1, 1, "string", "6.2.0", "Returns the string value of a key after deleting the key.", "O(1)", "key"),
    spec!("getex", -2, ["write", "fast"], 1, 1, 1, "string", "6.2.0", "Returns the string value of a key after setting its expiration time.", "O(1)",
        "key [EX seconds | PX milliseconds | EXAT unix-time-seconds | PXAT unix-time-milliseconds | PERSIST]"),
    spec!("mget", -2, ["readonly", "fast"], 1, -1, 1, "string", "1.0.0", "Atomically returns the string values of one or more keys.", "O(N) where N is the number of keys to retrieve.", "key [key ...]"),
    spec!("mset", -3, ["write", "denyoom"], 1, -1, 2, "string", "1.0.1", "Atomically creates or modifies the string values of one or more keys.", "O(N) where N is the number of keys to set.", "key value [key value ...]"),
    spec!("msetnx", -3, ["write", "denyoom"], 1, -1, 2, "string", "1.0.1", "Atomically modifies the string values of one or more keys only when all keys don't exist.", "O(N) where N is the number of keys to set.", "key value [key value ...]"),
    spec!("strlen", 2, ["readonly", "fast"], 1, 1, 1, "string", "2.2.0", "Returns the length of a string value.", "O(1)", "key"),
    spec!("getrange", 4, ["readonly"], 1, 1, 1, "string", "2.4.0", "Returns a substring of the string stored at a key.", "O(N) where N is the length of the returned string.", "key start end"),
    spec!("setrange", 4, ["write", "denyoom"], 1, 1, 1, "string", "2.2.0", "Overwrites a part of a string value with another by an offset. Creates the key if it doesn't exist.", "O(1), not counting the time taken to copy the new string in place.", "key offset value"),
    spec!("append", 3, ["write", "denyoom", "fast"], 1, 1, 1, "string", "2.0.0", "Appends a string to the value of a key. Creates the key if it doesn't exist.", "O(1).", "key value"),
    spec!("incr", 2, ["write", "denyoom", "fast"], 1, 1, 1, "string", "1.0.0", "Increments the integer value of a key by one. Uses 0 as initial value if the key doesn't exist.", "O(1)", "key"),
    spec!("decr", 2, ["write", "denyoom", "fast"], 1, 1, 1, "string", "1.0.0", "Decrements the integer value of a key by one. Uses 0 as initial value if the key doesn't exist.", "O(1)", "key"),
    spec!("incrby", 3, ["write", "denyoom", "fast"], 1, 1, 1, "string", "1.0.0", "Increments the integer value of a key by a number. Uses 0 as initial value if the key doesn't exist.", "O(1)", "key increment"),
    spec!("decrby", 3, ["write", "denyoom", "fast"], 1, 1, 1, "string", "1.0.0", "Decrements a number from the integer value of a key. Uses 0 as initial value if the key doesn't exist.", "O(1)", "key decrement"),
    spec!("incrbyfloat", 3, ["write", "denyoom", "fast"], 1, 1, 1, "string", "2.6.0", "Increment the floating point value of a key by a number. Uses 0 as initial value if the key doesn't exist.", "O(1)", "key increment"),
    // ---- keyspace ----
    spec!("del", -2, ["write"], 1, -1, 1, "generic", "1.0.0", "Deletes one or more keys.", "O(N) where N is the number of keys that will be removed.", "key [key ...]"),
    spec!("unlink", -2, ["write", "fast"], 1, -1, 1, "generic", "4.0.0", "Asynchronously deletes one or more keys.", "O(1) for each key removed regardless of its size.", "key [key ...]"),
    spec!("exists", -2, ["readonly", "fast"], 1, -1, 1, "generic", "1.0.0", "Determines whether one or more keys exist.", "O(N) where N is the number of keys to check.", "key [key ...]"),
    spec!("touch", -2, ["readonly", "fast"], 1, -1, 1, "generic", "3.2.1", "Returns the number of existing keys out of those specified after updating the time they were last accessed.", "O(N) where N is the number of keys that will be touched.", "key [key ...]"),
    spec!("type", 2, ["readonly", "fast"], 1, 1, 1, "generic", "1.0.0", "Determines the type of value stored at a key.", "O(1)", "key"),
    spec!("move", 3, ["write", "fast"], 1, 1, 1, "generic", "1.0.0", "Moves a key to another database.", "O(1)", "key db"),
    spec!("rename", 3, ["write"], 1, 2, 1, "generic", "1.0.0", "Renames a key and overwrites the destination.", "O(1)", "key newkey"),
    spec!("renamenx", 3, ["write", "fast"], 1, 2, 1, "generic", "1.0.0", "Renames a key only when the target key name doesn't exist.", "O(1)", "key newkey"),
    spec!("copy", -3, ["write", "denyoom"], 1, 2, 1, "generic", "6.2.0", "Copies the value of a key to a new key.", "O(N) worst case for collections, where N is the number of nested items. O(1) for string values.", "source destination [DB destination-db] [REPLACE]"),
    spec!("ttl", 2, ["readonly", "fast"], 1, 1, 1, "generic", "1.0.0", "Returns the expiration time in seconds of a key.", "O(1)", "key"),
    spec!("pttl", 2, ["readonly", "fast"], 1, 1, 1, "generic", "2.6.0", "Returns the expiration time in milliseconds of a key.", "O(1)", "key"),
    spec!("expiretime", 2, ["readonly", "fast"], 1, 1, 1, "generic", "7.0.0", "Returns the expiration time of a key as a Unix timestamp.", "O(1)", "key"),
    spec!("pexpiretime", 2, ["readonly", "fast"], 1, 1, 1, "generic", "7.0.0", "Returns the expiration time of a key as a Unix milliseconds timestamp.", "O(1)", "key"),
    spec!("expire", -3, ["write", "fast"], 1, 1, 1, "generic", "1.0.0", "Sets the expiration time of a key in seconds.", "O(1)", "key seconds [NX | XX | GT | LT]"),
    spec!("pexpire", -3, ["write", "fast"], 1, 1, 1, "generic", "2.6.0", "Sets the expiration time of a key in milliseconds.", "O(1)", "key milliseconds [NX | XX | GT | LT]"),
    spec!("expireat", -3, ["write", "fast"], 1, 1, 1, "generic", "1.2.0", "Sets the expiration time of a key to a Unix timestamp.", "O(1)", "key unix-time-seconds [NX | XX | GT | LT]"),
    spec!("pexpireat", -3, ["write", "fast"], 1, 1, 1, "generic", "2.6.0", "Sets the expiration time of a key to a Unix milliseconds timestamp.", "O(1)", "key unix-time-milliseconds [NX | XX | GT | LT]"),
    spec!("persist", 2, ["write", "fast"], 1, 1, 1, "generic", "2.2.0", "Removes the expiration time of a key.", "O(1)", "key"),
    spec!("keys", 2, ["readonly"], 0, 0, 0, "generic", "1.0.0", "Returns all key names that match a pattern.", "O(N) with N being the number of keys in the database, under the assumption that the key names in the database and the given pattern have limited length.", "pattern"),
    spec!("scan", -2, ["readonly"], 0, 0, 0, "generic", "2.8.0", "Iterates over the key names in the database.", "O(1) for every call. O(N) for a complete iteration, including enough command calls for the cursor to return back to 0. N is the number of elements inside the collection.", "cursor [MATCH pattern] [COUNT count] [TYPE type]"),
    spec!("randomkey", 1, ["readonly"], 0, 0, 0, "generic", "1.0.0", "Returns a random key name from the database.", "O(1)", ""),
    spec!("monitor", 1, ["admin", "noscript", "loading", "stale"], 0, 0, 0, "server", "1.0.0", "Listens for all requests received by the server in real-time.", "", ""),
    container!("memory", "server", "4.0.0", "A container for memory diagnostics commands.", &[
        spec!("memory|usage", -3, ["readonly"], 2, 2, 1, "server", "4.0.0", "Estimates the memory usage of a key.", "O(N) where N is the number of samples.", "key [SAMPLES count]"),
        spec!("memory|help", 2, ["loading", "stale"], 0, 0, 0, "server", "4.0.0", "Returns helpful text about the different subcommands.", "O(1)", ""),
    ]),
    spec!("dbsize", 1, ["readonly", "fast"], 0, 0, 0, "server", "1.0.0", "Returns the number of keys in the database.", "O(1)", ""),
    spec!("swapdb", 3, ["write", "fast"], 0, 0, 0, "server", "4.0.0", "Swaps two Redis databases.", "O(N) where N is the count of clients watching or blocking on keys from both databases.", "index1 index2"),
    spec!("flushdb", -1, ["write"], 0, 0, 0, "server", "1.0.0", "Remove all keys from the current database.", "O(N) where N is the number of keys in the selected database", "[ASYNC | SYNC]"),
    spec!("flushall", -1, ["write"], 0, 0, 0, "server", "1.0.0", "Removes all keys from all databases.", "O(N) where N is the total number of keys in all databases", "[ASYNC | SYNC]"),
    // ---- transactions ----
    spec!("multi", 1, ["noscript", "loading", "stale", "fast", "allow_busy"], 0, 0, 0, "transactions", "1.2.0", "Starts a transaction.", "O(1)", ""),
    spec!("exec", 1, ["noscript", "loading", "stale", "skip_slowlog"], 0, 0, 0, "transactions", "1.2.0", "Executes all commands in a transaction.", "Depends on commands in the transaction", ""),
    spec!("discard", 1, ["noscript", "loading", "stale", "fast", "allow_busy"], 0, 0, 0, "transactions", "2.0.0", "Discards a transaction.", "O(N), when N is the number of queued commands", ""),
    spec!("watch", -2, ["noscript", "loading", "stale", "fast", "allow_busy"], 1, -1, 1, "transactions", "2.2.0", "Monitors changes to keys to determine the execution of a transaction.", "O(1) for every key.", "key [key ...]"),
    spec!("unwatch", 1, ["noscript", "loading", "stale", "fast", "allow_busy"], 0, 0, 0, "transactions", "2.2.0", "Forgets about watched keys of a transaction.", "O(1)", ""),
    // ---- connection ----
    spec!("ping", -1, ["fast", "sentinel"], 0, 0, 0, "connection", "1.0.0", "Returns the server's liveliness response.", "O(1)", "[message]"),
    spec!("echo", 2, ["fast"], 0, 0, 0, "connection", "1.0.0", "Returns the given string.", "O(1)", "message"),
    spec!("auth", -2, ["noscript", "loading", "stale", "fast", "no_auth", "sentinel", "allow_busy"], 0, 0, 0, "connection", "1.0.0", "Authenticates the connection.", "O(N) where N is the number of passwords defined for the user", "[username] password"),
    spec!("hello", -1, ["noscript", "loading", "stale", "fast", "no_auth", "sentinel", "allow_busy"], 0, 0, 0, "connection", "6.0.0", "Handshakes with the Redis server.", "O(1)", "[protover [AUTH username password] [SETNAME clientname]]"),
    spec!("select", 2, ["loading", "stale", "fast"], 0, 0, 0, "connection", "1.0.0", "Changes the selected database.", "O(1)", "index"),
    spec!("quit", -1, ["noscript", "loading", "stale", "fast", "no_auth", "allow_busy"], 0, 0, 0, "connection", "1.0.0", "Closes the connection.", "O(1)", ""),
    spec!("reset", 1, ["noscript", "loading", "stale", "fast", "no_auth", "allow_busy"], 0, 0, 0, "connection", "6.2.0", "Resets the connection.", "O(1)", ""),
    container!("client", "connection", "2.4.0", "A container for client connection commands.", &[
        spec!("client|id", 2, ["noscript", "loading", "stale"], 0, 0, 0, "connection", "5.0.0", "Returns the unique client ID of the connection.", "O(1)", ""),
        spec!("client|setname", 3, ["noscript", "loading", "stale"], 0, 0, 0, "connection", "2.6.9", "Sets the connection name.", "O(1)", "connection-name"),
        spec!("client|getname", 2, ["noscript", "loading", "stale"], 0, 0, 0, "connection", "2.6.9", "Returns the name of the connection.", "O(1)", ""),
        spec!("client|list", -2, ["admin", "noscript", "loading", "stale"], 0, 0, 0, "connection", "2.4.0", "Lists open connections.", "O(N) where N is the number of client connections", "[TYPE NORMAL | MASTER | REPLICA | PUBSUB] [ID client-id [client-id ...]]"),
        spec!("client|info", 2, ["noscript", "loading", "stale"], 0, 0, 0, "connection", "6.2.0", "Returns information about the connection.", "O(1)", ""),
        spec!("client|setinfo", 4, ["noscript", "loading", "stale"], 0, 0, 0, "connection", "7.2.0", "Sets information specific to the client or connection.", "O(1)", "LIB-NAME libname | LIB-VER libver"),
        spec!("client|kill", -3, ["admin", "noscript", "loading", "stale"], 0, 0, 0, "connection", "2.4.0", "Terminates open connections.", "O(N) where N is the number of client connections", "ip:port | [ID client-id] [TYPE NORMAL | MASTER | REPLICA | PUBSUB] [USER username] [ADDR ip:port] [LADDR ip:port] [SKIPME yes | no]"),
        spec!("client|reply", 3, ["noscript", "loading", "stale"], 0, 0, 0, "connection", "3.2.0", "Instructs the server whether to reply to commands.", "O(1)", "ON | OFF | SKIP"),
        spec!("client|help", 2, ["loading", "stale"], 0, 0, 0, "connection", "5.0.0", "Returns helpful text about the different subcommands.", "O(1)", ""),
    ]),
    // ---- cluster ----
    container!("cluster", "cluster", "3.0.0", "A container for Redis Cluster commands.", &[
        spec!("cluster|info", 2, ["loading", "stale"], 0, 0, 0, "cluster", "3.0.0", "Returns information about the state of a node.", "O(1)", ""),
        spec!("cluster|myid", 2, ["loading", "stale"], 0, 0, 0, "cluster", "3.0.0", "Returns the ID of a node.", "O(1)", ""),
        spec!("cluster|nodes", 2, ["loading", "stale"], 0, 0, 0, "cluster", "3.0.0", "Returns the cluster configuration for a node.", "O(N) where N is the total number of Cluster nodes", ""),
        spec!("cluster|slots", 2, ["loading", "stale"], 0, 0, 0, "cluster", "3.0.0", "Returns the mapping of cluster slots to nodes.", "O(N) where N is the total number of Cluster nodes", ""),
        spec!("cluster|shards", 2, ["loading", "stale"], 0, 0, 0, "cluster", "7.0.0", "Returns the mapping of cluster slots to shards.", "O(N) where N is the total number of cluster nodes", ""),
        spec!("cluster|keyslot", 3, ["stale"], 0, 0, 0, "cluster", "3.0.0", "Returns the hash slot for a key.", "O(N) where N is the number of bytes in the key", "key"),
        spec!("cluster|countkeysinslot", 3, ["stale"], 0, 0, 0, "cluster", "3.0.0", "Returns the number of keys in a hash slot.", "O(N) where N is the number of keys on this node (kvd keeps no per-slot index)", "slot"),
        spec!("cluster|getkeysinslot", 4, ["stale"], 0, 0, 0, "cluster", "3.0.0", "Returns the key names in a hash slot.", "O(N) where N is the number of keys on this node (kvd keeps no per-slot index)", "slot count"),
        spec!("cluster|forget", 3, ["admin", "stale"], 0, 0, 0, "cluster", "3.0.0", "kvd (replicated): takes the node at HOST:PORT out of the cluster at once, re-homing its replicas.", "O(N) where N is the number of keys to copy", "node"),
        spec!("cluster|leave", 2, ["admin", "stale"], 0, 0, 0, "cluster", "7.0.0", "kvd: hands this node's slots to the other nodes, then leaves the cluster.", "O(1); the hand-off runs in the background", ""),
        spec!("cluster|help", 2, ["loading", "stale"], 0, 0, 0, "cluster", "5.0.0", "Returns helpful text about the different subcommands.", "O(1)", ""),
    ]),
    spec!("readonly", 1, ["loading", "stale", "fast"], 0, 0, 0, "cluster", "3.0.0", "Enables read-only queries for a connection to a Redis Cluster replica node.", "O(1)", ""),
    spec!("readwrite", 1, ["loading", "stale", "fast"], 0, 0, 0, "cluster", "3.0.0", "Enables read-write queries for a connection to a Reids Cluster replica node.", "O(1)", ""),
    spec!("asking", 1, ["fast"], 0, 0, 0, "cluster", "3.0.0", "Signals that a cluster client is following an -ASK redirect.", "O(1)", ""),
    // ---- pub/sub ----
    spec!("publish", 3, ["pubsub", "loading", "stale", "fast"], 0, 0, 0, "pubsub", "2.0.0", "Posts a message to a channel.", "O(N+M) where N is the number of clients subscribed to the receiving channel and M is the total number of subscribed patterns (by any client).", "channel message"),
    spec!("subscribe", -2, ["pubsub", "noscript", "loading", "stale"], 0, 0, 0, "pubsub", "2.0.0", "Listens for messages published to channels.", "O(N) where N is the number of channels to subscribe to.", "channel [channel ...]"),
    spec!("unsubscribe", -1, ["pubsub", "noscript", "loading", "stale"], 0, 0, 0, "pubsub", "2.0.0", "Stops listening to messages posted to channels.", "O(N) where N is the number of channels to unsubscribe.", "[channel [channel ...]]"),
    spec!("psubscribe", -2, ["pubsub", "noscript", "loading", "stale"], 0, 0, 0, "pubsub", "2.0.0", "Listens for messages published to channels that match one or more patterns.", "O(N) where N is the number of patterns to subscribe to.", "pattern [pattern ...]"),
    spec!("punsubscribe", -1, ["pubsub", "noscript", "loading", "stale"], 0, 0, 0, "pubsub", "2.0.0", "Stops listening to messages published to channels that match one or more patterns.", "O(N) where N is the number of patterns to unsubscribe.", "[pattern [pattern ...]]"),
    container!("pubsub", "pubsub", "2.8.0", "A container for Pub/Sub commands.", &[
        spec!("pubsub|channels", -2, ["pubsub", "loading", "stale"], 0, 0, 0, "pubsub", "2.8.0", "Returns the active channels.", "O(N) where N is the number of active channels, and assuming constant time pattern matching (relatively short channels and patterns)", "[pattern]"),
        spec!("pubsub|numsub", -2, ["pubsub", "loading", "stale"], 0, 0, 0, "pubsub", "2.8.0", "Returns a count of subscribers to channels.", "O(N) for the NUMSUB subcommand, where N is the number of requested channels", "[channel [channel ...]]"),
        spec!("pubsub|numpat", 2, ["pubsub", "loading", "stale"], 0, 0, 0, "pubsub", "2.8.0", "Returns a count of unique pattern subscriptions.", "O(1)", ""),
    ]),
    // ---- server ----
    spec!("info", -1, ["loading", "stale", "sentinel"], 0, 0, 0, "server", "1.0.0", "Returns information and statistics about the server.", "O(1)", "[section [section ...]]"),
    spec!("bgrewriteaof", 1, ["admin", "noscript", "no_async_loading"], 0, 0, 0, "server", "1.0.0", "Asynchronously rewrites the append-only file to disk.", "O(1)", ""),
    spec!("time", 1, ["loading", "stale", "fast"], 0, 0, 0, "server", "2.6.0", "Returns the server time.", "O(1)", ""),
    spec!("shutdown", -1, ["admin", "noscript", "loading", "stale", "no_multi", "sentinel", "allow_busy"], 0, 0, 0, "server", "1.0.0", "Synchronously saves the database(s) to disk and shuts down the Redis server.", "O(N) when saving, where N is the total number of keys in all databases when saving data, otherwise O(1)", "[NOSAVE | SAVE] [NOW] [FORCE] [ABORT]"),
    container!("config", "server", "2.0.0", "A container for server configuration commands.", &[
        spec!("config|get", -3, ["admin", "noscript", "loading", "stale"], 0, 0, 0, "server", "2.0.0", "Returns the effective values of configuration parameters.", "O(N) when N is the number of configuration parameters provided", "parameter [parameter ...]"),
        spec!("config|set", -4, ["admin", "noscript", "loading", "stale"], 0, 0, 0, "server", "2.0.0", "Sets configuration parameters in-flight.", "O(N) when N is the number of configuration parameters provided", "parameter value [parameter value ...]"),
        spec!("config|resetstat", 2, ["admin", "noscript", "loading", "stale"], 0, 0, 0, "server", "2.0.0", "Resets the server's statistics.", "O(1)", ""),
        spec!("config|help", 2, ["loading", "stale"], 0, 0, 0, "server", "5.0.0", "Returns helpful text about the different subcommands.", "O(1)", ""),
    ]),
    Spec {
        name: "command",
        arity: -1,
        flags: &["loading", "stale"],
        first_key: 0,
        last_key: 0,
        step: 0,
        group: "server",
        since: "2.8.13",
        summary: "Returns detailed information about all commands.",
        complexity: "O(N) where N is the total number of Redis commands",
        args: "",
        subcommands: &[
            spec!("command|count", 2, ["loading", "stale"], 0, 0, 0, "server", "2.8.13", "Returns a count of commands.", "O(1)", ""),
            spec!("command|docs", -2, ["loading", "stale"], 0, 0, 0, "server", "7.0.0", "Returns documentary information about one, multiple or all commands.", "O(N) where N is the number of commands to look up", "[command-name [command-name ...]]"),
            spec!("command|info", -2, ["loading", "stale"], 0, 0, 0, "server", "2.8.13", "Returns information about one, multiple or all commands.", "O(N) where N is the number of commands to look up", "[command-name [command-name ...]]"),
            spec!("command|list", -2, ["loading", "stale"], 0, 0, 0, "server", "7.0.0", "Returns a list of command names.", "O(N) where N is the total number of Redis commands", "[FILTERBY MODULE module-name | ACLCAT category | PATTERN pattern]"),
            spec!("command|getkeys", -4, ["loading", "stale"], 0, 0, 0, "server", "2.8.13", "Extracts the key names from an arbitrary command.", "O(N) where N is the number of arguments to the command", "command [arg [arg ...]]"),
            spec!("command|help", 2, ["loading", "stale"], 0, 0, 0, "server", "5.0.0", "Returns helpful text about the different subcommands.", "O(1)", ""),
        ],
    },
];

type Index = HashMap<&'static [u8], &'static Spec, foldhash::fast::FixedState>;

fn index() -> &'static Index {
    static INDEX: OnceLock<Index> = OnceLock::new();
    INDEX.get_or_init(|| {
        let mut map = Index::default();
        for spec in COMMANDS {
            map.insert(spec.name.as_bytes(), spec);
            for sub in spec.subcommands {
                map.insert(sub.name.as_bytes(), sub);
            }
        }
        map
    })
}

/// Finds a command (or `container|sub`) by lowercase name.
/// Every command's and subcommand's name (`container|sub` for subcommands):
/// the rows of per-command tables (INFO commandstats, latencystats).
pub fn all_names() -> impl Iterator<Item = &'static str> {
    COMMANDS
        .iter()
        .flat_map(|c| std::iter::once(c.name).chain(c.subcommands.iter().map(|s| s.name)))
}

pub fn find(name: &str) -> Option<&'static Spec> {
    index().get(name.as_bytes()).copied()
}

/// What looking up a request's command found.
pub enum Lookup {
    Found(&'static Spec),
    UnknownCommand,
    /// A container command with an unknown subcommand.
    UnknownSubcommand(&'static Spec),
}

impl Lookup {
    /// The spec, if the command is known.
    pub fn found(self) -> Option<&'static Spec> {
        match self {
            Lookup::Found(s) => Some(s),
            _ => None,
        }
    }
}

/// Resolves `args[0]` (and `args[1]` for container commands) to a spec.
pub fn lookup(args: &[bytes::Bytes]) -> Lookup {
    // Lowercased on the stack: this runs for every request.
    let mut buf = [0u8; 32];
    let name = &args[0];
    if name.len() > buf.len() {
        return Lookup::UnknownCommand;
    }
    buf[..name.len()].copy_from_slice(name);
    buf[..name.len()].make_ascii_lowercase();
    let Some(spec) = index().get(&buf[..name.len()]).copied() else {
        return Lookup::UnknownCommand;
    };
    if spec.subcommands.is_empty() || args.len() < 2 {
        return Lookup::Found(spec);
    }
    let sub = &args[1];
    match spec.subcommands.iter().find(|s| {
        s.name
            .split('|')
            .nth(1)
            .is_some_and(|n| n.as_bytes().eq_ignore_ascii_case(sub))
    }) {
        Some(s) => Lookup::Found(s),
        None => Lookup::UnknownSubcommand(spec),
    }
}

/// One argument of a command's syntax, parsed from the `args` summary for
/// COMMAND DOCS.
#[derive(Debug, Clone, PartialEq)]
pub struct ArgDoc {
    pub name: String,
    /// `key`, `string`, `integer`, `pure-token`, `oneof`, `block`.
    pub kind: &'static str,
    pub token: Option<String>,
    pub optional: bool,
    pub multiple: bool,
    pub children: Vec<ArgDoc>,
}

/// Parses a syntax summary like `key value [NX | XX] [EX seconds | KEEPTTL]` into
/// the argument tree Redis's COMMAND DOCS returns.
pub fn parse_arg_docs(text: &str) -> Vec<ArgDoc> {
    let tokens = tokenize(text);
    let mut pos = 0;
    parse_seq(&tokens, &mut pos)
}

fn tokenize(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for c in text.chars() {
        match c {
            '[' | ']' | '|' => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
                out.push(c.to_string());
            }
            ' ' => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            _ => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Parses alternatives separated by `|` until `]` or the end.
fn parse_seq(tokens: &[String], pos: &mut usize) -> Vec<ArgDoc> {
    let mut alternatives: Vec<Vec<ArgDoc>> = vec![Vec::new()];
    while *pos < tokens.len() {
        let t = tokens[*pos].as_str();
        match t {
            "]" => break,
            "|" => {
                *pos += 1;
                alternatives.push(Vec::new());
            }
            "[" => {
                *pos += 1;
                let inner = parse_seq(tokens, pos);
                *pos += 1; // the closing ']'
                let cur = alternatives.last_mut().expect("at least one alternative");
                // `[key ...]` after `key` marks the previous argument as multiple.
                if inner.len() == 1 && inner[0].multiple {
                    if let Some(prev) = cur.last_mut().filter(|p| p.name == inner[0].name) {
                        prev.multiple = true;
                        continue;
                    }
                }
                let mut arg = group(inner);
                arg.optional = true;
                cur.push(arg);
            }
            "..." => {
                if let Some(prev) = alternatives.last_mut().and_then(|c| c.last_mut()) {
                    prev.multiple = true;
                }
                *pos += 1;
            }
            _ => {
                *pos += 1;
                alternatives
                    .last_mut()
                    .expect("at least one alternative")
                    .push(word(t));
            }
        }
    }
    if alternatives.len() == 1 {
        return alternatives.pop().unwrap_or_default();
    }
    let children: Vec<ArgDoc> = alternatives.into_iter().map(group).collect();
    vec![ArgDoc {
        name: children
            .iter()
            .map(|c| c.name.clone())
            .collect::<Vec<_>>()
            .join("-"),
        kind: "oneof",
        token: None,
        optional: false,
        multiple: false,
        children,
    }]
}

/// Folds a sequence into one argument: a token followed by its value becomes a
/// token-carrying argument, several become a block.
fn group(mut seq: Vec<ArgDoc>) -> ArgDoc {
    if seq.len() == 2
        && seq[0].kind == "pure-token"
        && seq[1].kind != "pure-token"
        && seq[1].children.is_empty()
    {
        let mut value = seq.pop().expect("two elements");
        value.token = seq.pop().and_then(|t| t.token);
        return value;
    }
    if seq.len() == 1 {
        return seq.pop().expect("one element");
    }
    let name = seq.iter().map(|a| a.name.clone()).collect::<Vec<_>>().join("-");
    let kind = if seq.iter().all(|a| a.name.is_empty()) {
        "oneof"
    } else {
        "block"
    };
    ArgDoc {
        name,
        kind,
        token: None,
        optional: false,
        multiple: false,
        children: seq,
    }
}

fn word(t: &str) -> ArgDoc {
    let is_token = t
        .chars()
        .all(|c| c.is_ascii_uppercase() || c == '-' || c.is_ascii_digit())
        && t.chars().any(|c| c.is_ascii_uppercase());
    let lower = t.to_ascii_lowercase();
    let kind = if is_token {
        "pure-token"
    } else if t == "key" || t == "newkey" || t == "source" || t == "destination" {
        "key"
    } else if [
        "seconds",
        "milliseconds",
        "unix-time-seconds",
        "unix-time-milliseconds",
        "offset",
        "start",
        "end",
        "increment",
        "decrement",
        "count",
        "cursor",
        "index",
        "client-id",
        "destination-db",
        "protover",
    ]
    .contains(&t)
    {
        "integer"
    } else {
        "string"
    };
    ArgDoc {
        name: lower,
        kind,
        token: is_token.then(|| t.to_string()),
        optional: false,
        multiple: false,
        children: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spec_is_findable_and_sane() {
        for spec in COMMANDS {
            assert_eq!(find(spec.name).map(|s| s.name), Some(spec.name));
            assert!(spec.arity != 0, "{}", spec.name);
            for sub in spec.subcommands {
                assert!(sub.name.starts_with(&format!("{}|", spec.name)));
            }
        }
    }

    #[test]
    fn key_positions_follow_first_last_step() {
        let mset = find("mset").unwrap();
        assert_eq!(mset.key_positions(5), vec![1, 3]);
        assert_eq!(find("get").unwrap().key_positions(2), vec![1]);
        assert!(find("ping").unwrap().key_positions(2).is_empty());
    }

    #[test]
    fn arg_docs_of_set() {
        let docs = parse_arg_docs(find("set").unwrap().args);
        assert_eq!(docs[0].name, "key");
        assert_eq!(docs[0].kind, "key");
        assert_eq!(docs[2].kind, "oneof");
        assert!(docs[2].optional);
        let ex = &docs[4].children[0];
        assert_eq!(ex.token.as_deref(), Some("EX"));
        assert_eq!(ex.kind, "integer");
        let keys = parse_arg_docs("key [key ...]");
        assert_eq!(keys.len(), 1);
        assert!(keys[0].multiple);
    }
}

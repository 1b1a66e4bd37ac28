//! Publish/subscribe: channels and glob patterns to subscribers' message queues.
//!
//! Each subscribed connection owns a bounded queue. PUBLISH never waits on a slow
//! subscriber: when a queue is full the subscriber is disconnected, which is what
//! Redis's `client-output-buffer-limit pubsub` does, so one stalled reader cannot
//! grow the server's memory or slow the publisher.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::RwLock;
use tokio::sync::mpsc;

use crate::clients::ClientHandle;
use crate::glob;

/// A message on its way to one subscriber.
#[derive(Clone, Debug)]
pub enum Message {
    Message {
        channel: Bytes,
        payload: Bytes,
    },
    PMessage {
        pattern: Bytes,
        channel: Bytes,
        payload: Bytes,
    },
    /// A MONITOR line, already encoded (see [`crate::monitor`]).
    Monitor(Bytes),
}

/// A subscriber's queue and the handle to disconnect it if the queue overflows.
#[derive(Clone)]
pub struct Subscriber {
    pub tx: mpsc::Sender<Message>,
    pub client: Arc<ClientHandle>,
}

type Table = RwLock<HashMap<Bytes, HashMap<u64, Subscriber>>>;

#[derive(Default)]
pub struct PubSub {
    channels: Table,
    patterns: Table,
}

pub(crate) fn deliver(sub: &Subscriber, msg: Message) {
    if sub.tx.try_send(msg).is_err()
        && !sub
            .client
            .dropping
            .swap(true, std::sync::atomic::Ordering::Relaxed)
    {
        // Full (or the connection is closing): drop the subscriber, as Redis does
        // when a pub/sub client passes its output buffer limit.
        tracing::warn!(client = sub.client.id, "subscriber too slow, disconnecting");
        sub.client.kill.notify_one();
    }
}

impl PubSub {
    /// Returns whether this is a new subscription for the client.
    pub fn subscribe(&self, channel: &Bytes, sub: &Subscriber) -> bool {
        Self::add(&self.channels, channel, sub)
    }

    pub fn unsubscribe(&self, channel: &Bytes, client: u64) -> bool {
        Self::del(&self.channels, channel, client)
    }

    pub fn psubscribe(&self, pattern: &Bytes, sub: &Subscriber) -> bool {
        Self::add(&self.patterns, pattern, sub)
    }

    pub fn punsubscribe(&self, pattern: &Bytes, client: u64) -> bool {
        Self::del(&self.patterns, pattern, client)
    }

    fn add(table: &Table, name: &Bytes, sub: &Subscriber) -> bool {
        table
            .write()
            .entry(name.clone())
            .or_default()
            .insert(sub.client.id, sub.clone())
            .is_none()
    }

    fn del(table: &Table, name: &Bytes, client: u64) -> bool {
        let mut t = table.write();
        let Some(subs) = t.get_mut(name) else {
            return false;
        };
        let removed = subs.remove(&client).is_some();
        if subs.is_empty() {
            t.remove(name);
        }
        removed
    }

    /// Sends `payload` to every subscriber of `channel` and of a matching pattern;
    /// returns how many received it.
    pub fn publish(&self, channel: &Bytes, payload: &Bytes) -> usize {
        let mut n = 0;
        if let Some(subs) = self.channels.read().get(channel) {
            for sub in subs.values() {
                deliver(
                    sub,
                    Message::Message {
                        channel: channel.clone(),
                        payload: payload.clone(),
                    },
                );
                n += 1;
            }
        }
        for (pattern, subs) in self.patterns.read().iter() {
            if !glob::matches(pattern, channel, false) {
                continue;
            }
            for sub in subs.values() {
                deliver(
                    sub,
                    Message::PMessage {
                        pattern: pattern.clone(),
                        channel: channel.clone(),
                        payload: payload.clone(),
                    },
                );
                n += 1;
            }
        }
        n
    }

    /// Channels with at least one subscriber, optionally matching a pattern.
    pub fn channels(&self, pattern: Option<&[u8]>) -> Vec<Bytes> {
        self.channels
            .read()
            .keys()
            .filter(|c| pattern.is_none_or(|p| glob::matches(p, c, false)))
            .cloned()
            .collect()
    }

    pub fn numsub(&self, channel: &Bytes) -> usize {
        self.channels.read().get(channel).map_or(0, HashMap::len)
    }

    pub fn numpat(&self) -> usize {
        self.patterns.read().len()
    }

    pub fn channel_count(&self) -> usize {
        self.channels.read().len()
    }
}

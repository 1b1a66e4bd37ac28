//! Links to other nodes: authenticated, pooled, pipelined connections that
//! carry forwarded commands and the cluster's own requests.
//!
//! A link is an ordinary client connection to the peer's client port that has
//! proved it knows the cluster secret: the peer sends a random challenge and
//! the link answers HMAC-SHA256(secret, challenge) (`KVD.PEER CHALLENGE` /
//! `KVD.PEER AUTH`), so the secret never crosses the wire and a recorded answer
//! is useless on another connection. A peer-authenticated connection may run
//! the internal `KVD.*` commands and is never forwarded onwards (at most one
//! hop; a node that does not serve a slot answers `-MOVED` to the forwarder).
//!
//! One task per link owns the socket: requests from any number of client
//! connections are queued to it, written in batches, and their replies matched
//! back in order (Redis replies in request order), so a forwarded command costs
//! no connection set-up and many share one write.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use hmac::{Hmac, Mac};
use parking_lot::Mutex;
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use crate::reply::{Protocol, Reply};

/// Connections kept per peer and protocol version; requests are spread over them.
const POOL: usize = 2;
/// Connecting to a peer gives up after this long (the peer is down or unreachable).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The answer to a challenge: hex HMAC-SHA256 of it under the cluster secret.
pub fn prove(secret: &str, challenge: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(b"kvd-peer:");
    mac.update(challenge.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// Whether `proof` answers `challenge`, compared in constant time.
pub fn verify(secret: &str, challenge: &str, proof: &str) -> bool {
    let Ok(proof) = hex::decode(proof) else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(b"kvd-peer:");
    mac.update(challenge.as_bytes());
    mac.verify_slice(&proof).is_ok()
}

/// A fresh random challenge.
pub fn challenge() -> String {
    use rand::RngCore;
    let mut b = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut b);
    hex::encode(b)
}

/// Why a request over a link got no reply.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LinkError {
    #[error("cannot reach node {0}: {1}")]
    Connect(String, String),
    #[error("lost the connection to node {0} before its reply; the command may or may not have run")]
    Lost(String),
    /// The node did not answer in time (stopped, or asleep); a write sent to
    /// it may still run there.
    #[error("node {0} did not answer within {1} s; a write sent to it may or may not have run")]
    Timeout(String, u64),
}

/// Requests written together and the sender awaiting their replies.
struct Job {
    request: Bytes,
    count: usize,
    reply: oneshot::Sender<Result<Vec<Bytes>, LinkError>>,
}

/// A job whose replies are being read.
struct Waiting {
    count: usize,
    frames: Vec<Bytes>,
    reply: oneshot::Sender<Result<Vec<Bytes>, LinkError>>,
}

/// One connection to a peer, owned by its task.
pub struct Link {
    addr: String,
    jobs: mpsc::UnboundedSender<Job>,
}

impl Link {
    /// Opens and authenticates a connection to `addr`, speaking `proto`.
    pub async fn connect(
        addr: &str,
        proto: Protocol,
        me: &str,
        secret: &str,
        tls: Option<&tokio_rustls::TlsConnector>,
    ) -> Result<Link, LinkError> {
        let fail = |e: String| LinkError::Connect(addr.to_string(), e);
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| fail("timed out".into()))?
            .map_err(|e| fail(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let stream: Box<dyn PeerIo> = match tls {
            None => Box::new(tcp),
            Some(tls) => {
                // The peer's certificate must name the host of its address.
                let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
                let name = rustls_pki_types::ServerName::try_from(host.trim_matches(['[', ']']).to_string())
                    .map_err(|e| fail(format!("not a TLS server name: {e}")))?;
                let stream = tokio::time::timeout(CONNECT_TIMEOUT, tls.connect(name, tcp))
                    .await
                    .map_err(|_| fail("TLS handshake timed out".into()))?
                    .map_err(|e| fail(format!("TLS: {e}")))?;
                Box::new(stream)
            }
        };
        let mut conn = Conn {
            stream,
            buf: BytesMut::with_capacity(16 * 1024),
            proto: Protocol::Resp2,
        };
        let handshake = async {
            let challenge = conn.call(&[b"KVD.PEER", b"CHALLENGE"]).await?;
            let challenge = match challenge {
                Reply::Bulk(b) => String::from_utf8_lossy(&b).into_owned(),
                other => return Err(format!("unexpected challenge reply {other:?}")),
            };
            let proof = prove(secret, &challenge);
            match conn
                .call(&[b"KVD.PEER", b"AUTH", me.as_bytes(), proof.as_bytes()])
                .await?
            {
                Reply::Status(s) if s == "OK" => {}
                Reply::Error(e) => return Err(e),
                other => return Err(format!("unexpected auth reply {other:?}")),
            }
            if proto == Protocol::Resp3 {
                // The reply to HELLO 3 is already in RESP3.
                conn.proto = Protocol::Resp3;
                if let Reply::Error(e) = conn.call(&[b"HELLO", b"3"]).await? {
                    return Err(e);
                }
            }
            Ok(())
        };
        tokio::time::timeout(CONNECT_TIMEOUT, handshake)
            .await
            .map_err(|_| fail("handshake timed out".into()))?
            .map_err(fail)?;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run_link(addr.to_string(), conn, rx));
        Ok(Link {
            addr: addr.to_string(),
            jobs: tx,
        })
    }

    /// Sends one request (its arguments) and waits for the raw reply frame,
    /// encoded in the link's protocol.
    pub async fn call(&self, args: &[Bytes]) -> Result<Bytes, LinkError> {
        let mut frames = self.call_batch(std::slice::from_ref(&args.to_vec())).await?;
        frames.pop().ok_or_else(|| LinkError::Lost(self.addr.clone()))
    }

    /// Queues requests now and returns where their replies will arrive: lets a
    /// connection send a whole pipeline of forwarded commands as one job.
    pub fn start_batch(
        &self,
        requests: &[&[Bytes]],
    ) -> Option<oneshot::Receiver<Result<Vec<Bytes>, LinkError>>> {
        let mut request = BytesMut::new();
        for args in requests {
            encode_request_into(args, &mut request);
        }
        let (tx, rx) = oneshot::channel();
        let job = Job {
            request: request.freeze(),
            count: requests.len(),
            reply: tx,
        };
        self.jobs.send(job).ok()?;
        Some(rx)
    }

    /// Sends several requests back to back — nothing from other users of the
    /// link comes between them, which is what a forwarded MULTI ... EXEC needs —
    /// and returns their replies.
    pub async fn call_batch(&self, requests: &[Vec<Bytes>]) -> Result<Vec<Bytes>, LinkError> {
        let mut request = BytesMut::new();
        for args in requests {
            request.extend_from_slice(&encode_request(args));
        }
        let (tx, rx) = oneshot::channel();
        let job = Job {
            request: request.freeze(),
            count: requests.len(),
            reply: tx,
        };
        self.jobs
            .send(job)
            .map_err(|_| LinkError::Lost(self.addr.clone()))?;
        rx.await
            .unwrap_or_else(|_| Err(LinkError::Lost(self.addr.clone())))
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn is_closed(&self) -> bool {
        self.jobs.is_closed()
    }
}

/// The link's tasks: a writer sends queued requests in batches, a reader
/// matches replies to them in order. They are separate so that a large batch
/// being written never stops replies from being read (both sides blocked on a
/// full socket buffer would deadlock). When either ends, every request still
/// waiting fails and the link reports itself closed.
async fn run_link(addr: String, conn: Conn, mut jobs: mpsc::UnboundedReceiver<Job>) {
    let Conn {
        stream,
        mut buf,
        proto: _,
    } = conn;
    let (mut rd, mut wr) = tokio::io::split(stream);
    let waiting: Arc<Mutex<VecDeque<Waiting>>> = Arc::default();
    let stop = tokio_util::sync::CancellationToken::new();
    let reader = {
        let (waiting, stop, addr) = (waiting.clone(), stop.clone(), addr.clone());
        async move {
            'read: loop {
                let n = tokio::select! {
                    n = rd.read_buf(&mut buf) => n,
                    _ = stop.cancelled() => break,
                };
                if !matches!(n, Ok(n) if n > 0) {
                    break;
                }
                loop {
                    match frame_len(&buf) {
                        Ok(Some(len)) => {
                            let frame = buf.split_to(len).freeze();
                            let mut w = waiting.lock();
                            let Some(front) = w.front_mut() else {
                                tracing::warn!(
                                    "node {addr} sent a reply nobody asked for; dropping the link"
                                );
                                break 'read;
                            };
                            front.frames.push(frame);
                            if front.frames.len() == front.count {
                                if let Some(done) = w.pop_front() {
                                    let _ = done.reply.send(Ok(done.frames));
                                }
                            }
                        }
                        Ok(None) => break,
                        Err(_) => {
                            tracing::warn!("node {addr} sent a malformed reply; dropping the link");
                            break 'read;
                        }
                    }
                }
            }
            stop.cancel();
        }
    };
    let writer = {
        let (waiting, stop) = (waiting.clone(), stop.clone());
        async move {
            let mut out = BytesMut::new();
            loop {
                let job = tokio::select! {
                    job = jobs.recv() => job,
                    _ = stop.cancelled() => None,
                };
                let Some(mut job) = job else { break };
                loop {
                    out.extend_from_slice(&job.request);
                    waiting.lock().push_back(Waiting {
                        count: job.count,
                        frames: Vec::with_capacity(job.count),
                        reply: job.reply,
                    });
                    if out.len() >= 1 << 20 {
                        break;
                    }
                    match jobs.try_recv() {
                        Ok(next) => job = next,
                        Err(_) => break,
                    }
                }
                let written = tokio::select! {
                    r = wr.write_all(&out) => r.is_ok(),
                    _ = stop.cancelled() => false,
                };
                if !written {
                    break;
                }
                out.clear();
            }
            stop.cancel();
            jobs.close();
        }
    };
    tokio::join!(reader, writer);
    for w in waiting.lock().drain(..) {
        let _ = w.reply.send(Err(LinkError::Lost(addr.clone())));
    }
}

/// The length of the complete reply frame at the start of `buf`, if there is
/// one, in either protocol. A scan of the framing only (nothing is decoded or
/// allocated): this runs for every forwarded reply.
pub fn frame_len(buf: &[u8]) -> Result<Option<usize>, String> {
    frame_end(buf, 0)
}

fn line_end(buf: &[u8], from: usize) -> Option<usize> {
    memchr::memchr(b'\n', &buf[from..]).map(|i| from + i + 1)
}

fn frame_end(buf: &[u8], at: usize) -> Result<Option<usize>, String> {
    let Some(&kind) = buf.get(at) else { return Ok(None) };
    let Some(end) = line_end(buf, at) else {
        return Ok(None);
    };
    if end < at + 3 || buf[end - 2] != b'\r' {
        return Err("malformed reply line".into());
    }
    let header = &buf[at + 1..end - 2];
    let number = || -> Result<i64, String> {
        std::str::from_utf8(header)
            .ok()
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| "malformed length in reply".to_string())
    };
    match kind {
        b'+' | b'-' | b':' | b'_' | b'#' | b',' | b'(' => Ok(Some(end)),
        b'$' | b'!' | b'=' => {
            let n = number()?;
            if n < 0 {
                return Ok(Some(end));
            }
            let total = end + n as usize + 2;
            Ok((buf.len() >= total).then_some(total))
        }
        b'*' | b'~' | b'>' | b'%' | b'|' => {
            let n = number()?;
            if n < 0 {
                return Ok(Some(end));
            }
            let items = if matches!(kind, b'%' | b'|') { 2 * n } else { n };
            let mut pos = end;
            for _ in 0..items {
                match frame_end(buf, pos)? {
                    Some(next) => pos = next,
                    None => return Ok(None),
                }
            }
            if kind == b'|' {
                // An attribute map precedes the reply it annotates.
                return frame_end(buf, pos);
            }
            Ok(Some(pos))
        }
        other => Err(format!("unknown reply type byte {other:#x}")),
    }
}

/// Decodes a RESP2 reply into the subset of [`Reply`] the cluster reads back
/// (status, error, integer, bulk, null, array).
pub fn parse_reply(frame: &[u8]) -> Option<Reply> {
    use redis_protocol::resp2::types::OwnedFrame as F;
    fn conv(f: F) -> Reply {
        match f {
            F::SimpleString(s) => Reply::Status(String::from_utf8_lossy(&s).into_owned()),
            F::Error(e) => Reply::Error(e),
            F::Integer(i) => Reply::Int(i),
            F::BulkString(b) => Reply::Bulk(Bytes::from(b)),
            F::Array(items) => Reply::Array(items.into_iter().map(conv).collect()),
            F::Null => Reply::Nil,
        }
    }
    match redis_protocol::resp2::decode::decode(frame) {
        Ok(Some((f, _))) => Some(conv(f)),
        _ => None,
    }
}

pub fn encode_request(args: &[Bytes]) -> Bytes {
    let mut out = BytesMut::new();
    encode_request_into(args, &mut out);
    out.freeze()
}

fn encode_request_into(args: &[Bytes], out: &mut BytesMut) {
    out.reserve(16 + args.iter().map(|a| a.len() + 16).sum::<usize>());
    out.put_u8(b'*');
    out.extend_from_slice(args.len().to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
    for a in args {
        out.put_u8(b'$');
        out.extend_from_slice(a.len().to_string().as_bytes());
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

/// A link's byte stream: plain TCP, or TLS over it (`tls-replication`).
trait PeerIo: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> PeerIo for T {}

/// A connection during its handshake, before its task takes it over.
struct Conn {
    stream: Box<dyn PeerIo>,
    buf: BytesMut,
    proto: Protocol,
}

impl Conn {
    async fn call(&mut self, args: &[&[u8]]) -> Result<Reply, String> {
        let args: Vec<Bytes> = args.iter().map(|a| Bytes::copy_from_slice(a)).collect();
        self.stream
            .write_all(&encode_request(&args))
            .await
            .map_err(|e| e.to_string())?;
        loop {
            if let Some(len) = frame_len(&self.buf)? {
                let frame = self.buf.split_to(len);
                if self.proto == Protocol::Resp3 {
                    // Only HELLO's map is read in RESP3 here: success or error is all that matters.
                    return Ok(match frame.first() {
                        Some(b'-') => {
                            Reply::Error(String::from_utf8_lossy(&frame[1..]).trim_end().to_string())
                        }
                        _ => Reply::OK,
                    });
                }
                return parse_reply(&frame).ok_or_else(|| "malformed reply".to_string());
            }
            let n = self
                .stream
                .read_buf(&mut self.buf)
                .await
                .map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("connection closed".into());
            }
        }
    }
}

/// A pool's address and whether it speaks RESP3.
type PoolKey = (String, bool);

/// Pooled links to every peer, by address and protocol version.
pub struct Peers {
    me: String,
    secret: String,
    /// TLS for every link (`tls-replication yes`), else plain TCP.
    tls: Option<tokio_rustls::TlsConnector>,
    pools: Mutex<HashMap<PoolKey, Vec<Arc<Link>>>>,
    next: AtomicUsize,
}

impl Peers {
    pub fn new(me: String, secret: String, tls: Option<tokio_rustls::TlsConnector>) -> Peers {
        Peers {
            me,
            secret,
            tls,
            pools: Mutex::new(HashMap::new()),
            next: AtomicUsize::new(0),
        }
    }

    /// A pooled link to `addr`, connecting one if the pool is short.
    pub async fn link(&self, addr: &str, proto: Protocol) -> Result<Arc<Link>, LinkError> {
        let key = (addr.to_string(), proto == Protocol::Resp3);
        let pick = self.next.fetch_add(1, Ordering::Relaxed);
        {
            let mut pools = self.pools.lock();
            let pool = pools.entry(key.clone()).or_default();
            pool.retain(|l| !l.is_closed());
            if pool.len() >= POOL {
                return Ok(pool[pick % pool.len()].clone());
            }
        }
        let link = Arc::new(Link::connect(addr, proto, &self.me, &self.secret, self.tls.as_ref()).await?);
        let mut pools = self.pools.lock();
        let pool = pools.entry(key).or_default();
        if pool.len() < POOL {
            pool.push(link.clone());
        }
        Ok(link)
    }

    /// A pooled link to `addr` if one is open (no waiting, no connecting).
    pub fn pooled(&self, addr: &str, proto: Protocol) -> Option<Arc<Link>> {
        let pools = self.pools.lock();
        let pool = pools.get(&(addr.to_string(), proto == Protocol::Resp3))?;
        let live: Vec<&Arc<Link>> = pool.iter().filter(|l| !l.is_closed()).collect();
        if live.len() < POOL {
            return None;
        }
        let pick = self.next.fetch_add(1, Ordering::Relaxed);
        Some(live[pick % live.len()].clone())
    }

    /// A link of its own (not pooled), for state that lives on the peer's
    /// connection: a client's WATCH and MULTI on a slot served there.
    pub async fn dedicated(&self, addr: &str, proto: Protocol) -> Result<Link, LinkError> {
        Link::connect(addr, proto, &self.me, &self.secret, self.tls.as_ref()).await
    }

    /// One request over a pooled RESP2 link, parsed.
    pub async fn call(&self, addr: &str, args: &[Bytes]) -> Result<Reply, LinkError> {
        let link = self.link(addr, Protocol::Resp2).await?;
        let frame = link.call(args).await?;
        parse_reply(&frame).ok_or_else(|| LinkError::Lost(addr.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_verify_only_with_the_secret_and_challenge() {
        let c = challenge();
        let p = prove("s3cret", &c);
        assert!(verify("s3cret", &c, &p));
        assert!(!verify("other", &c, &p));
        assert!(!verify("s3cret", &challenge(), &p));
        assert!(!verify("s3cret", &c, "zz"));
    }

    #[test]
    fn frames_are_measured_in_both_protocols() {
        assert_eq!(frame_len(b"+OK\r\n"), Ok(Some(5)));
        assert_eq!(frame_len(b"$3\r\nab"), Ok(None));
        assert_eq!(frame_len(b"*2\r\n:1\r\n_\r\n+x"), Ok(Some(11)));
        assert!(frame_len(b"?x\r\n").is_err());
        assert_eq!(
            parse_reply(b"*2\r\n$1\r\na\r\n$-1\r\n"),
            Some(Reply::Array(vec![Reply::Bulk(Bytes::from("a")), Reply::Nil]))
        );
    }
}

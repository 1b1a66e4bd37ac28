//! The network side: listening, accepting within `maxclients`, and one task per
//! connection that owns its framing, its session state and its output buffer.
//!
//! A connection reads what the socket has, runs every complete request in the
//! buffer, and writes all their replies in one go: a pipelining client gets one
//! read and one write per batch, not per command. A client that stops reading
//! its replies stalls only itself (the write awaits, so nothing more is read from
//! it), which bounds its memory without a separate output-buffer limit.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::FutureExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::clients::ClientHandle;
use crate::command;
use crate::config::Config;
use crate::config::Storage;
use crate::protocol::{FrameError, RequestDecoder};
use crate::pubsub::Message;
use crate::reply::Reply;
use crate::session::Session;
use crate::shared::Shared;
use crate::stats::Outcome;
use crate::store::{DiskStore, MemStore, Store};

/// Output is flushed once this much is buffered, even mid-batch.
const FLUSH_THRESHOLD: usize = 256 * 1024;
/// Bulk replies at least this large are written from their own buffer.
const STREAM_BULK: usize = 64 * 1024;
/// Buffers larger than this are released once the connection has been idle for
/// `SHRINK_AFTER`, so a client that once sent a large value does not keep the
/// memory. Not at once: a client sending large values one after another would
/// otherwise get fresh memory for every request (as Redis, which resizes idle
/// clients' query buffers from its cron).
const KEEP_BUFFER: usize = 64 * 1024;
const SHRINK_AFTER: Duration = Duration::from_secs(2);

/// The cluster engine, when this node is one (`--cluster`): it runs every
/// request. It lives above [`Shared`], which knows it only as
/// [`crate::shared::ClusterInfo`].
type Node = Option<Arc<crate::replica::Replicas>>;

/// Binds every address in `config.bind` and serves until shutdown.
pub async fn run(shared: Arc<Shared>, node: Node) -> anyhow::Result<()> {
    let (bind, port, tls_port) = {
        let c = shared.config.read();
        (c.bind.clone(), c.port, c.tls_port)
    };
    let tls = crate::tls::acceptor(&shared.config.read())?;
    if port == 0 && tls.is_none() {
        anyhow::bail!("port 0 turns the plain port off, and no tls-port is set: nothing to listen on");
    }
    // `port 0` (as in Redis) serves TLS only.
    let ports = [(port, None), (tls_port, tls)];
    let mut listeners = Vec::new();
    for (port, tls) in ports.into_iter().filter(|(p, _)| *p != 0) {
        for host in bind.split_whitespace() {
            let addr = format!("{host}:{port}");
            let listener = listen(&addr)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
            tracing::info!(
                "kvd {} ready to accept {}connections on {addr}",
                env!("CARGO_PKG_VERSION"),
                if tls.is_some() { "TLS " } else { "" }
            );
            listeners.push((listener, tls.clone()));
        }
    }
    if shared.config.read().requirepass.is_none() && !bind.split_whitespace().all(is_loopback) {
        tracing::warn!("listening on a non-loopback address without --requirepass: anyone who can reach it can read and change every key");
    }
    tokio::spawn(housekeeping(shared.clone()));
    let mut tasks = Vec::new();
    for (listener, tls) in listeners {
        tasks.push(tokio::spawn(accept_loop(
            shared.clone(),
            node.clone(),
            listener,
            tls,
        )));
    }
    // Under systemd (`Type=notify`, dist/systemd/kvd@.service): ready once
    // every address listens and the data is loaded. Without NOTIFY_SOCKET
    // this does nothing.
    let status = format!("serving on port {port}");
    if let Err(e) = sd_notify::notify(
        false,
        &[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(&status),
        ],
    ) {
        tracing::warn!("could not tell the service manager kvd is ready: {e}");
    }
    shared.shutdown.cancelled().await;
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    for t in tasks {
        t.abort();
    }
    Ok(())
}

/// Redis's default `tcp-backlog`: bursts of connections queue in the kernel
/// instead of being dropped (and retried a second later by the client).
const TCP_BACKLOG: u32 = 511;

async fn listen(addr: &str) -> std::io::Result<TcpListener> {
    let mut last_err = None;
    for resolved in tokio::net::lookup_host(addr).await? {
        let socket = if resolved.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        match socket.bind(resolved).and_then(|()| socket.listen(TCP_BACKLOG)) {
            Ok(listener) => return Ok(listener),
            Err(e) => last_err = Some(e),
        }
    }
    Err(last_err.unwrap_or_else(|| std::io::Error::other("address resolves to nothing")))
}

fn is_loopback(host: &str) -> bool {
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// How long a TLS client may take over its handshake before it is dropped
/// (it holds a client slot meanwhile).
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

async fn accept_loop(
    shared: Arc<Shared>,
    node: Node,
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    loop {
        let (socket, addr) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                // Out of file descriptors and similar: back off instead of spinning.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = socket.set_nodelay(true);
        let laddr = socket.local_addr().unwrap_or(addr);
        if shared.clients.len() >= shared.config.read().maxclients {
            shared
                .clients
                .rejected_connections
                .fetch_add(1, Ordering::Relaxed);
            let tls = tls.clone();
            tokio::spawn(async move {
                match tls {
                    None => refuse(socket).await,
                    // Inside TLS, as the client expects every byte to be.
                    Some(tls) => {
                        if let Ok(Ok(stream)) =
                            tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, tls.accept(socket)).await
                        {
                            refuse(stream).await;
                        }
                    }
                }
            });
            continue;
        }
        let client = shared.clients.register(addr, laddr);
        let slot = ClientSlot {
            shared: shared.clone(),
            id: client.id,
        };
        let (tls, node) = (tls.clone(), node.clone());
        tokio::spawn(async move {
            let shared = slot.shared.clone();
            let id = slot.id;
            let mut session = Session::new(client, &shared);
            session.tls = tls.is_some();
            // A bug that panics while serving one connection must cost only that
            // connection: the panic is caught here, logged, and the session's
            // subscriptions and watches are released like any other close.
            let serving = async {
                match tls {
                    None => {
                        let (rd, wr) = socket.into_split();
                        serve(&shared, node.as_ref(), &mut session, rd, wr).await
                    }
                    Some(tls) => {
                        let stream = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, tls.accept(socket))
                            .await
                            .map_err(|_| std::io::Error::other("TLS handshake timed out"))??;
                        let (rd, wr) = tokio::io::split(stream);
                        serve(&shared, node.as_ref(), &mut session, rd, wr).await
                    }
                }
            };
            let served = std::panic::AssertUnwindSafe(serving).catch_unwind().await;
            match served {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(client = id, "connection ended: {e}"),
                Err(panic) => tracing::error!(
                    client = id,
                    "bug: serving the connection panicked ({}); closed it",
                    panic_text(&*panic)
                ),
            }
            session.reset(&shared);
            drop(slot);
        });
    }
}

/// Tells a client over `maxclients` so, and closes its connection.
async fn refuse(mut socket: impl AsyncRead + AsyncWrite + Unpin) {
    let _ = socket.write_all(b"-ERR max number of clients reached\r\n").await;
    // Close gently: closing with unread input would reset the connection and
    // could destroy the error before the client reads it.
    let _ = socket.shutdown().await;
    let mut sink = [0u8; 1024];
    let drain = async { while matches!(socket.read(&mut sink).await, Ok(n) if n > 0) {} };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
}

/// A connection's place in the client registry (and so in `maxclients`),
/// released when the connection's task ends however it ends: returned, panicked,
/// or cancelled at shutdown. Before this guard, a panic skipped the release and
/// every such connection held a client slot until restart.
struct ClientSlot {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.shared.clients.unregister(self.id);
    }
}

fn panic_text(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("no message")
}

/// Runs one connection until it closes, is killed, or the server shuts down.
async fn serve<R: Incoming, W: AsyncWrite + Unpin + Send>(
    shared: &Arc<Shared>,
    node: Option<&Arc<crate::replica::Replicas>>,
    session: &mut Session,
    mut rd: R,
    mut wr: W,
) -> std::io::Result<()> {
    // The buffers get memory when there is something to put in them: a
    // connection that never sends costs none (a storm of connections opened
    // and dropped left the allocator holding their buffers).
    let mut rbuf = BytesMut::new();
    let mut wbuf = BytesMut::new();
    let mut decoder = RequestDecoder::new(shared.config.read().limits(), session.authenticated);
    let mut args = Vec::new();
    let client = session.client.clone();
    let mut stop = stop_signal(shared, &client);
    loop {
        // Run every complete request already buffered.
        session.client.touch();
        let mut batch = 0u64;
        loop {
            decoder.authenticated = session.authenticated;
            match decoder.decode_into(&mut rbuf, &mut args) {
                Ok(true) if args.is_empty() => continue,
                Ok(true) => {
                    batch += 1;
                    if args[0].len() == 9
                        && args[0].eq_ignore_ascii_case(b"kvd.panic")
                        && crate::failpoint::failpoint("panic")
                    {
                        panic!("KVD.PANIC (KVD_FAILPOINTS=panic)");
                    }
                    let started = Instant::now();
                    session.rejected = false;
                    let spec = command::spec::lookup(&args).found();
                    // MONITOR shows what clients ask of this node (not what
                    // peers forward to it), once it ran or went on its way.
                    let monitored = shared.monitors.active() && session.cluster.peer.is_none();
                    let reply = match node {
                        Some(rep) => crate::replica::dispatch::dispatch(shared, rep, session, &args).await,
                        None => command::execute(shared, session, &args),
                    };
                    let outcome = if session.rejected {
                        Outcome::Rejected
                    } else {
                        Outcome::Ran(started.elapsed())
                    };
                    if monitored && !session.rejected && spec.is_some() {
                        shared.monitors.feed(&session.client, session.db, spec, &args);
                    }
                    shared.stats.record(spec, outcome, &reply);
                    if !session.send_reply() {
                        if session.close {
                            flush(shared, session, &mut stop, &mut wr, &mut wbuf).await?;
                            return Ok(());
                        }
                        continue;
                    }
                    match reply {
                        // A large value goes from the store's buffer (often the
                        // mapped log segment) to the socket without a copy into
                        // the output buffer.
                        Reply::Bulk(value) if value.len() >= STREAM_BULK => {
                            wbuf.extend_from_slice(format!("${}\r\n", value.len()).as_bytes());
                            if !flush_with(shared, session, &mut stop, &mut wr, &mut wbuf, Some(value))
                                .await?
                            {
                                return Ok(());
                            }
                            wbuf.extend_from_slice(b"\r\n");
                        }
                        reply => reply.encode(session.proto, &mut wbuf),
                    }
                    if session.close {
                        flush(shared, session, &mut stop, &mut wr, &mut wbuf).await?;
                        return Ok(());
                    }
                    if wbuf.len() >= FLUSH_THRESHOLD
                        && !flush(shared, session, &mut stop, &mut wr, &mut wbuf).await?
                    {
                        return Ok(());
                    }
                }
                Ok(false) => {
                    if batch > 0 {
                        shared.stats.commands.fetch_add(batch, Ordering::Relaxed);
                        session.client.state.lock().last_cmd = session.last_cmd;
                    }
                    break;
                }
                Err(FrameError::QueryBufferLimit) => {
                    tracing::warn!(
                        client = session.client.id,
                        "closing client that reached max query buffer length"
                    );
                    return Ok(());
                }
                Err(FrameError::Io(e)) => return Err(e),
                Err(e) => {
                    // Malformed input: Redis's error, then close only this connection.
                    if let Some(text) = e.reply_text() {
                        Reply::error_bytes(&text).encode(session.proto, &mut wbuf);
                    }
                    flush(shared, session, &mut stop, &mut wr, &mut wbuf).await?;
                    return Ok(());
                }
            }
        }
        if !flush(shared, session, &mut stop, &mut wr, &mut wbuf).await? {
            return Ok(());
        }
        let oversized = rbuf.capacity() > KEEP_BUFFER || wbuf.capacity() > KEEP_BUFFER;
        let timeout = {
            let config = shared.config.read();
            decoder.limits = config.limits();
            session.max_bulk_len = config.proto_max_bulk_len;
            session.notify_keyspace_events = config.notify_keyspace_events;
            config.timeout
        };
        let idle_limit = async {
            if timeout == 0 || session.subscriber.is_some() {
                std::future::pending::<()>().await
            }
            tokio::time::sleep(Duration::from_secs(timeout)).await
        };
        let message = async {
            match session.messages.as_mut() {
                Some(rx) => rx.recv().await,
                None => std::future::pending().await,
            }
        };
        let shrink = async {
            if !oversized {
                std::future::pending::<()>().await
            }
            tokio::time::sleep(SHRINK_AFTER).await
        };
        tokio::select! {
            _ = shrink => {
                if rbuf.is_empty() {
                    rbuf = BytesMut::new();
                }
                wbuf = BytesMut::new();
            }
            read = rd.fill(&mut rbuf) => {
                match read? {
                    None => {} // the readiness was stale: wait again
                    Some(0) => return Ok(()),
                    Some(n) => {
                        shared.stats.net_input_bytes.fetch_add(n as u64, Ordering::Relaxed);
                    }
                }
            }
            Some(msg) = message => {
                push_message(msg).encode(session.proto, &mut wbuf);
                // Deliver whatever else is already queued in the same write.
                while let Some(msg) = session.messages.as_mut().and_then(|rx| rx.try_recv().ok()) {
                    push_message(msg).encode(session.proto, &mut wbuf);
                    if wbuf.len() >= FLUSH_THRESHOLD {
                        break;
                    }
                }
            }
            _ = &mut stop => return Ok(()),
            _ = idle_limit => return Ok(()),
        }
    }
}

fn push_message(msg: Message) -> Reply {
    match msg {
        Message::Monitor(line) => Reply::Raw(line),
        Message::Message { channel, payload } => Reply::Push(vec![
            Reply::bulk_str("message"),
            Reply::Bulk(channel),
            Reply::Bulk(payload),
        ]),
        Message::PMessage {
            pattern,
            channel,
            payload,
        } => Reply::Push(vec![
            Reply::bulk_str("pmessage"),
            Reply::Bulk(pattern),
            Reply::Bulk(channel),
            Reply::Bulk(payload),
        ]),
    }
}

/// Resolves when a connection must end: CLIENT KILL, or the server shutting
/// down. Made once per connection and polled by every wait on the socket, so
/// its two waiters are registered once, not once per request (their locking
/// was a few percent of the server's CPU at pipeline 1).
/// The read side of a connection: plain TCP or TLS.
trait Incoming: AsyncRead + Unpin + Send {
    /// Waits for bytes and appends what is there to `buf`: the count (0 at
    /// the end of the stream), or `None` when a wakeup found nothing.
    fn fill<'a>(
        &'a mut self,
        buf: &'a mut BytesMut,
    ) -> impl std::future::Future<Output = std::io::Result<Option<usize>>> + Send + 'a;
}

impl Incoming for tokio::net::tcp::OwnedReadHalf {
    async fn fill(&mut self, buf: &mut BytesMut) -> std::io::Result<Option<usize>> {
        self.readable().await?;
        // Memory only once there is something to put in it.
        buf.reserve(16 * 1024);
        // Through `poll_read` (without waiting), not `try_read`: a read that
        // does not fill the space offered tells tokio the socket is drained,
        // where `try_read` needs a second read that fails with EAGAIN before
        // the next wait. At pipeline 1 that was a system call per request
        // more than Redis makes.
        self.read_buf(buf).now_or_never().transpose()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Incoming for tokio::io::ReadHalf<S> {
    async fn fill(&mut self, buf: &mut BytesMut) -> std::io::Result<Option<usize>> {
        // TLS has no readiness to wait on without reading: the record layer
        // decides when bytes are there. A read cancelled by another branch
        // of the connection's select loses nothing (rustls buffers).
        buf.reserve(16 * 1024);
        self.read_buf(buf).await.map(Some)
    }
}

type Stop<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>>;

fn stop_signal<'a>(shared: &'a Shared, client: &'a ClientHandle) -> Stop<'a> {
    Box::pin(async move {
        tokio::select! {
            _ = client.kill.notified() => {}
            _ = shared.shutdown.cancelled() => {}
        }
    })
}

/// Writes the buffered replies. Returns `false` if the client was killed or the
/// server is stopping while the write waited: a client that does not read must
/// not be able to hold its connection open against CLIENT KILL or a slow-
/// subscriber disconnect.
async fn flush(
    shared: &Shared,
    session: &mut Session,
    stop: &mut Stop<'_>,
    wr: &mut (impl AsyncWrite + Unpin),
    wbuf: &mut BytesMut,
) -> std::io::Result<bool> {
    flush_with(shared, session, stop, wr, wbuf, None).await
}

/// [`flush`], then `tail` written straight after the buffered replies.
async fn flush_with(
    shared: &Shared,
    session: &mut Session,
    stop: &mut Stop<'_>,
    wr: &mut (impl AsyncWrite + Unpin),
    wbuf: &mut BytesMut,
    tail: Option<Bytes>,
) -> std::io::Result<bool> {
    if session.wrote {
        // Replies to writes go out only once the writes are in the log (and
        // fsynced with appendfsync always). If that fails, nothing is sent and
        // the connection closes: the client sees no acknowledgement.
        session.wrote = false;
        // Let the other connections with requests ready run first, so their
        // writes join this one in a single write(2) (and fsync), as Redis writes
        // its AOF once per event-loop round rather than once per client.
        tokio::task::yield_now().await;
        if let Err(e) = shared.dbs.flush_writes() {
            tracing::error!(client = session.client.id, "not acknowledging writes: {e}");
            wbuf.clear();
            return Ok(false);
        }
    }
    let tail_len = tail.as_ref().map_or(0, Bytes::len);
    if wbuf.is_empty() && tail_len == 0 {
        return Ok(true);
    }
    let mut out = bytes::Buf::chain(&wbuf[..], tail.as_deref().unwrap_or_default());
    tokio::select! {
        written = write_all_vectored(wr, &mut out) => written?,
        _ = stop => return Ok(false),
    }
    shared
        .stats
        .net_output_bytes
        .fetch_add((wbuf.len() + tail_len) as u64, Ordering::Relaxed);
    wbuf.clear();
    Ok(true)
}

/// Writes all of `out` (up to two slices), with writev so the buffered
/// replies and a large value leave in one system call.
async fn write_all_vectored(
    wr: &mut (impl AsyncWrite + Unpin),
    out: &mut impl bytes::Buf,
) -> std::io::Result<()> {
    while out.has_remaining() {
        let mut slices = [std::io::IoSlice::new(&[]); 2];
        let n = out.chunks_vectored(&mut slices);
        let written = wr.write_vectored(&slices[..n]).await?;
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        out.advance(written);
    }
    Ok(())
}

/// Background work: active expiry (so unread expired keys do not hold memory)
/// and the ops/sec sample for INFO.
async fn housekeeping(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut last = (Instant::now(), 0u64);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shared.shutdown.cancelled() => return,
        }
        // Keep removing while a batch comes back full, but yield between batches.
        let notify = shared.config.read().notify_keyspace_events;
        for (index, db) in shared.dbs.opened() {
            loop {
                let (removed, changes) = {
                    let _gate = shared.dbs.shared();
                    db.recording(|| db.expire_some(256))
                };
                if notify & crate::notify::EXPIRED != 0 {
                    let events = changes
                        .into_iter()
                        .filter(|c| c.kind == crate::db::ChangeKind::Expired)
                        .map(|c| (crate::notify::EXPIRED, "expired", c.key))
                        .collect();
                    crate::notify::publish(&shared.pubsub, notify, index, events);
                }
                if removed < 256 {
                    break;
                }
                tokio::task::yield_now().await;
            }
        }
        if last.0.elapsed() >= Duration::from_secs(1) {
            let now = shared.stats.commands.load(Ordering::Relaxed);
            let ops = (now.saturating_sub(last.1) as f64 / last.0.elapsed().as_secs_f64()) as u64;
            shared.stats.ops_per_sec.store(ops, Ordering::Relaxed);
            last = (Instant::now(), now);
        }
    }
}

/// Starts a server (and, with cluster options, joins or founds a cluster); returns the shared
/// state (for shutdown) and the task. Used by the binary and by tests.
pub async fn start(
    config: Config,
    config_file: Option<String>,
    replicas: Option<crate::replica::Options>,
) -> anyhow::Result<(Arc<Shared>, tokio::task::JoinHandle<anyhow::Result<()>>)> {
    // A cluster node keeps database 0 only, as a Redis Cluster node does.
    let count = if replicas.is_some() { 1 } else { config.databases };
    let dbs = match config.storage {
        Storage::Memory => {
            let open: crate::databases::Opener =
                Box::new(|_| Ok(Arc::new(MemStore::new()) as Arc<dyn Store>));
            crate::databases::Databases::open(Arc::new(MemStore::new()), count, None, open)?
        }
        Storage::Disk => {
            let options = crate::store::disk::Options {
                fsync: config.appendfsync,
                segment_size: config.segment_size,
                compact_dead_fraction: config.compact_dead_percent as f64 / 100.0,
            };
            let dir = config.dir.clone();
            tokio::task::spawn_blocking(move || {
                let first = DiskStore::open(&dir, options.clone())?;
                let root = dir.clone();
                let open: crate::databases::Opener = Box::new(move |name| {
                    let path = root.join(name);
                    std::fs::create_dir_all(&path)?;
                    Ok(DiskStore::open(&path, options.clone())? as Arc<dyn Store>)
                });
                crate::databases::Databases::open(first, count, Some(&dir), open)
            })
            .await?
            .map_err(|e| anyhow::anyhow!("cannot open the data directory {}: {e}", config.dir.display()))?
        }
    };
    let tracking = config.latency_tracking;
    let shared = Shared::new(config, config_file, dbs);
    shared.stats.latency_tracking.store(tracking, Ordering::Relaxed);
    let node = match replicas {
        Some(options) => {
            let rep = crate::replica::Replicas::start(options)?;
            // Before anything is served: every later change keeps them.
            rep.acceptor.count_stored(&shared.dbs.zero());
            crate::replica::repair::spawn(shared.clone(), rep.clone());
            crate::replica::health::spawn(shared.clone(), rep.clone());
            let _ = shared.cluster.set(rep.clone());
            Some(rep)
        }
        None => None,
    };
    let task = tokio::spawn(run(shared.clone(), node));
    Ok((shared, task))
}

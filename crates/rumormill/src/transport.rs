//! Sockets behind a trait, so that the same driver runs on the operating
//! system's network ([`TokioNet`]) and on turmoil's simulated one in tests.
//!
//! Datagrams go over UDP; stream frames (full-state exchanges, large update
//! batches) over short TCP connections, length-delimited
//! ([`rumormill_wire::encode_frame`]), with timeouts and size limits.
//!
//! Incoming connections come from anyone who reaches the port, and nothing
//! they send is authenticated until the overlay's codec opens a whole frame.
//! So [`Streams`] bounds what they can make the agent hold, under
//! [`StreamLimits`]: each frame's length and header are checked (against the
//! overlay's current [`HeaderFilter`]) before its body is read; bodies are
//! buffered as they arrive from one byte budget (64 MiB by default) that
//! also covers frames queued for the overlay, so incoming frame bytes never
//! exceed it; connections are capped in all (256) and per source address
//! (64); a header must come within 2 s; and when room is needed, connections
//! idle before their first header, idle between frames, or stalled inside a
//! frame are evicted first, so that members sending at a normal rate keep
//! getting through. A header that passes proves nothing (overlay and key ids
//! travel in clear); it only keeps out those who have not seen the overlay's
//! traffic.
//!
//! ```no_run
//! # async fn f() -> std::io::Result<()> {
//! use rumormill::transport::{Datagrams, Net, TokioNet};
//! let udp = TokioNet.bind_udp("127.0.0.1:0".parse().unwrap()).await?;
//! let to: std::net::SocketAddr = "127.0.0.1:7950".parse().unwrap();
//! Datagrams::send_to(&udp, b"hello", to).await?;
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rumormill_wire::{FrameKind, HEADER_LEN, HeaderFilter, WireError};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;
use tokio::task::AbortHandle;

/// Socket receive/send buffer asked for (the kernel may cap it).
pub const SOCKET_BUFFER: usize = 4 << 20;
/// How long a stream connection may take to connect, or stay idle.
pub const STREAM_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an incoming stream connection may stay open in all.
pub const CONNECTION_DEADLINE: Duration = Duration::from_secs(60);

/// A bound datagram socket.
pub trait Datagrams: Send + Sync + 'static {
    /// Sends one datagram.
    fn send_to(&self, buf: &[u8], to: SocketAddr) -> impl Future<Output = io::Result<usize>> + Send;
    /// Receives one datagram.
    fn recv_from(&self, buf: &mut [u8]) -> impl Future<Output = io::Result<(usize, SocketAddr)>> + Send;
    /// The bound address.
    fn local_addr(&self) -> io::Result<SocketAddr>;
}

/// A bound stream listener.
pub trait Listener: Send + 'static {
    /// Connections it yields.
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// Waits for the next connection.
    fn accept(&self) -> impl Future<Output = io::Result<(Self::Stream, SocketAddr)>> + Send;
}

/// A network: the operating system's, or a simulated one.
pub trait Net: Clone + Send + Sync + 'static {
    /// Its datagram sockets.
    type Udp: Datagrams;
    /// Its listeners.
    type Listener: Listener<Stream = Self::Stream>;
    /// Its stream connections.
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// Binds a datagram socket.
    fn bind_udp(&self, addr: SocketAddr) -> impl Future<Output = io::Result<Self::Udp>> + Send;
    /// Binds a stream listener.
    fn bind_tcp(&self, addr: SocketAddr) -> impl Future<Output = io::Result<Self::Listener>> + Send;
    /// Opens a stream connection from the local address `from` (the gossip
    /// socket's: on a host with several addresses the peer must see the one
    /// the member is known by; unspecified lets the system choose).
    fn connect(&self, from: IpAddr, addr: SocketAddr) -> impl Future<Output = io::Result<Self::Stream>> + Send;
    /// Resolves `host:port`.
    fn resolve(&self, host: &str, port: u16) -> impl Future<Output = io::Result<Vec<SocketAddr>>> + Send;
}

/// The operating system's network through tokio, with sockets set up by
/// socket2: large buffers; address reuse on the TCP listener.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokioNet;

impl Datagrams for tokio::net::UdpSocket {
    fn send_to(&self, buf: &[u8], to: SocketAddr) -> impl Future<Output = io::Result<usize>> + Send {
        tokio::net::UdpSocket::send_to(self, buf, to)
    }
    fn recv_from(&self, buf: &mut [u8]) -> impl Future<Output = io::Result<(usize, SocketAddr)>> + Send {
        tokio::net::UdpSocket::recv_from(self, buf)
    }
    fn local_addr(&self) -> io::Result<SocketAddr> {
        tokio::net::UdpSocket::local_addr(self)
    }
}

impl Listener for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;
    fn accept(&self) -> impl Future<Output = io::Result<(Self::Stream, SocketAddr)>> + Send {
        tokio::net::TcpListener::accept(self)
    }
}

impl Net for TokioNet {
    type Udp = tokio::net::UdpSocket;
    type Listener = tokio::net::TcpListener;
    type Stream = tokio::net::TcpStream;

    async fn bind_udp(&self, addr: SocketAddr) -> io::Result<Self::Udp> {
        use socket2::{Domain, Protocol, Socket, Type};
        let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
        // No SO_REUSEADDR here: on UDP it would let two overlays share a
        // port silently. (The TCP listener sets it, for quick restarts.)
        // Best effort: the kernel caps these at net.core.{r,w}mem_max.
        let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
        let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        tokio::net::UdpSocket::from_std(socket.into())
    }

    async fn bind_tcp(&self, addr: SocketAddr) -> io::Result<Self::Listener> {
        let socket = match addr {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(1024)
    }

    async fn connect(&self, from: IpAddr, addr: SocketAddr) -> io::Result<Self::Stream> {
        let socket = match addr {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        if !from.is_unspecified() && from.is_ipv4() == addr.is_ipv4() {
            socket.bind(SocketAddr::new(from, 0))?;
        }
        let stream = socket.connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }

    async fn resolve(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
        Ok(tokio::net::lookup_host((host, port)).await?.collect())
    }
}

/// Sends a frame over one new connection from `from` (see [`Net::connect`]):
/// connect, write, close; each step bounded by [`STREAM_TIMEOUT`].
pub async fn send_frame<N: Net>(net: &N, from: IpAddr, to: SocketAddr, frame: &[u8]) -> io::Result<()> {
    let mut stream = tokio::time::timeout(STREAM_TIMEOUT, net.connect(from, to))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    let write = async {
        stream.write_all(&rumormill_wire::encode_frame(frame)).await?;
        stream.shutdown().await
    };
    tokio::time::timeout(STREAM_TIMEOUT, write)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "write timed out"))?
}

// ----- incoming stream connections ------------------------------------------

/// Bounds on what peers that reach the stream port can make the agent hold,
/// before anything they send is authenticated (the codec, in the overlay
/// task, authenticates; the transport can only check headers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamLimits {
    /// Incoming connections open at once.
    pub max_connections: usize,
    /// Incoming connections open at once from one source IP address.
    pub max_per_source: usize,
    /// Bytes of incoming frames buffered at once, across all connections,
    /// including frames queued for the overlay. Never below `max_frame`;
    /// one source address holds at most half of it (see
    /// [`StreamLimits::source_share`]).
    pub buffer_budget: usize,
    /// Largest frame accepted.
    pub max_frame: usize,
    /// Time for a connection to deliver each frame's length and header.
    pub header_timeout: Duration,
    /// Time a connection may go without sending a byte inside a frame.
    pub idle_timeout: Duration,
    /// Time a connection may stay open in all.
    pub deadline: Duration,
    /// Bytes per second under which a connection inside a frame counts as
    /// stalled (measured over the last one to two seconds, once it has been
    /// inside the frame for two): a stalled connection may be evicted when
    /// its slot or its buffer is needed.
    pub min_rate: usize,
}

impl Default for StreamLimits {
    fn default() -> StreamLimits {
        StreamLimits {
            max_connections: 256,
            max_per_source: 64,
            buffer_budget: 64 << 20,
            max_frame: rumormill_wire::DEFAULT_MAX_FRAME,
            header_timeout: Duration::from_secs(2),
            idle_timeout: STREAM_TIMEOUT,
            deadline: CONNECTION_DEADLINE,
            min_rate: 64 << 10,
        }
    }
}

impl StreamLimits {
    /// The byte budget in force: `buffer_budget`, raised to `max_frame` so
    /// that the largest frame can always be buffered.
    pub fn budget(&self) -> usize {
        self.buffer_budget.max(self.max_frame)
    }

    /// The most one source IP address may hold of the budget: half of it,
    /// or one largest frame if that is more.
    pub fn source_share(&self) -> usize {
        (self.budget() / 2).max(self.max_frame)
    }
}

/// Counters of the transport (the overlay counts the protocol).
#[derive(Debug, Default)]
pub struct TransportStats {
    /// Datagrams the socket refused to send.
    pub send_errors: AtomicU64,
    /// Stream connections that failed (connect, write or read).
    pub stream_errors: AtomicU64,
    /// Outgoing stream frames dropped because too many were in flight.
    pub streams_dropped: AtomicU64,
    /// Incoming connections refused: too many open (in all or from their
    /// source address) and none that could be evicted.
    pub connections_refused: AtomicU64,
    /// Incoming connections closed to make room for another: idle before
    /// their first header, between frames, or stalled inside a frame.
    pub connections_evicted: AtomicU64,
    /// Incoming frames refused on their length or header, before their body
    /// was read.
    pub frames_refused: AtomicU64,
}

/// What connection readers hand to the overlay task.
#[derive(Debug)]
pub enum Incoming {
    /// A complete frame whose header passed the [`HeaderFilter`].
    Frame(Frame),
    /// A frame refused on its header, for the overlay's counters.
    Refused {
        /// The peer.
        from: SocketAddr,
        /// Why.
        error: WireError,
    },
}

/// A complete incoming frame (without its length prefix), holding its share
/// of the byte budget until it is dropped.
#[derive(Debug)]
pub struct Frame {
    /// The peer.
    pub from: SocketAddr,
    /// The frame.
    pub bytes: Vec<u8>,
    _charge: Charge,
}

/// Bytes taken from the budget, given back when dropped.
#[derive(Debug)]
struct Charge {
    streams: Arc<Streams>,
    bytes: usize,
}

impl Drop for Charge {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.streams.lock().used -= self.bytes;
            self.streams.released.notify_waiters();
        }
    }
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Its source address has `max_per_source` connections open.
    #[error("too many connections from this address")]
    PerSource,
    /// `max_connections` are open and none can be evicted.
    #[error("too many connections")]
    Full,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for a frame's length and header.
    Header,
    /// Reading a frame's body, its header checked.
    Body,
}

/// Bytes received over the last one to two seconds.
#[derive(Debug, Clone, Copy)]
struct Meter {
    start: Instant,
    current: usize,
    previous: usize,
}

const METER_WINDOW: Duration = Duration::from_secs(1);

impl Meter {
    fn new(now: Instant) -> Meter {
        Meter {
            start: now,
            current: 0,
            previous: 0,
        }
    }

    fn roll(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.start);
        if elapsed >= 2 * METER_WINDOW {
            self.previous = 0;
            self.current = 0;
            self.start = now;
        } else if elapsed >= METER_WINDOW {
            self.previous = self.current;
            self.current = 0;
            self.start += METER_WINDOW;
        }
    }

    fn record(&mut self, now: Instant, n: usize) {
        self.roll(now);
        self.current += n;
    }

    fn recent(&mut self, now: Instant) -> usize {
        self.roll(now);
        self.previous + self.current
    }
}

#[derive(Debug)]
struct Conn {
    ip: IpAddr,
    phase: Phase,
    /// When the current phase began.
    since: Instant,
    /// A header of this connection passed the filter.
    verified: bool,
    /// Budget bytes held by the frame being read.
    held: usize,
    meter: Meter,
    evicted: bool,
    abort: Option<AbortHandle>,
}

impl Conn {
    /// Whether the connection is inside a frame that has stalled.
    fn stalled(&mut self, now: Instant, min_rate: usize) -> bool {
        self.phase == Phase::Body
            && now.saturating_duration_since(self.since) >= 2 * METER_WINDOW
            && self.meter.recent(now) < min_rate
    }

    fn evict(&mut self) {
        self.evicted = true;
        if let Some(a) = &self.abort {
            a.abort();
        }
    }
}

#[derive(Debug, Default)]
struct State {
    next_id: u64,
    /// Budget bytes taken (by frames being read and frames queued).
    used: usize,
    conns: BTreeMap<u64, Conn>,
}

/// The incoming connections of one listener: admission (connection caps,
/// eviction) and the byte budget shared by all of them.
///
/// ```
/// use rumormill::transport::{StreamLimits, Streams, TransportStats};
/// let stats = std::sync::Arc::new(TransportStats::default());
/// let streams = Streams::new(StreamLimits { max_connections: 1, ..StreamLimits::default() }, stats);
/// let now = std::time::Instant::now();
/// let ip = "10.0.0.1".parse().unwrap();
/// let (first, _) = streams.admit(ip, now).unwrap();
/// // The idle first one makes room for the second.
/// let (_second, evicted) = streams.admit("10.0.0.2".parse().unwrap(), now).unwrap();
/// assert_eq!(evicted, 1);
/// assert!(first.is_evicted());
/// ```
#[derive(Debug)]
pub struct Streams {
    limits: StreamLimits,
    stats: Arc<TransportStats>,
    state: std::sync::Mutex<State>,
    released: Notify,
}

impl Streams {
    /// A listener's connection table with these limits.
    pub fn new(limits: StreamLimits, stats: Arc<TransportStats>) -> Arc<Streams> {
        Arc::new(Streams {
            limits,
            stats,
            state: std::sync::Mutex::new(State::default()),
            released: Notify::new(),
        })
    }

    /// The limits.
    pub fn limits(&self) -> &StreamLimits {
        &self.limits
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state stays consistent whatever panicked while holding it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Budget bytes taken now.
    pub fn used(&self) -> usize {
        self.lock().used
    }

    /// Connections open now (evicted ones until their task has ended).
    pub fn open(&self) -> usize {
        self.lock().conns.len()
    }

    /// Admits a connection from `ip`, evicting another if all slots are
    /// taken: first the one that has waited longest for its first header,
    /// then the one idle longest between frames, then the most stalled
    /// inside a frame. Returns its ticket and how many were evicted (0 or 1).
    pub fn admit(self: &Arc<Self>, ip: IpAddr, now: Instant) -> Result<(Ticket, usize), Refusal> {
        let mut st = self.lock();
        let from_ip = st.conns.values().filter(|c| !c.evicted && c.ip == ip).count();
        if from_ip >= self.limits.max_per_source {
            self.stats.connections_refused.fetch_add(1, Ordering::Relaxed);
            return Err(Refusal::PerSource);
        }
        let active = st.conns.values().filter(|c| !c.evicted).count();
        let mut evicted = 0;
        if active >= self.limits.max_connections {
            let min_rate = self.limits.min_rate;
            let victim = st
                .conns
                .iter_mut()
                .filter(|(_, c)| !c.evicted)
                .filter_map(|(&id, c)| {
                    let rank = match (c.phase, c.verified) {
                        (Phase::Header, false) => (0, 0),
                        (Phase::Header, true) => (1, 0),
                        (Phase::Body, _) if c.stalled(now, min_rate) => (2, c.meter.recent(now)),
                        (Phase::Body, _) => return None,
                    };
                    Some((rank, c.since, id))
                })
                .min()
                .map(|(_, _, id)| id);
            let Some(victim) = victim.and_then(|id| st.conns.get_mut(&id)) else {
                self.stats.connections_refused.fetch_add(1, Ordering::Relaxed);
                return Err(Refusal::Full);
            };
            victim.evict();
            self.stats.connections_evicted.fetch_add(1, Ordering::Relaxed);
            evicted = 1;
        }
        let id = st.next_id;
        st.next_id += 1;
        st.conns.insert(
            id,
            Conn {
                ip,
                phase: Phase::Header,
                since: now,
                verified: false,
                held: 0,
                meter: Meter::new(now),
                evicted: false,
                abort: None,
            },
        );
        Ok((
            Ticket {
                streams: self.clone(),
                id,
            },
            evicted,
        ))
    }

    /// Takes `n` bytes of budget for connection `id`, evicting stalled
    /// connections that hold budget if there is not enough. `Ok(false)`:
    /// wait for a release and try again.
    fn try_reserve(&self, id: u64, n: usize, now: Instant) -> Result<bool, io::Error> {
        let budget = self.limits.budget();
        let min_rate = self.limits.min_rate;
        let mut st = self.lock();
        if st.conns.get(&id).is_none_or(|c| c.evicted) {
            return Err(io::Error::other("evicted"));
        }
        let Some(ip) = st.conns.get(&id).map(|c| c.ip) else {
            return Err(io::Error::other("evicted"));
        };
        let from_ip: usize = st.conns.values().filter(|c| c.ip == ip).map(|c| c.held).sum();
        if from_ip + n > self.limits.source_share() {
            // This source holds its share: it waits for its own frames.
            return Ok(false);
        }
        if st.used + n <= budget {
            st.used += n;
            if let Some(c) = st.conns.get_mut(&id) {
                c.held += n;
            }
            return Ok(true);
        }
        // Bytes already on their way back from earlier evictions.
        let returning: usize = st.conns.values().filter(|c| c.evicted).map(|c| c.held).sum();
        let mut short = (st.used + n - budget).saturating_sub(returning);
        let mut victims: Vec<(usize, u64)> = st
            .conns
            .iter_mut()
            .filter(|(other, c)| **other != id && !c.evicted && c.held > 0)
            .filter_map(|(&other, c)| c.stalled(now, min_rate).then(|| (c.meter.recent(now), other)))
            .collect();
        victims.sort_unstable();
        let mut evicted = 0;
        for (_, other) in victims {
            if short == 0 {
                break;
            }
            if let Some(c) = st.conns.get_mut(&other) {
                short = short.saturating_sub(c.held);
                c.evict();
                evicted += 1;
            }
        }
        drop(st);
        self.stats.connections_evicted.fetch_add(evicted, Ordering::Relaxed);
        Ok(false)
    }

    /// Lets eviction abort connection `id`'s task (see [`Ticket::id`]).
    pub fn set_abort(&self, id: u64, abort: AbortHandle) {
        if let Some(c) = self.lock().conns.get_mut(&id) {
            if c.evicted {
                abort.abort();
            }
            c.abort = Some(abort);
        }
    }

    fn update(&self, id: u64, f: impl FnOnce(&mut Conn)) {
        if let Some(c) = self.lock().conns.get_mut(&id) {
            f(c);
        }
    }
}

/// A connection's place in [`Streams`]; dropping it (when the connection's
/// task ends or is aborted) frees the slot and the budget it held.
#[derive(Debug)]
pub struct Ticket {
    streams: Arc<Streams>,
    id: u64,
}

impl Ticket {
    /// The connection's id in its [`Streams`].
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Whether the connection was evicted.
    pub fn is_evicted(&self) -> bool {
        self.streams.lock().conns.get(&self.id).is_none_or(|c| c.evicted)
    }

    fn record(&self, n: usize) {
        self.record_at(n, Instant::now());
    }

    fn record_at(&self, n: usize, now: Instant) {
        self.streams.update(self.id, |c| c.meter.record(now, n));
    }

    fn enter(&self, phase: Phase, verified: bool) {
        self.enter_at(phase, verified, Instant::now());
    }

    fn enter_at(&self, phase: Phase, verified: bool, now: Instant) {
        self.streams.update(self.id, |c| {
            c.phase = phase;
            c.since = now;
            c.verified |= verified;
        });
    }

    /// Takes `n` more bytes of budget for the frame being read; waits for
    /// them if the budget is spent and nothing can be evicted.
    async fn reserve(&self, n: usize) -> io::Result<()> {
        loop {
            let released = self.streams.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if self.streams.try_reserve(self.id, n, Instant::now())? {
                return Ok(());
            }
            // Stalled holders may only be evicted later: look again then.
            let _ = tokio::time::timeout(METER_WINDOW / 4, released).await;
        }
    }

    /// Moves the budget held by the frame just read into a [`Charge`].
    fn take_charge(&self) -> Charge {
        let mut bytes = 0;
        self.streams.update(self.id, |c| bytes = std::mem::take(&mut c.held));
        Charge {
            streams: self.streams.clone(),
            bytes,
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        {
            let mut st = self.streams.lock();
            let held = st.conns.remove(&self.id).map_or(0, |c| c.held);
            st.used -= held;
        }
        self.streams.released.notify_waiters();
    }
}

fn timed_out(what: &'static str) -> impl FnOnce(tokio::time::error::Elapsed) -> io::Error {
    move |_| io::Error::new(io::ErrorKind::TimedOut, what)
}

/// Reads into `buf` until it is full; `Ok(false)` if the stream ended
/// before the first byte.
async fn read_exact_or_end<S: AsyncRead + Unpin>(stream: &mut S, buf: &mut [u8], ticket: &Ticket) -> io::Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = stream.read(&mut buf[filled..]).await?;
        if n == 0 {
            return match filled {
                0 => Ok(false),
                _ => Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "stream closed inside a frame",
                )),
            };
        }
        ticket.record(n);
        filled += n;
    }
    Ok(true)
}

/// Reads frames from an admitted connection until it closes, handing each
/// to `out`.
///
/// Each frame's length and header must arrive within
/// [`StreamLimits::header_timeout`]; the length is checked against
/// [`StreamLimits::max_frame`] and the header against the overlay's current
/// [`HeaderFilter`] before a byte of the body is buffered (a refused header
/// is reported as [`Incoming::Refused`] and ends the connection). The body
/// is buffered as it arrives, in steps taken from the shared budget, so a
/// peer holds only as much as it has sent. Stops with an error on a refused
/// frame, [`StreamLimits::idle_timeout`] without data inside a frame, or
/// [`StreamLimits::deadline`] in all.
pub async fn read_frames<S: AsyncRead + Unpin>(
    mut stream: S,
    from: SocketAddr,
    ticket: &Ticket,
    filter: &tokio::sync::watch::Receiver<HeaderFilter>,
    out: &tokio::sync::mpsc::Sender<Incoming>,
) -> io::Result<()> {
    let limits = ticket.streams.limits.clone();
    let stats = ticket.streams.stats.clone();
    let read_all = async {
        loop {
            let mut head = [0u8; 4 + HEADER_LEN];
            let (prefix, header) = head.split_at_mut(4);
            let started = async {
                if !read_exact_or_end(&mut stream, prefix, ticket).await? {
                    return Ok(None);
                }
                let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
                if len > limits.max_frame {
                    return Ok(Some(Err(WireError::FrameTooLarge {
                        len,
                        max: limits.max_frame,
                    })));
                }
                if len < HEADER_LEN {
                    return Ok(Some(Err(WireError::Truncated { len, min: HEADER_LEN })));
                }
                if !read_exact_or_end(&mut stream, header, ticket).await? {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "stream closed inside a frame",
                    ));
                }
                // The borrow is not held across an await.
                let checked = filter.borrow().check(FrameKind::Stream, len, header).map(|_| len);
                Ok(Some(checked))
            };
            let len = match tokio::time::timeout(limits.header_timeout, started)
                .await
                .map_err(timed_out("no frame header in time"))??
            {
                None => return Ok(()),
                Some(Ok(len)) => len,
                Some(Err(error)) => {
                    stats.frames_refused.fetch_add(1, Ordering::Relaxed);
                    let message = error.to_string();
                    // Never waits: when the queue is full the counter above
                    // is all that is kept.
                    let _ = out.try_send(Incoming::Refused { from, error });
                    return Err(io::Error::new(io::ErrorKind::InvalidData, message));
                }
            };
            ticket.enter(Phase::Body, true);
            // One allocation for the frame, its pages touched (and charged)
            // only as the body arrives: no copies while it grows, and a
            // large frame goes back to the system whole when dropped.
            let mut bytes: Vec<u8> = Vec::new();
            bytes
                .try_reserve_exact(len)
                .map_err(|_| io::Error::new(io::ErrorKind::OutOfMemory, "no memory for a frame"))?;
            let mut filled = 0;
            while filled < len {
                if filled == bytes.len() {
                    // Grow in steps (64 KiB, doubling, at most 4 MiB at a
                    // time), each taken from the budget first.
                    let step = bytes.len().clamp(64 << 10, 4 << 20);
                    let target = len.min(bytes.len() + step);
                    ticket.reserve(target - bytes.len()).await?;
                    bytes.resize(target, 0);
                    if filled == 0 {
                        bytes[..HEADER_LEN].copy_from_slice(header);
                        filled = HEADER_LEN;
                        continue;
                    }
                }
                let n = tokio::time::timeout(limits.idle_timeout, stream.read(&mut bytes[filled..]))
                    .await
                    .map_err(timed_out("stream idle too long"))??;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "stream closed inside a frame",
                    ));
                }
                ticket.record(n);
                filled += n;
            }
            let frame = Frame {
                from,
                bytes,
                _charge: ticket.take_charge(),
            };
            ticket.enter(Phase::Header, false);
            out.send(Incoming::Frame(frame))
                .await
                .map_err(|_| io::Error::other("the overlay stopped"))?;
        }
    };
    tokio::time::timeout(limits.deadline, read_all)
        .await
        .map_err(timed_out("stream open too long"))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumormill_wire::{Codec, Keyring, Security};
    use tokio::sync::{mpsc, watch};

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    fn streams(limits: StreamLimits) -> (Arc<Streams>, Arc<TransportStats>) {
        let stats = Arc::new(TransportStats::default());
        (Streams::new(limits, stats.clone()), stats)
    }

    fn count(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    #[test]
    fn connections_are_capped_per_source_and_idle_strangers_make_room() {
        let limits = StreamLimits {
            max_connections: 3,
            max_per_source: 2,
            ..StreamLimits::default()
        };
        let (s, stats) = streams(limits);
        let t0 = Instant::now();
        let (a1, _) = s.admit(ip(1), t0).unwrap();
        let (a2, _) = s.admit(ip(1), t0 + Duration::from_millis(1)).unwrap();
        assert_eq!(s.admit(ip(1), t0).unwrap_err(), Refusal::PerSource);
        // A verified connection between frames, and one inside a frame.
        a2.enter_at(Phase::Header, true, t0);
        let (b, _) = s.admit(ip(2), t0).unwrap();
        b.enter_at(Phase::Body, true, t0);
        b.record_at(1 << 20, t0);
        // Full: the one still waiting for its first header goes first…
        let (c, evicted) = s.admit(ip(3), t0 + Duration::from_millis(10)).unwrap();
        assert_eq!(evicted, 1);
        assert!(a1.is_evicted() && !a2.is_evicted() && !b.is_evicted());
        drop(a1);
        c.enter_at(Phase::Body, true, t0);
        c.record_at(1 << 20, t0);
        // …then the verified one idle between frames…
        let (d, evicted) = s.admit(ip(4), t0 + Duration::from_millis(20)).unwrap();
        assert_eq!(evicted, 1);
        assert!(a2.is_evicted());
        drop(a2);
        d.enter_at(Phase::Body, true, t0);
        d.record_at(1 << 20, t0);
        // …and never a connection receiving a frame at a good rate.
        assert_eq!(
            s.admit(ip(5), t0 + Duration::from_millis(30)).unwrap_err(),
            Refusal::Full
        );
        assert_eq!(
            (count(&stats.connections_evicted), count(&stats.connections_refused)),
            (2, 2)
        );
        assert!(!b.is_evicted() && !c.is_evicted());
    }

    #[test]
    fn a_connection_stalled_inside_a_frame_is_evicted_for_a_newcomer() {
        let limits = StreamLimits {
            max_connections: 2,
            ..StreamLimits::default()
        };
        let (s, _) = streams(limits);
        let t0 = Instant::now();
        let (slow, _) = s.admit(ip(1), t0).unwrap();
        let (fast, _) = s.admit(ip(2), t0).unwrap();
        for t in [&slow, &fast] {
            t.enter_at(Phase::Body, true, t0);
        }
        // One byte a second is no progress; 1 MiB a second is.
        for sec in 0..5u64 {
            let at = t0 + Duration::from_secs(sec);
            slow.record_at(1, at);
            fast.record_at(1 << 20, at);
        }
        // Not before it has been inside the frame for two seconds.
        assert_eq!(s.admit(ip(3), t0 + Duration::from_secs(1)).unwrap_err(), Refusal::Full);
        let (_new, evicted) = s.admit(ip(3), t0 + Duration::from_millis(4500)).unwrap();
        assert_eq!(evicted, 1);
        assert!(slow.is_evicted() && !fast.is_evicted());
    }

    #[tokio::test]
    async fn the_budget_is_shared_and_stalled_holders_give_way() {
        let limits = StreamLimits {
            buffer_budget: 1 << 20,
            max_frame: 256 << 10,
            ..StreamLimits::default()
        };
        let (s, stats) = streams(limits);
        let t0 = Instant::now();
        let mut holders = Vec::new();
        for i in 0..4 {
            let (t, _) = s.admit(ip(i), t0).unwrap();
            t.enter_at(Phase::Body, true, t0);
            assert!(s.try_reserve(t.id(), 256 << 10, t0).unwrap());
            holders.push(t);
        }
        assert_eq!(s.used(), 1 << 20);
        let (newcomer, _) = s.admit(ip(9), t0).unwrap();
        newcomer.enter_at(Phase::Body, true, t0);
        // Fresh holders are not evicted: the newcomer waits.
        assert!(!s.try_reserve(newcomer.id(), 64 << 10, t0).unwrap());
        assert!(holders.iter().all(|h| !h.is_evicted()));
        // Once they stalled, one is evicted (enough for 64 KiB)…
        let later = t0 + Duration::from_secs(3);
        holders[3].record_at(1 << 20, later);
        assert!(!s.try_reserve(newcomer.id(), 64 << 10, later).unwrap());
        let evicted: Vec<bool> = holders.iter().map(Ticket::is_evicted).collect();
        assert_eq!(evicted.iter().filter(|e| **e).count(), 1, "{evicted:?}");
        assert!(!evicted[3], "the one still receiving stays");
        assert_eq!(count(&stats.connections_evicted), 1);
        // …and its bytes come back when its task drops the ticket.
        let gone = evicted.iter().position(|e| *e).unwrap();
        drop(holders.remove(gone));
        assert!(s.try_reserve(newcomer.id(), 64 << 10, later).unwrap());
        assert!(s.used() <= 1 << 20);
        drop(holders);
        drop(newcomer);
        assert_eq!((s.used(), s.open()), (0, 0));
    }

    #[test]
    fn one_source_holds_at_most_its_share() {
        let limits = StreamLimits {
            buffer_budget: 1 << 20,
            max_frame: 256 << 10,
            ..StreamLimits::default()
        };
        assert_eq!(limits.source_share(), 512 << 10);
        let (s, _) = streams(limits);
        let t0 = Instant::now();
        let a: Vec<Ticket> = (0..3).map(|_| s.admit(ip(1), t0).unwrap().0).collect();
        assert!(s.try_reserve(a[0].id(), 256 << 10, t0).unwrap());
        assert!(s.try_reserve(a[1].id(), 256 << 10, t0).unwrap());
        assert!(!s.try_reserve(a[2].id(), 1, t0).unwrap(), "over its share");
        let (b, _) = s.admit(ip(2), t0).unwrap();
        assert!(s.try_reserve(b.id(), 256 << 10, t0).unwrap(), "others still get theirs");
    }

    /// A listener on loopback whose connections are read as the driver
    /// reads them.
    async fn listen(
        limits: StreamLimits,
        filter: HeaderFilter,
    ) -> (SocketAddr, Arc<Streams>, mpsc::Receiver<Incoming>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (s, _) = streams(limits);
        let (tx, rx) = mpsc::channel(16);
        let (filter_tx, filter_rx) = watch::channel(filter);
        let table = s.clone();
        tokio::spawn(async move {
            let _keep = filter_tx;
            while let Ok((stream, from)) = listener.accept().await {
                let Ok((ticket, _)) = table.admit(from.ip(), Instant::now()) else {
                    continue;
                };
                let (tx, filter) = (tx.clone(), filter_rx.clone());
                let id = ticket.id();
                let task = tokio::spawn(async move {
                    let _ = read_frames(stream, from, &ticket, &filter, &tx).await;
                });
                table.set_abort(id, task.abort_handle());
            }
        });
        (addr, s, rx)
    }

    fn codec(overlay: u32, key: &[u8]) -> Codec {
        Codec::new(overlay, 1, 1, 0x21, Security::Encrypted(Keyring::new(key).unwrap()))
    }

    /// A frame prefix announcing `len` bytes, then a header sealed by `c`.
    fn frame_start(c: &mut Codec, len: usize) -> Vec<u8> {
        let sealed = c.seal(FrameKind::Stream, b"x").unwrap();
        let mut out = (len as u32).to_be_bytes().to_vec();
        out.extend_from_slice(&sealed[..HEADER_LEN]);
        out
    }

    async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        for _ in 0..200 {
            if done() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("not {what} within 2 s");
    }

    #[tokio::test]
    async fn a_frame_with_a_foreign_header_is_refused_before_its_body() {
        let key = [4u8; 32];
        let (addr, s, mut rx) = listen(StreamLimits::default(), codec(7, &key).header_filter()).await;
        for (mut sender, why) in [
            (codec(7, &[5u8; 32]), "unknown key"),
            (codec(8, &key), "for overlay"),
            (Codec::new(7, 1, 1, 0x22, Security::Plaintext), "plain-text"),
        ] {
            let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
            // 32 MiB announced; 1 MiB of it sent.
            conn.write_all(&frame_start(&mut sender, 32 << 20)).await.unwrap();
            let _ = conn.write_all(&vec![0u8; 1 << 20]).await;
            let Some(Incoming::Refused { error, .. }) = rx.recv().await else {
                panic!("no refusal for {why}");
            };
            assert!(error.to_string().contains(why), "{error}");
            assert_eq!(s.used(), 0, "nothing buffered for {why}");
        }
        wait_for("all connections closed", || s.open() == 0).await;
    }

    #[tokio::test]
    async fn frames_pass_whole_and_the_budget_bounds_incomplete_ones() {
        let key = [4u8; 32];
        let limits = StreamLimits {
            buffer_budget: 1 << 20,
            max_frame: 512 << 10,
            ..StreamLimits::default()
        };
        let (addr, s, mut rx) = listen(limits, codec(7, &key).header_filter()).await;
        let mut attacker = codec(7, &key);
        // Eight connections from one address announce 512 KiB frames and
        // try to send 384 KiB of each, then stall.
        let mut conns = Vec::new();
        for _ in 0..8 {
            let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
            conn.write_all(&frame_start(&mut attacker, 512 << 10)).await.unwrap();
            let (_r, mut w) = conn.into_split();
            conns.push(tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(10), w.write_all(&vec![1u8; 384 << 10])).await;
                w
            }));
        }
        wait_for("the attacker's share to be held", || s.used() >= 512 << 10).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(s.used() <= 512 << 10, "one source holds at most half: {}", s.used());
        // A member from another address still gets a whole frame through.
        let mut member = codec(7, &key);
        let body = vec![7u8; 100_000];
        let frame = member.seal(FrameKind::Stream, &body).unwrap();
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let mut conn = sock.connect(addr).await.unwrap();
        conn.write_all(&rumormill_wire::encode_frame(&frame)).await.unwrap();
        conn.shutdown().await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(2), rx.recv()).await.unwrap();
        let Some(Incoming::Frame(f)) = got else {
            panic!("expected the frame, got {got:?}");
        };
        assert_eq!(f.bytes, frame);
        assert!(s.used() <= 1 << 20);
        drop(f);
        for c in conns {
            c.abort();
        }
    }

    #[tokio::test]
    async fn a_connection_that_sends_no_header_is_closed_quickly() {
        let limits = StreamLimits {
            header_timeout: Duration::from_millis(200),
            ..StreamLimits::default()
        };
        let (addr, s, _rx) = listen(limits, HeaderFilter::plaintext(7)).await;
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        conn.write_all(b"RM").await.unwrap();
        wait_for("admitted", || s.open() == 1).await;
        let mut buf = [0u8; 1];
        let closed = tokio::time::timeout(Duration::from_secs(2), conn.read(&mut buf)).await;
        assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "closed: {closed:?}");
        wait_for("the slot freed", || s.open() == 0).await;
    }
}

//! The tokio driver: one task per overlay that feeds the sans-IO
//! [`Overlay`] with datagrams, stream frames and timer expiries, and sends
//! what it asks to send. No protocol logic lives here.
//!
//! ```no_run
//! # async fn f() -> std::io::Result<()> {
//! use rumormill::driver::{Driver, DriverOptions};
//! use rumormill::transport::TokioNet;
//! use rumormill_core::{Config, Identity, Overlay, Security};
//!
//! let options = DriverOptions::new("127.0.0.1:0".parse().unwrap());
//! let handle = Driver::start(TokioNet, options, |addr| {
//!     let now = tokio::time::Instant::now().into_std();
//!     Overlay::new(Config::new_local(), Identity::new("a", addr, 1), Security::Plaintext, 1, now)
//! })
//! .await?;
//! let members = handle.call(|overlay, _now| overlay.live_count()).await;
//! # Ok(()) }
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rumormill_core::{FrameKind, Notification, Overlay};
use rumormill_wire::HeaderFilter;
use tokio::sync::{Semaphore, broadcast, mpsc, oneshot, watch};

use crate::transport::{self, Datagrams, Incoming, Listener, Net, StreamLimits, Streams};

/// Largest UDP payload read.
const RECV_BUFFER: usize = 65_536;
/// Outgoing stream connections open at once.
const MAX_STREAMS: usize = 256;
/// Longest a graceful leave may take before the driver stops anyway.
pub const LEAVE_TIMEOUT: Duration = Duration::from_secs(5);

/// The driver has stopped (its overlay was deleted or the agent is exiting).
#[derive(Debug, Clone, Copy, thiserror::Error, PartialEq, Eq)]
#[error("the overlay is stopped")]
pub struct Stopped;

/// How the driver binds.
#[derive(Debug, Clone)]
pub struct DriverOptions {
    /// UDP and TCP address (port 0: any free port, the same for both).
    pub bind: SocketAddr,
    /// Address announced to others; `None`: derived from `bind`.
    pub advertise: Option<SocketAddr>,
    /// Limits on incoming stream connections (their `max_frame` is the
    /// largest stream frame accepted).
    pub streams: StreamLimits,
    /// Name in log lines (the overlay's).
    pub label: String,
    /// Keep a lossless stream of events for [`OverlayHandle::take_event_stream`].
    /// A gateway candidate needs one: its Raft records
    /// ([`Notification::Raft`]) go there alone, and its votes leave only
    /// once the stream's consumer has saved them and called
    /// [`Overlay::raft_persisted`].
    pub event_stream: bool,
}

impl DriverOptions {
    /// Options with defaults for everything but the bind address.
    pub fn new(bind: SocketAddr) -> DriverOptions {
        DriverOptions {
            bind,
            advertise: None,
            streams: StreamLimits::default(),
            label: String::new(),
            event_stream: false,
        }
    }
}

pub use crate::transport::TransportStats;

type Call = Box<dyn FnOnce(&mut Overlay, Instant) + Send>;

enum Command {
    Call(Call),
    Shutdown { leave: bool, done: oneshot::Sender<()> },
}

/// A running overlay: call into it, watch its events, stop it.
#[derive(Debug, Clone)]
pub struct OverlayHandle {
    commands: mpsc::Sender<Command>,
    events: broadcast::Sender<Notification>,
    stream: Arc<std::sync::Mutex<Option<mpsc::UnboundedReceiver<Notification>>>>,
    addr: SocketAddr,
    stats: Arc<TransportStats>,
}

impl OverlayHandle {
    /// Runs `f` on the overlay inside its task, with the current time.
    pub async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Overlay, Instant) -> T + Send + 'static,
    ) -> Result<T, Stopped> {
        let (tx, rx) = oneshot::channel();
        let call: Call = Box::new(move |overlay, now| {
            let _ = tx.send(f(overlay, now));
        });
        self.commands.send(Command::Call(call)).await.map_err(|_| Stopped)?;
        rx.await.map_err(|_| Stopped)
    }

    /// Events of the overlay from now on, for observers: a slow observer
    /// misses some (see [`broadcast::Receiver`]). Observers get membership
    /// changes, delivery reports and updates of the members' own reserved
    /// data other than luggage; application values, luggage and event
    /// payloads go only to the event stream (read values from the store).
    pub fn subscribe(&self) -> broadcast::Receiver<Notification> {
        self.events.subscribe()
    }

    /// Every event of the overlay since it started, none missed, for the
    /// one consumer that must see them all (the agent's event pump), when
    /// [`DriverOptions::event_stream`] was set. The first call takes the
    /// stream; later calls get `None`.
    pub fn take_event_stream(&self) -> Option<mpsc::UnboundedReceiver<Notification>> {
        self.stream.lock().ok()?.take()
    }

    /// The address the member announces.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Transport counters.
    pub fn transport_stats(&self) -> &TransportStats {
        &self.stats
    }

    /// Stops the overlay; with `leave`, first leaves gracefully (at most
    /// [`LEAVE_TIMEOUT`]). Returns once the task has stopped.
    pub async fn shutdown(&self, leave: bool) {
        let (done, rx) = oneshot::channel();
        if self.commands.send(Command::Shutdown { leave, done }).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// Starts overlay tasks.
#[derive(Debug)]
pub struct Driver;

impl Driver {
    /// Binds UDP and TCP on `options.bind`, builds the overlay with the
    /// address to announce, and starts its task.
    pub async fn start<N: Net>(
        net: N,
        options: DriverOptions,
        build: impl FnOnce(SocketAddr) -> Overlay,
    ) -> std::io::Result<OverlayHandle> {
        let (udp, listener, bound) = bind_pair(&net, options.bind).await?;
        let addr = options.advertise.unwrap_or_else(|| advertise_for(bound));
        let overlay = build(addr);
        let (commands, commands_rx) = mpsc::channel(256);
        let (events, _) = broadcast::channel(4096);
        let (stream_tx, stream_rx) = match options.event_stream {
            true => {
                let (tx, rx) = mpsc::unbounded_channel();
                (Some(tx), Some(rx))
            }
            false => (None, None),
        };
        // Frame count bound; their bytes are bounded by the streams' budget.
        let (frames_tx, frames_rx) = mpsc::channel(1024);
        let stats = Arc::new(TransportStats::default());
        let (filter, filter_rx) = watch::channel(overlay.header_filter());
        let streams = Streams::new(options.streams.clone(), stats.clone());
        let accept = tokio::spawn(accept_loop(listener, frames_tx, streams, filter_rx, stats.clone()));
        let task = Task {
            net,
            udp,
            overlay,
            commands: commands_rx,
            frames: frames_rx,
            filter,
            events: events.clone(),
            stream: stream_tx,
            stats: stats.clone(),
            outgoing: Arc::new(Semaphore::new(MAX_STREAMS)),
        };
        let span = tracing::info_span!("overlay", name = %options.label);
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                // The UDP socket goes with the task, the listener with the
                // accept loop: both are closed before anyone is told the
                // overlay stopped, so its port can be bound again at once.
                let done = task.run().await;
                accept.abort();
                let _ = accept.await;
                if let Some(done) = done {
                    let _ = done.send(());
                }
            },
            span,
        ));
        Ok(OverlayHandle {
            commands,
            events,
            stream: Arc::new(std::sync::Mutex::new(stream_rx)),
            addr,
            stats,
        })
    }
}

/// Binds UDP and TCP on one port. With port 0 the system picks the UDP
/// port, and the same number may be taken for TCP (an outgoing
/// connection's local port, say): then another pick is tried.
async fn bind_pair<N: Net>(net: &N, bind: SocketAddr) -> std::io::Result<(N::Udp, N::Listener, SocketAddr)> {
    let mut attempts = 0;
    loop {
        let udp = net.bind_udp(bind).await?;
        let bound = udp.local_addr()?;
        match net.bind_tcp(bound).await {
            Ok(listener) => return Ok((udp, listener, bound)),
            Err(e) if bind.port() == 0 && e.kind() == std::io::ErrorKind::AddrInUse && attempts < 32 => {
                attempts += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// The announced address for a bound one: a wildcard becomes the address
/// of the interface with the default route (found by a routing lookup; a
/// UDP `connect` sends nothing), else loopback.
fn advertise_for(bound: SocketAddr) -> SocketAddr {
    if !bound.ip().is_unspecified() {
        return bound;
    }
    let routed = std::net::UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| s.connect("192.0.2.1:9").and_then(|()| s.local_addr()))
        .map(|a| a.ip())
        .ok()
        .filter(|ip| !ip.is_unspecified());
    SocketAddr::new(routed.unwrap_or([127, 0, 0, 1].into()), bound.port())
}

fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// Accepts connections as [`Streams`] admits them, each read by its own
/// task.
async fn accept_loop<L: Listener>(
    listener: L,
    frames: mpsc::Sender<Incoming>,
    streams: Arc<Streams>,
    filter: watch::Receiver<HeaderFilter>,
    stats: Arc<TransportStats>,
) {
    loop {
        let (stream, from) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let ticket = match streams.admit(from.ip(), Instant::now()) {
            Ok((ticket, _evicted)) => ticket,
            Err(refusal) => {
                tracing::debug!(%from, %refusal, "connection refused");
                continue;
            }
        };
        let (frames, filter, stats) = (frames.clone(), filter.clone(), stats.clone());
        let id = ticket.id();
        let task = tokio::spawn(async move {
            let result = transport::read_frames(stream, from, &ticket, &filter, &frames).await;
            if let Err(e) = result {
                stats.stream_errors.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%from, error = %e, "incoming stream failed");
            }
            drop(ticket);
        });
        // Eviction aborts the task: its ticket and buffers drop with it.
        streams.set_abort(id, task.abort_handle());
    }
}

struct Task<N: Net> {
    net: N,
    udp: N::Udp,
    overlay: Overlay,
    commands: mpsc::Receiver<Command>,
    frames: mpsc::Receiver<Incoming>,
    /// What stream readers check headers against; follows the keyring.
    filter: watch::Sender<HeaderFilter>,
    events: broadcast::Sender<Notification>,
    /// The lossless copy, while its receiver lives.
    stream: Option<mpsc::UnboundedSender<Notification>>,
    stats: Arc<TransportStats>,
    outgoing: Arc<Semaphore>,
}

impl<N: Net> Task<N> {
    /// Runs until told to stop; returns whom to tell once the sockets are
    /// closed.
    async fn run(mut self) -> Option<oneshot::Sender<()>> {
        let mut buf = vec![0u8; RECV_BUFFER];
        let mut leaving: Option<(tokio::time::Instant, oneshot::Sender<()>)> = None;
        loop {
            self.flush().await;
            if let Some((deadline, _)) = &leaving {
                if self.overlay.is_closed() || tokio::time::Instant::now() >= *deadline {
                    return leaving.take().map(|(_, done)| done);
                }
            }
            let timeout = self.overlay.poll_timeout();
            let leave_deadline = leaving.as_ref().map(|(d, _)| *d);
            tokio::select! {
                received = self.udp.recv_from(&mut buf) => match received {
                    Ok((n, from)) => self.overlay.handle_datagram(now(), from, &buf[..n]),
                    // ICMP port unreachable from an earlier send, and the like.
                    Err(e) => tracing::trace!(error = %e, "udp receive error"),
                },
                Some(incoming) = self.frames.recv() => match incoming {
                    // The frame's budget is given back when it drops, after
                    // the overlay has handled it.
                    Incoming::Frame(frame) => self.overlay.handle_stream(now(), frame.from, &frame.bytes),
                    Incoming::Refused { error, .. } => self.overlay.count_refused_frame(error),
                },
                () = sleep_until(timeout) => {
                    let now = now();
                    self.overlay.handle_wall_clock(now, crate::agent::wall());
                    self.overlay.handle_timeout(now);
                }
                () = sleep_until(leave_deadline.map(|d| d.into_std())) => {}
                command = self.commands.recv() => match command {
                    Some(Command::Call(f)) => {
                        f(&mut self.overlay, now());
                        // A call may have changed the keyring.
                        let current = self.overlay.header_filter();
                        self.filter.send_if_modified(|f| {
                            let changed = *f != current;
                            if changed {
                                *f = current;
                            }
                            changed
                        });
                    }
                    Some(Command::Shutdown { leave: true, done }) if leaving.is_none() => {
                        self.overlay.leave(now());
                        leaving = Some((tokio::time::Instant::now() + LEAVE_TIMEOUT, done));
                    }
                    Some(Command::Shutdown { done, .. }) => {
                        self.flush().await;
                        return Some(done);
                    }
                    None => return None,
                },
            }
        }
    }

    /// Sends what the overlay queued and publishes its events.
    async fn flush(&mut self) {
        while let Some(t) = self.overlay.poll_transmit() {
            match t.kind {
                FrameKind::Datagram => {
                    if let Err(e) = self.udp.send_to(&t.payload, t.to).await {
                        self.stats.send_errors.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(to = %t.to, error = %e, "datagram not sent");
                    }
                }
                FrameKind::Stream => {
                    let Ok(permit) = self.outgoing.clone().try_acquire_owned() else {
                        self.stats.streams_dropped.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(to = %t.to, "too many streams in flight: frame dropped");
                        continue;
                    };
                    let net = self.net.clone();
                    let stats = self.stats.clone();
                    tokio::spawn(async move {
                        if let Err(e) = transport::send_frame(&net, t.to, &t.payload).await {
                            stats.stream_errors.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(to = %t.to, error = %e, "stream frame not sent");
                        }
                        drop(permit);
                    });
                }
            }
        }
        while let Some(event) = self.overlay.poll_notification() {
            if let Notification::Member { change, member } = &event {
                tracing::info!(member = %member.name, addr = %member.addr, ?change, "member");
            }
            // Values of updates and payloads of events are handed on only
            // where they are used, so that no queue holds on to them after
            // the store let them go: the event pump gets events, reports,
            // membership and luggage changes; observers (a broadcast that
            // keeps its last 4,096 entries) get membership changes,
            // reports and updates of the members' own data except luggage.
            let (pump, observers) = match &event {
                Notification::Update(u) => (
                    rumormill_core::luggage::changed(&u.update).is_some(),
                    // Desired keyrings carry secrets: the keyring watcher
                    // hears of them as `Notification::Keys`, nobody else
                    // needs their values.
                    u.update.key.starts_with(rumormill_core::reserved::PREFIX)
                        && !matches!(
                            rumormill_core::reserved::ReservedKey::parse(&u.update.key),
                            Some(
                                rumormill_core::reserved::ReservedKey::Luggage { .. }
                                    | rumormill_core::reserved::ReservedKey::DesiredKeyring { .. }
                            )
                        ),
                ),
                // Raft records go to the pump alone, which makes each
                // durable before it acknowledges it (Raft's rule).
                Notification::Event(_) | Notification::Raft(_) => (true, false),
                Notification::Member { .. }
                | Notification::Rack(_)
                | Notification::Report(_)
                | Notification::StoreSynced
                | Notification::Keys(_) => (true, true),
            };
            if pump
                && let Some(s) = &self.stream
                && s.send(event.clone()).is_err()
            {
                self.stream = None; // nobody consumes it
            }
            if observers {
                let _ = self.events.send(event);
            }
        }
    }
}

/// Sleeps until `at`, or forever without one (a `select!` branch that
/// never fires).
pub(crate) async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
        None => std::future::pending().await,
    }
}

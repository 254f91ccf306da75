//! Sockets behind a trait, so that the same driver runs on the operating
//! system's network ([`TokioNet`]) and on turmoil's simulated one in tests.
//!
//! Datagrams go over UDP; stream frames (full-state exchanges, large update
//! batches) over short TCP connections, length-delimited
//! ([`rumormill_wire::encode_frame`]), with timeouts and size limits.
//!
//! ```no_run
//! # async fn f() -> std::io::Result<()> {
//! use rumormill::transport::{Datagrams, Net, TokioNet};
//! let udp = TokioNet.bind_udp("127.0.0.1:0".parse().unwrap()).await?;
//! let to: std::net::SocketAddr = "127.0.0.1:7950".parse().unwrap();
//! Datagrams::send_to(&udp, b"hello", to).await?;
//! # Ok(()) }
//! ```

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

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
    /// Opens a stream connection.
    fn connect(&self, addr: SocketAddr) -> impl Future<Output = io::Result<Self::Stream>> + Send;
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

    async fn connect(&self, addr: SocketAddr) -> io::Result<Self::Stream> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }

    async fn resolve(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
        Ok(tokio::net::lookup_host((host, port)).await?.collect())
    }
}

/// Sends a frame over one new connection: connect, write, close; each step
/// bounded by [`STREAM_TIMEOUT`].
pub async fn send_frame<N: Net>(net: &N, to: SocketAddr, frame: &[u8]) -> io::Result<()> {
    let mut stream = tokio::time::timeout(STREAM_TIMEOUT, net.connect(to))
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

/// Reads frames from a connection until it closes, passing each to `out`
/// tagged with `from`; stops with an error on a frame over `max` bytes, a
/// malformed length, [`STREAM_TIMEOUT`] without data, or
/// [`CONNECTION_DEADLINE`] in all (a peer trickling bytes cannot hold a
/// connection slot for long).
pub async fn read_frames<S: AsyncRead + Unpin>(
    mut stream: S,
    from: SocketAddr,
    max: usize,
    out: &tokio::sync::mpsc::Sender<(SocketAddr, Vec<u8>)>,
) -> io::Result<()> {
    let read_all = async {
        let mut decoder = rumormill_wire::FrameDecoder::new(max);
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = tokio::time::timeout(STREAM_TIMEOUT, stream.read(&mut buf))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "stream idle too long"))??;
            if n == 0 {
                return if decoder.buffered() == 0 {
                    Ok(())
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "stream closed inside a frame",
                    ))
                };
            }
            decoder.extend(&buf[..n]);
            while let Some(frame) = decoder
                .next_frame()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?
            {
                out.send((from, frame))
                    .await
                    .map_err(|_| io::Error::other("the overlay stopped"))?;
            }
        }
    };
    tokio::time::timeout(CONNECTION_DEADLINE, read_all)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "stream open too long"))?
}

//! Clients of the pod servers ([`crate::servers`]): a TCP connect that reads the greeting,
//! and UDP questions on a connected socket. Used by the tests (on threads inside a client
//! namespace) and by the `lbt-client` binary.
use std::{
    io::{self, BufRead, BufReader},
    net::{SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    os::fd::{FromRawFd, OwnedFd},
    time::Duration,
};

/// What a pod server says first: its name and the client address it saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Greeting {
    /// The server's name (`pod-1`, `pod-1-metrics`, ...).
    pub pod: String,
    /// The client address the server saw (`IP:PORT`).
    pub peer: String,
}

impl Greeting {
    /// Parses `NAME PEER`.
    pub fn parse(line: &str) -> io::Result<Self> {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some(pod), Some(peer)) => Ok(Self {
                pod: pod.to_owned(),
                peer: peer.to_owned(),
            }),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("not a greeting: {line:?}"),
            )),
        }
    }
}

/// An open connection to a pod server that echoes each line back as `POD: LINE`: what the
/// tests hold across agent restarts and map updates.
pub struct Held {
    conn: TcpStream,
    reader: BufReader<TcpStream>,
    /// The pod that greeted the connection.
    pub pod: String,
}

impl Held {
    /// Holds `conn`, greeted by `greeting`.
    pub fn new(conn: TcpStream, greeting: Greeting) -> io::Result<Self> {
        Ok(Self {
            reader: BufReader::new(conn.try_clone()?),
            conn,
            pod: greeting.pod,
        })
    }

    /// Sends `msg` and checks that the greeting pod echoes it; panics otherwise.
    pub fn exchange(&mut self, msg: &str) {
        use std::io::Write as _;
        self.conn
            .write_all(format!("{msg}\n").as_bytes())
            .unwrap_or_else(|e| panic!("send {msg}: {e}"));
        let mut answer = String::new();
        self.reader
            .read_line(&mut answer)
            .unwrap_or_else(|e| panic!("after {msg}: {e}"));
        assert_eq!(answer, format!("{}: {msg}\n", self.pod));
    }
}

/// Connects to `addr` (giving up after `timeout`) and returns the open connection, with
/// `timeout` as its read timeout, and the server's greeting.
pub fn tcp_connect(addr: SocketAddr, timeout: Duration) -> io::Result<(TcpStream, Greeting)> {
    greeted(TcpStream::connect_timeout(&addr, timeout)?, timeout)
}

/// [`tcp_connect`] from local port `port`. The socket is bound with `SO_REUSEADDR`, so that
/// several sockets of one host may use the same port towards different destinations.
pub fn tcp_connect_from(
    port: u16,
    addr: SocketAddrV4,
    timeout: Duration,
) -> io::Result<(TcpStream, Greeting)> {
    let fd = bound_socket(libc::SOCK_STREAM, port)?;
    // On Linux, the send timeout bounds a blocking connect.
    let stream = TcpStream::from(fd);
    stream.set_write_timeout(Some(timeout))?;
    let sin = sockaddr(addr);
    // SAFETY: valid socket and a sockaddr_in of the size given.
    let rc = unsafe {
        libc::connect(
            std::os::fd::AsRawFd::as_raw_fd(&stream),
            (&sin as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        // A connect cut short by the timeout reports EINPROGRESS.
        return Err(if e.raw_os_error() == Some(libc::EINPROGRESS) {
            io::ErrorKind::TimedOut.into()
        } else {
            e
        });
    }
    greeted(stream, timeout)
}

/// [`udp_connect`] from local port `port`, bound with `SO_REUSEADDR` as in
/// [`tcp_connect_from`].
pub fn udp_connect_from(port: u16, addr: SocketAddr, timeout: Duration) -> io::Result<UdpSocket> {
    let socket = UdpSocket::from(bound_socket(libc::SOCK_DGRAM, port)?);
    socket.connect(addr)?;
    socket.set_read_timeout(Some(timeout))?;
    Ok(socket)
}

fn sockaddr(addr: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*addr.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// An IPv4 socket of type `kind` bound to `0.0.0.0:port` with `SO_REUSEADDR`.
fn bound_socket(kind: i32, port: u16) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call.
    let raw = unsafe { libc::socket(libc::AF_INET, kind | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let on: libc::c_int = 1;
    let sin = sockaddr(SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, port));
    // SAFETY: valid socket; option value and address of the sizes given.
    let ok = unsafe {
        libc::setsockopt(
            raw,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        ) == 0
            && libc::bind(
                raw,
                (&sin as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            ) == 0
    };
    if !ok {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Reads the server's greeting from a connected `stream`, with `timeout` as its read
/// timeout from now on.
fn greeted(stream: TcpStream, timeout: Duration) -> io::Result<(TcpStream, Greeting)> {
    stream.set_read_timeout(Some(timeout))?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    if line.is_empty() {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok((stream, Greeting::parse(&line)?))
}

/// Connects to `addr`, reads the greeting and closes.
pub fn tcp_hello(addr: SocketAddr, timeout: Duration) -> io::Result<Greeting> {
    tcp_connect(addr, timeout).map(|(_, g)| g)
}

/// A UDP socket connected to `addr`: it only accepts datagrams from `addr`, so an answer
/// proves the reply's source was translated back to the address asked.
pub fn udp_connect(addr: SocketAddr, timeout: Duration) -> io::Result<UdpSocket> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket.connect(addr)?;
    socket.set_read_timeout(Some(timeout))?;
    Ok(socket)
}

/// Sends one datagram on a connected socket and returns the answer. An ICMP port
/// unreachable for an earlier datagram surfaces here as `ConnectionRefused`.
pub fn udp_ask(socket: &UdpSocket) -> io::Result<Greeting> {
    socket.send(b"hi")?;
    let mut buf = [0u8; 512];
    let n = socket.recv(&mut buf)?;
    Greeting::parse(&String::from_utf8_lossy(&buf[..n]))
}

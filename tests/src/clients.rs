//! Clients of the pod servers ([`crate::servers`]): a TCP connect that reads the greeting,
//! and UDP questions on a connected socket. Used by the tests (on threads inside a client
//! namespace) and by the `lbt-client` binary.
use std::{
    io::{self, BufRead, BufReader},
    net::{SocketAddr, TcpStream, UdpSocket},
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

/// Connects to `addr` (giving up after `timeout`) and returns the open connection, with
/// `timeout` as its read timeout, and the server's greeting.
pub fn tcp_connect(addr: SocketAddr, timeout: Duration) -> io::Result<(TcpStream, Greeting)> {
    let stream = TcpStream::connect_timeout(&addr, timeout)?;
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

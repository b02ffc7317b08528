//! `lbt-client`: asks the pod servers (`tests::servers`) from inside a client namespace
//! (`ip netns exec NS lbt-client ...`) and prints what they answer.
//!
//! - `lbt-client tcp ADDR:PORT [--count N] [--timeout-ms MS]`: N connections, one
//!   greeting line each (`pod-2 10.200.1.2:41234`: the pod, and the client it saw).
//! - `lbt-client udp ADDR:PORT [--count N] [--timeout-ms MS]`: N datagrams on one
//!   connected socket, one answer line each.
//! - `lbt-client hold ADDR:PORT [--timeout-ms MS]`: one connection kept open; prints the
//!   greeting, then sends each line read from stdin and prints the answer.
//! - `lbt-client udp-sendto ADDR:PORT [--count N] [--timeout-ms MS]`: N datagrams from one
//!   unconnected socket (`sendto`/`recvfrom`); each answer line ends with
//!   `from=SOURCE`, the source address the application was given.
//!
//! With `--peer`, the `tcp` and `udp` lines end with `peer=ADDR`, the socket's peer as
//! `getpeername(2)` gives it.
//!
//! Load modes for the benchmark (`cargo xtask bench datapath`), each bounded by N
//! operations and S seconds (whichever comes first), each printing `MODE COUNT SECONDS`:
//!
//! - `crr`: connect, read one line, close (TCP_CRR; COUNT = connections);
//! - `rr`: 64-byte request, 64-byte answer on one connection to an echo server (TCP_RR;
//!   COUNT = transactions);
//! - `udp-rr`: the same over UDP (UDP_RR; a datagram lost is sent again after
//!   --timeout-ms);
//! - `stream`: bulk writes to a sink that answers the byte count it received when the
//!   client stops sending (TCP_STREAM; COUNT = bytes received).
//!
//! Exits with 1 at the first error (printed with its kind, e.g. `connection refused`).
use std::{
    io::{self, BufRead, BufReader, Write},
    net::SocketAddr,
    process::ExitCode,
    time::{Duration, Instant},
};

use tests::clients::{Greeting, tcp_connect, tcp_hello, udp_ask, udp_connect};

const USAGE: &str = "usage: lbt-client (tcp|udp|udp-sendto|hold|crr|rr|udp-rr|stream) ADDR:PORT [--count N] [--seconds S] [--timeout-ms MS] [--peer]";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mode, addr) = match (args.first(), args.get(1).map(|a| a.parse::<SocketAddr>())) {
        (Some(mode), Some(Ok(addr))) => (mode.as_str(), addr),
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let (mut count, mut timeout) = (1u32, Duration::from_secs(2));
    let mut seconds = None;
    let mut show_peer = false;
    let mut rest = args[2..].iter();
    while let Some(flag) = rest.next() {
        if flag == "--peer" {
            show_peer = true;
            continue;
        }
        let value = rest.next().and_then(|v| v.parse::<u64>().ok());
        match (flag.as_str(), value) {
            ("--count", Some(n)) => count = n.try_into().unwrap_or(u32::MAX),
            ("--timeout-ms", Some(ms)) => timeout = Duration::from_millis(ms),
            ("--seconds", Some(s)) => seconds = Some(Duration::from_secs(s)),
            _ => {
                eprintln!("lbt-client: bad argument {flag}\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    let result = match mode {
        "tcp" => (0..count).try_for_each(|_| {
            let (stream, g) = tcp_connect(addr, timeout)?;
            println!(
                "{} {}{}",
                g.pod,
                g.peer,
                peer(show_peer, stream.peer_addr())?
            );
            Ok(())
        }),
        "udp" => udp_connect(addr, timeout).and_then(|socket| {
            (0..count).try_for_each(|_| {
                let g = udp_ask(&socket)?;
                println!(
                    "{} {}{}",
                    g.pod,
                    g.peer,
                    peer(show_peer, socket.peer_addr())?
                );
                Ok(())
            })
        }),
        "udp-sendto" => udp_sendto(addr, count, timeout),
        "hold" => hold(addr, timeout),
        "rr" => rr(
            addr,
            count,
            seconds.unwrap_or(Duration::from_secs(10)),
            timeout,
        ),
        "udp-rr" => udp_rr(
            addr,
            count,
            seconds.unwrap_or(Duration::from_secs(10)),
            timeout,
        ),
        "stream" => stream(addr, seconds.unwrap_or(Duration::from_secs(10)), timeout),
        "crr" => crr(
            addr,
            count,
            seconds.unwrap_or(Duration::from_secs(10)),
            timeout,
        ),
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lbt-client: {addr}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// ` peer=ADDR` when asked for.
fn peer(show: bool, addr: io::Result<SocketAddr>) -> io::Result<String> {
    Ok(if show {
        format!(" peer={}", addr?)
    } else {
        String::new()
    })
}

/// Datagrams from one unconnected socket; prints each answer and where it came from.
fn udp_sendto(addr: SocketAddr, count: u32, timeout: Duration) -> io::Result<()> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
    socket.set_read_timeout(Some(timeout))?;
    let mut buf = [0u8; 512];
    for _ in 0..count {
        socket.send_to(b"hi", addr)?;
        let (n, from) = socket.recv_from(&mut buf)?;
        let g = Greeting::parse(&String::from_utf8_lossy(&buf[..n]))?;
        println!("{} {} from={from}", g.pod, g.peer);
    }
    Ok(())
}

/// One connection: the greeting, then a line exchanged for each line of stdin.
fn hold(addr: SocketAddr, timeout: Duration) -> io::Result<()> {
    let (stream, greeting) = tcp_connect(addr, timeout)?;
    println!("{} {}", greeting.pod, greeting.peer);
    let mut writer = stream.try_clone()?;
    let mut answers = BufReader::new(stream);
    for line in io::stdin().lock().lines() {
        writeln!(writer, "{}", line?)?;
        let mut answer = String::new();
        if answers.read_line(&mut answer)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        print!("{answer}");
        io::stdout().flush()?;
    }
    Ok(())
}

/// Connect, read the greeting, close; repeated until `count` connections or `limit`.
fn crr(addr: SocketAddr, count: u32, limit: Duration, timeout: Duration) -> io::Result<()> {
    let started = Instant::now();
    let mut done = 0u32;
    while done < count && started.elapsed() < limit {
        tcp_hello(addr, timeout)?;
        done += 1;
    }
    println!("crr {done} {:.6}", started.elapsed().as_secs_f64());
    Ok(())
}

/// Size of a request and of its answer in `rr` and `udp-rr`.
const RR_BYTES: usize = 64;

/// Request/response on one TCP connection to an echo server.
fn rr(addr: SocketAddr, count: u32, limit: Duration, timeout: Duration) -> io::Result<()> {
    use std::io::Read as _;
    let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_nodelay(true)?;
    let (request, mut answer) = ([7u8; RR_BYTES], [0u8; RR_BYTES]);
    let started = Instant::now();
    let mut done = 0u32;
    while done < count && started.elapsed() < limit {
        stream.write_all(&request)?;
        stream.read_exact(&mut answer)?;
        done += 1;
    }
    println!("rr {done} {:.6}", started.elapsed().as_secs_f64());
    Ok(())
}

/// Request/response over UDP; a lost datagram is sent again after `timeout`.
fn udp_rr(addr: SocketAddr, count: u32, limit: Duration, timeout: Duration) -> io::Result<()> {
    let socket = udp_connect(addr, timeout)?;
    let (request, mut answer) = ([7u8; RR_BYTES], [0u8; RR_BYTES]);
    let started = Instant::now();
    let mut done = 0u32;
    while done < count && started.elapsed() < limit {
        socket.send(&request)?;
        match socket.recv(&mut answer) {
            Ok(_) => done += 1,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e),
        }
    }
    println!("udp-rr {done} {:.6}", started.elapsed().as_secs_f64());
    Ok(())
}

/// Bulk writes for `limit`, then the sink's count of what it received.
fn stream(addr: SocketAddr, limit: Duration, timeout: Duration) -> io::Result<()> {
    use std::io::Read as _;
    let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout)?;
    let chunk = vec![7u8; 64 * 1024];
    let started = Instant::now();
    while started.elapsed() < limit {
        stream.write_all(&chunk)?;
    }
    stream.shutdown(std::net::Shutdown::Write)?;
    stream.set_read_timeout(Some(timeout + limit))?;
    let mut received = [0u8; 8];
    stream.read_exact(&mut received)?;
    println!(
        "stream {} {:.6}",
        u64::from_be_bytes(received),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

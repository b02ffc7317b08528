//! Pod servers that answer with their name and the client address they saw.
//!
//! A TCP server greets each connection with `NAME PEER_IP:PEER_PORT\n`, then answers each
//! line it reads with `NAME: LINE\n`. A UDP server answers each datagram with
//! `NAME PEER_IP:PEER_PORT`. Tests run them as threads of the test process whose sockets
//! were created inside a pod namespace ([`tcp`], [`udp`]); the demo runs them as
//! `lbt-server` processes ([`spawn`]), which serve with the same code.
use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use crate::{
    netns::{NetNs, command_in},
    process::Proc,
    workspace_binary,
};

/// Running server threads; stopping them is dropping this.
pub struct Server {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Serves `tcp` listeners and `udp` sockets (already bound, wherever they were created) as
/// pod `name`, until the returned guard is dropped.
pub fn serve(name: &str, tcp: Vec<TcpListener>, udp: Vec<UdpSocket>) -> Server {
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for listener in tcp {
        listener.set_nonblocking(true).expect("nonblocking");
        let (name, stop) = (name.to_owned(), stop.clone());
        threads.push(std::thread::spawn(move || {
            accept_loop(&listener, &name, &stop)
        }));
    }
    for socket in udp {
        // The timeout lets the loop notice `stop`.
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        let (name, stop) = (name.to_owned(), stop.clone());
        threads.push(std::thread::spawn(move || udp_loop(&socket, &name, &stop)));
    }
    Server { stop, threads }
}

/// Starts a TCP server named `name` on `0.0.0.0:port` inside `ns`.
pub fn tcp(ns: &NetNs, name: &str, port: u16) -> Server {
    let listener = ns.run(move || TcpListener::bind(("0.0.0.0", port)).expect("bind tcp"));
    serve(name, vec![listener], Vec::new())
}

/// Starts a UDP server named `name` on `0.0.0.0:port` inside `ns`.
pub fn udp(ns: &NetNs, name: &str, port: u16) -> Server {
    let socket = ns.run(move || UdpSocket::bind(("0.0.0.0", port)).expect("bind udp"));
    serve(name, Vec::new(), vec![socket])
}

/// Path of the release `lbt-server` binary (`cargo build --release -p tests --bins`);
/// integration tests use `env!("CARGO_BIN_EXE_lbt-server")` instead.
pub fn server_binary() -> PathBuf {
    workspace_binary("lbt-server")
}

/// Starts the `lbt-server` binary `bin` as pod `name` in `ns` on the given ports and waits
/// until it listens (it prints `ready` once every socket is bound).
pub fn spawn(bin: &Path, ns: &NetNs, name: &str, tcp_ports: &[u16], udp_ports: &[u16]) -> Proc {
    assert!(
        bin.exists(),
        "{} is missing: build it with `cargo build --release -p tests --bins`",
        bin.display()
    );
    let mut argv = vec![bin.display().to_string(), "--name".into(), name.into()];
    for p in tcp_ports {
        argv.extend(["--tcp".into(), p.to_string()]);
    }
    for p in udp_ports {
        argv.extend(["--udp".into(), p.to_string()]);
    }
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let mut proc = Proc::spawn(
        command_in(ns, &argv)
            .stdin(Stdio::null())
            .stdout(Stdio::piped()),
        &format!("lbt-server {name}"),
    );
    let mut line = String::new();
    let out = proc.stdout().expect("piped stdout");
    BufReader::new(out)
        .read_line(&mut line)
        .expect("read lbt-server");
    assert_eq!(line.trim(), "ready", "lbt-server {name} did not start");
    proc
}

fn accept_loop(listener: &TcpListener, name: &str, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((conn, peer)) => {
                let name = name.to_owned();
                std::thread::spawn(move || serve_tcp(conn, peer, &name));
            }
            // Nonblocking, so that `stop` is seen; also rides out transient errors
            // (ECONNABORTED, EMFILE) as a real server would.
            Err(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}

fn serve_tcp(conn: TcpStream, peer: SocketAddr, name: &str) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_secs(60)));
    let Ok(mut writer) = conn.try_clone() else {
        return;
    };
    if writer
        .write_all(format!("{name} {peer}\n").as_bytes())
        .is_err()
    {
        return;
    }
    for line in BufReader::new(conn).lines() {
        let Ok(line) = line else { return };
        if writer
            .write_all(format!("{name}: {line}\n").as_bytes())
            .is_err()
        {
            return;
        }
    }
}

fn udp_loop(socket: &UdpSocket, name: &str, stop: &AtomicBool) {
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        if let Ok((_, peer)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(format!("{name} {peer}").as_bytes(), peer);
        }
    }
}

//! Pod servers: threads of the test process with sockets bound inside a pod namespace.
//!
//! A TCP server greets each connection with `NAME PEER_IP:PEER_PORT\n`, then answers each
//! line it reads with `NAME: LINE\n`. A UDP server answers each datagram with
//! `NAME PEER_IP:PEER_PORT`. Servers stop when their guard is dropped.
use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use crate::netns::NetNs;

/// A running server; stopping it is dropping it.
pub struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts a TCP server named `name` on `0.0.0.0:port` inside `ns`.
pub fn tcp(ns: &NetNs, name: &str, port: u16) -> Server {
    let listener = ns.run(move || {
        let l = TcpListener::bind(("0.0.0.0", port)).expect("bind tcp");
        l.set_nonblocking(true).expect("nonblocking");
        l
    });
    let stop = Arc::new(AtomicBool::new(false));
    let name = name.to_owned();
    let flag = stop.clone();
    let thread = std::thread::spawn(move || {
        while !flag.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((conn, peer)) => {
                    let name = name.clone();
                    std::thread::spawn(move || serve_tcp(conn, peer, &name));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(2)),
            }
        }
    });
    Server {
        stop,
        thread: Some(thread),
    }
}

fn serve_tcp(conn: TcpStream, peer: SocketAddr, name: &str) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_secs(60)));
    let mut writer = match conn.try_clone() {
        Ok(w) => w,
        Err(_) => return,
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

/// Starts a UDP server named `name` on `0.0.0.0:port` inside `ns`.
pub fn udp(ns: &NetNs, name: &str, port: u16) -> Server {
    let socket = ns.run(move || UdpSocket::bind(("0.0.0.0", port)).expect("bind udp"));
    socket
        .set_read_timeout(Some(Duration::from_millis(50)))
        .expect("timeout");
    let stop = Arc::new(AtomicBool::new(false));
    let name = name.to_owned();
    let flag = stop.clone();
    let thread = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while !flag.load(Ordering::Relaxed) {
            if let Ok((_, peer)) = socket.recv_from(&mut buf) {
                let _ = socket.send_to(format!("{name} {peer}").as_bytes(), peer);
            }
        }
    });
    Server {
        stop,
        thread: Some(thread),
    }
}

//! `lbt-server --name NAME [--tcp PORT]... [--udp PORT]...`: a pod server as a process,
//! for topologies that outlive the process that built them (`cargo xtask demo --keep`).
//! Answers as `tests::servers` describes; prints `ready` once every socket is bound; runs
//! until killed. Start it inside a pod namespace with `ip netns exec`.
use std::{
    net::{TcpListener, UdpSocket},
    process::ExitCode,
};

fn main() -> ExitCode {
    let mut name = None;
    let (mut tcp, mut udp) = (Vec::new(), Vec::new());
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next();
        match (flag.as_str(), value) {
            ("--name", Some(v)) => name = Some(v),
            ("--tcp", Some(v)) => match v.parse::<u16>() {
                Ok(p) => tcp.push(p),
                Err(e) => return usage(&format!("--tcp {v}: {e}")),
            },
            ("--udp", Some(v)) => match v.parse::<u16>() {
                Ok(p) => udp.push(p),
                Err(e) => return usage(&format!("--udp {v}: {e}")),
            },
            _ => return usage(&format!("unexpected argument {flag}")),
        }
    }
    let Some(name) = name else {
        return usage("--name is required");
    };
    if tcp.is_empty() && udp.is_empty() {
        return usage("give at least one --tcp or --udp port");
    }
    let mut listeners = Vec::new();
    for p in tcp {
        match TcpListener::bind(("0.0.0.0", p)) {
            Ok(l) => listeners.push(l),
            Err(e) => return fail(&format!("bind tcp {p}: {e}")),
        }
    }
    let mut sockets = Vec::new();
    for p in udp {
        match UdpSocket::bind(("0.0.0.0", p)) {
            Ok(s) => sockets.push(s),
            Err(e) => return fail(&format!("bind udp {p}: {e}")),
        }
    }
    let _server = tests::servers::serve(&name, listeners, sockets);
    println!("ready");
    loop {
        std::thread::park();
    }
}

fn usage(problem: &str) -> ExitCode {
    eprintln!(
        "lbt-server: {problem}\nusage: lbt-server --name NAME [--tcp PORT]... [--udp PORT]..."
    );
    ExitCode::from(2)
}

fn fail(problem: &str) -> ExitCode {
    eprintln!("lbt-server: {problem}");
    ExitCode::FAILURE
}

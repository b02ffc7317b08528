//! `lbt-client`: asks the pod servers (`tests::servers`) from inside a client namespace
//! (`ip netns exec NS lbt-client ...`) and prints what they answer.
//!
//! - `lbt-client tcp ADDR:PORT [--count N] [--timeout-ms MS]`: N connections, one
//!   greeting line each (`pod-2 10.200.1.2:41234`: the pod, and the client it saw).
//! - `lbt-client udp ADDR:PORT [--count N] [--timeout-ms MS]`: N datagrams on one
//!   connected socket, one answer line each.
//! - `lbt-client hold ADDR:PORT [--timeout-ms MS]`: one connection kept open; prints the
//!   greeting, then sends each line read from stdin and prints the answer.
//!
//! Exits with 1 at the first error (printed with its kind, e.g. `connection refused`).
use std::{
    io::{self, BufRead, BufReader, Write},
    net::SocketAddr,
    process::ExitCode,
    time::Duration,
};

use tests::clients::{tcp_connect, tcp_hello, udp_ask, udp_connect};

const USAGE: &str = "usage: lbt-client (tcp|udp|hold) ADDR:PORT [--count N] [--timeout-ms MS]";

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
    let mut rest = args[2..].iter();
    while let Some(flag) = rest.next() {
        let value = rest.next().and_then(|v| v.parse::<u64>().ok());
        match (flag.as_str(), value) {
            ("--count", Some(n)) => count = n.try_into().unwrap_or(u32::MAX),
            ("--timeout-ms", Some(ms)) => timeout = Duration::from_millis(ms),
            _ => {
                eprintln!("lbt-client: bad argument {flag}\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    let result = match mode {
        "tcp" => (0..count).try_for_each(|_| {
            let g = tcp_hello(addr, timeout)?;
            println!("{} {}", g.pod, g.peer);
            Ok(())
        }),
        "udp" => udp_connect(addr, timeout).and_then(|socket| {
            (0..count).try_for_each(|_| {
                let g = udp_ask(&socket)?;
                println!("{} {}", g.pod, g.peer);
                Ok(())
            })
        }),
        "hold" => hold(addr, timeout),
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

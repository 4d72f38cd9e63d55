//! `lab-pod --name NAME [--port PORT] [--exit-on-stdin-eof]`: the server every lab pod runs.
//!
//! Listens on 0.0.0.0:PORT (default 5000) for TCP and UDP. HTTP requests get `200 OK` with the
//! body `NAME\n` (keep-alive supported); UDP datagrams get `NAME` back, without a newline. Prints
//! `ready` on stdout once both sockets are bound, and nothing else there. With
//! `--exit-on-stdin-eof` it exits when its stdin closes, i.e. when the lab that started it is gone.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, UdpSocket};
use std::process::ExitCode;

use vipx_lab::pod_server::{serve_tcp, serve_udp};

const USAGE: &str = "usage: lab-pod --name NAME [--port PORT] [--exit-on-stdin-eof]";

struct Args {
    name: String,
    port: u16,
    exit_on_stdin_eof: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut name = None;
    let mut port = 5000;
    let mut exit_on_stdin_eof = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--name" => name = Some(args.next().ok_or("--name needs a value")?),
            "--port" => {
                let value = args.next().ok_or("--port needs a value")?;
                port = value.parse().map_err(|_| format!("bad port {value:?}"))?;
            }
            "--exit-on-stdin-eof" => exit_on_stdin_eof = true,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(Args {
        name: name.ok_or("--name is required")?,
        port,
        exit_on_stdin_eof,
    })
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("lab-pod: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lab-pod: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> std::io::Result<()> {
    let addr = (Ipv4Addr::UNSPECIFIED, args.port);
    let tcp = TcpListener::bind(addr)?;
    let udp = UdpSocket::bind(addr)?;
    let mut stdout = std::io::stdout();
    writeln!(stdout, "ready")?;
    stdout.flush()?;

    let name = args.name;
    std::thread::scope(|scope| {
        let udp = scope.spawn(|| serve_udp(&name, &udp));
        let tcp = scope.spawn(|| serve_tcp(&name, &tcp));
        if args.exit_on_stdin_eof {
            // Read until EOF; what arrives does not matter, only that the writer went away.
            let _ = std::io::stdin().lock().read_to_end(&mut Vec::new());
            std::process::exit(0);
        }
        let tcp = tcp.join().expect("TCP server panicked");
        let udp = if udp.is_finished() {
            udp.join().expect("UDP server panicked")
        } else {
            Ok(())
        };
        tcp.and(udp)
    })
}

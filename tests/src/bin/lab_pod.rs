//! `lab-pod --name NAME [--address ADDR] [--port PORT] [--workers N] [--sink-port PORT | --no-sink]
//! [--exit-on-stdin-eof]`: the server every lab pod runs (and host-network backends, with
//! `--address` set to their node's IP).
//!
//! Listens on ADDR:PORT (default 0.0.0.0:5000) for TCP and UDP. HTTP requests get `200 OK` with the
//! body `NAME\n` (keep-alive supported); UDP datagrams get `NAME` back, without a newline (`size N` and `count` requests:
//! see `vipx_lab::pod_server::udp_reply`). N
//! workers (default 4) accept HTTP connections and answer first requests inline; connections that
//! stay open move to threads of their own (see `vipx_lab::pod_server`). Unless `--no-sink` is
//! given, 0.0.0.0:SINK (TCP) reads and discards everything sent to it, for bulk throughput tests.
//! Without `--sink-port`, SINK is 5009, and the sink is left out when that is PORT or is already
//! taken (by another lab-pod in the same namespace); with it, failing to bind SINK is fatal. Prints `ready` on stdout once every socket is bound, and nothing else there.
//! With `--exit-on-stdin-eof` it exits when its stdin closes, i.e. when the lab that started it is
//! gone.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, TcpListener, UdpSocket};
use std::process::ExitCode;

use vipx_lab::pod_server::{DEFAULT_WORKERS, SINK_PORT, serve_sink, serve_tcp, serve_udp};

const USAGE: &str = "usage: lab-pod --name NAME [--address ADDR] [--port PORT] [--workers N] \
                     [--sink-port PORT | --no-sink] [--exit-on-stdin-eof]";

/// Where the discard listener goes.
enum Sink {
    /// [`SINK_PORT`], unless that is the HTTP port or already taken in this namespace.
    Default,
    /// This port, or fail.
    Port(u16),
    Off,
}

struct Args {
    name: String,
    address: Ipv4Addr,
    port: u16,
    workers: usize,
    sink: Sink,
    exit_on_stdin_eof: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut name = None;
    let mut address = Ipv4Addr::UNSPECIFIED;
    let mut port = 5000;
    let mut workers = DEFAULT_WORKERS;
    let mut sink = Sink::Default;
    let mut exit_on_stdin_eof = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--name" => name = Some(args.next().ok_or("--name needs a value")?),
            "--address" => {
                let value = args.next().ok_or("--address needs a value")?;
                address = value
                    .parse()
                    .map_err(|_| format!("bad IPv4 address {value:?}"))?;
            }
            "--port" => {
                let value = args.next().ok_or("--port needs a value")?;
                port = value.parse().map_err(|_| format!("bad port {value:?}"))?;
            }
            "--workers" => {
                let value = args.next().ok_or("--workers needs a value")?;
                workers = value
                    .parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or_else(|| format!("bad worker count {value:?}"))?;
            }
            "--sink-port" => {
                let value = args.next().ok_or("--sink-port needs a value")?;
                let port = value.parse().map_err(|_| format!("bad port {value:?}"))?;
                sink = Sink::Port(port);
            }
            "--no-sink" => sink = Sink::Off,
            "--exit-on-stdin-eof" => exit_on_stdin_eof = true,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    match sink {
        Sink::Port(sink) if sink == port => {
            return Err(format!(
                "the sink port and the HTTP port are both {port}; pick another --sink-port"
            ));
        }
        Sink::Default if port == SINK_PORT => sink = Sink::Off,
        _ => {}
    }
    Ok(Args {
        name: name.ok_or("--name is required")?,
        address,
        port,
        workers,
        sink,
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
    let addr = (args.address, args.port);
    let tcp = TcpListener::bind(addr)?;
    let udp = UdpSocket::bind(addr)?;
    let sink = match args.sink {
        Sink::Off => None,
        Sink::Port(port) => Some(TcpListener::bind((args.address, port))?),
        Sink::Default => match TcpListener::bind((args.address, SINK_PORT)) {
            Ok(listener) => Some(listener),
            // Another lab-pod in this namespace (a test's extra server) has it already.
            Err(e) if e.kind() == ErrorKind::AddrInUse => {
                eprintln!(
                    "lab-pod {}: sink port {SINK_PORT} is taken; running without a sink",
                    args.name
                );
                None
            }
            Err(e) => return Err(e),
        },
    };
    let mut stdout = std::io::stdout();
    writeln!(stdout, "ready")?;
    stdout.flush()?;

    let name = args.name;
    std::thread::scope(|scope| {
        let udp = scope.spawn(|| serve_udp(&name, &udp));
        let sink = sink
            .as_ref()
            .map(|sink| scope.spawn(|| serve_sink(&name, sink)));
        let tcp = scope.spawn(|| serve_tcp(&name, &tcp, args.workers));
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
        let sink = match sink {
            Some(sink) if sink.is_finished() => sink.join().expect("sink panicked"),
            _ => Ok(()),
        };
        tcp.and(udp).and(sink)
    })
}

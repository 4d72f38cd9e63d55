//! The servers every lab pod runs (see the `lab-pod` binary): they answer with the pod's name so a
//! test can tell which backend a connection to a Service landed on.
//!
//! - TCP: a minimal HTTP/1.1 server with keep-alive. Every request, whatever its method or path, is
//!   answered `200 OK` with the body `NAME\n` (the trailing newline keeps `curl` output tidy).
//! - UDP: every datagram is answered with `NAME`, without a newline; `size N` asks for the name
//!   padded to N bytes (for replies larger than the MTU), `count` for how many datagrams the pod
//!   has answered (see [`udp_reply`]).
//! - Sink (TCP, for bulk throughput): everything received is read and discarded; nothing is ever
//!   sent back, and the connection is closed once the client has shut down its side.
//!
//! # How TCP connections are served
//!
//! A fixed pool of workers all block in `accept()` on the shared listener (the kernel wakes one of
//! them per connection) and answer the connection's first request inline, without spawning
//! anything: a short connection (connect, one request, close, the pattern load tests hammer) costs
//! no thread creation. A connection that is still open after its first response, or that has not
//! sent anything within [`FIRST_REQUEST_WAIT`], is handed to a thread of its own, so that any number
//! of keep-alive or idle connections can be open at once without starving the pool. (A client that
//! sends half a request head and stalls does hold a worker until it finishes or hangs up; lab
//! clients and load tools write each request in one go.)

use std::io::{self, BufRead, BufReader, Cursor, Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

/// A request head larger than this is refused; lab clients send a few dozen bytes.
const MAX_HEAD: usize = 16 * 1024;

/// Accepting workers `lab-pod` starts by default.
pub const DEFAULT_WORKERS: usize = 4;

/// The port `lab-pod` opens its discard (sink) listener on by default: 5000 + 9, the discard
/// protocol's port. (Not 5001: tests start extra servers there.)
pub const SINK_PORT: u16 = 5009;

/// How long a worker waits for a new connection's first bytes before handing the connection to a
/// thread of its own. Clients that write their request right after connecting (every load tool)
/// are served inline; a client that connects and waits costs a worker this much once.
pub const FIRST_REQUEST_WAIT: Duration = Duration::from_millis(20);

/// Size of the sink's read buffer.
const SINK_BUFFER: usize = 256 * 1024;

/// The two possible answers of one pod, built once.
struct Responses {
    keep_alive: Vec<u8>,
    close: Vec<u8>,
}

impl Responses {
    fn new(name: &str) -> Self {
        let body = format!("{name}\n");
        let response = |connection: &str| {
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: {connection}\r\n\r\n{body}",
                body.len()
            )
            .into_bytes()
        };
        Self {
            keep_alive: response("keep-alive"),
            close: response("close"),
        }
    }

    /// Reads one request from `reader` and answers it on `writer`; returns whether the connection
    /// stays open for another request.
    fn answer(&self, reader: &mut impl BufRead, writer: &mut impl Write) -> io::Result<bool> {
        let Some(request) = read_request(reader)? else {
            return Ok(false);
        };
        let response = if request.close {
            &self.close
        } else {
            &self.keep_alive
        };
        writer.write_all(response)?;
        writer.flush()?;
        Ok(!request.close)
    }
}

/// Serves HTTP on `listener` with `workers` accepting threads (at least one), until accepting
/// fails in every one of them; returns the first such failure.
pub fn serve_tcp(name: &str, listener: &TcpListener, workers: usize) -> io::Result<()> {
    let responses = Arc::new(Responses::new(name));
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers.max(1))
            .map(|_| {
                let responses = &responses;
                scope.spawn(move || accept_loop(name, listener, responses))
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| handle.join().expect("TCP worker panicked"))
            .fold(Ok(()), io::Result::and)
    })
}

fn accept_loop(name: &str, listener: &TcpListener, responses: &Arc<Responses>) -> io::Result<()> {
    loop {
        let (stream, peer) = match listener.accept() {
            Ok(accepted) => accepted,
            // The client gave up (reset) while the connection waited in the accept queue.
            Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => continue,
            Err(e) => return Err(e),
        };
        if let Err(e) = serve_accepted(name, stream, responses)
            && !client_went_away(&e)
        {
            eprintln!("lab-pod {name}: connection from {peer}: {e}");
        }
    }
}

/// Serves a new connection's first request inline and hands what remains of the connection, if
/// anything, to a thread of its own.
fn serve_accepted(name: &str, stream: TcpStream, responses: &Arc<Responses>) -> io::Result<()> {
    // Responses go out in one write each; without this, a pipelining client would wait for the
    // delayed ACK of the previous response.
    stream.set_nodelay(true)?;
    let leftover = if readable_within(&stream, FIRST_REQUEST_WAIT)? {
        let mut reader = BufReader::new(&stream);
        if !responses.answer(&mut reader, &mut &stream)? {
            return Ok(());
        }
        // Whatever the client already pipelined behind its first request.
        reader.buffer().to_vec()
    } else {
        Vec::new()
    };
    let name = name.to_owned();
    let responses = Arc::clone(responses);
    std::thread::spawn(move || {
        let peer = stream.peer_addr();
        let reader = BufReader::new(Cursor::new(leftover).chain(&stream));
        if let Err(e) = serve_with(&responses, reader, &stream)
            && !client_went_away(&e)
        {
            match peer {
                Ok(peer) => eprintln!("lab-pod {name}: connection from {peer}: {e}"),
                Err(_) => eprintln!("lab-pod {name}: connection: {e}"),
            }
        }
    });
    Ok(())
}

/// Whether `e` only says that the client hung up abruptly, as load generators do to the
/// connections still open when their run ends: not worth a line on stderr.
fn client_went_away(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
    )
}

/// Whether `stream` has something to read (data, or the peer's FIN) within `timeout`.
fn readable_within(stream: &TcpStream, timeout: Duration) -> io::Result<bool> {
    let mut fd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let millis = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    loop {
        // SAFETY: `fd` is one valid pollfd, and the descriptor stays open for the whole call.
        let n = unsafe { libc::poll(&mut fd, 1, millis) };
        if n >= 0 {
            return Ok(n > 0);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// The largest UDP payload an IPv4 datagram can carry.
pub const MAX_UDP_REPLY: usize = 65_507;

/// Answers every datagram on `socket` (see [`udp_reply`]), until receiving fails.
pub fn serve_udp(name: &str, socket: &UdpSocket) -> io::Result<()> {
    let mut buf = [0u8; 2048];
    // Only this loop touches it: one UDP socket, served by one thread.
    let mut served = 0u64;
    loop {
        let (n, peer) = socket.recv_from(&mut buf)?;
        // `peer`: who this pod sees the datagram from (a client's own address, or the one a
        // proxy translated it to).
        let reply = if buf[..n].trim_ascii() == b"peer" {
            peer.to_string().into_bytes()
        } else {
            udp_reply(name, &buf[..n], &mut served)
        };
        socket.send_to(&reply, peer)?;
    }
}

/// The answer to UDP request `request`; `served` counts the requests answered with the name.
///
/// - `peer` (answered by [`serve_udp`], which knows it): the sender's address and port as this
///   pod sees them.
/// - `count`: how many requests this server has answered with its name so far, in decimal. Not
///   counted itself, so a test can ask whether a datagram reached this pod without changing the
///   answer.
/// - `size N`: the name, padded with `.` to N bytes (at most [`MAX_UDP_REPLY`]; N smaller than
///   the name gives the name), so a reply larger than the MTU still says who sent it.
/// - anything else: the name.
pub fn udp_reply(name: &str, request: &[u8], served: &mut u64) -> Vec<u8> {
    let request = String::from_utf8_lossy(request);
    let request = request.trim();
    if request == "count" {
        return served.to_string().into_bytes();
    }
    *served += 1;
    let mut reply = name.as_bytes().to_vec();
    if let Some(size) = request
        .strip_prefix("size ")
        .and_then(|n| n.trim().parse::<usize>().ok())
    {
        reply.resize(size.clamp(name.len(), MAX_UDP_REPLY), b'.');
    }
    reply
}

/// Reads and discards everything sent to `listener`, one thread per connection, until accepting
/// fails. A connection is closed once the client has shut down its side, so a client that shuts
/// down writing and then waits for EOF knows every byte it sent has been read.
pub fn serve_sink(name: &str, listener: &TcpListener) -> io::Result<()> {
    loop {
        let (stream, peer) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => continue,
            Err(e) => return Err(e),
        };
        let name = name.to_owned();
        std::thread::spawn(move || {
            if let Err(e) = discard(&stream)
                && !client_went_away(&e)
            {
                eprintln!("lab-pod {name}: sink connection from {peer}: {e}");
            }
        });
    }
}

/// Reads `reader` to its end, throwing everything away; returns how many bytes that was.
fn discard(mut reader: impl Read) -> io::Result<u64> {
    let mut buf = vec![0u8; SINK_BUFFER];
    let mut total = 0u64;
    loop {
        match reader.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => total += n as u64,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Answers requests read from `reader` on `writer` until the client closes or asks to close.
#[cfg(test)]
fn serve_http(name: &str, reader: impl BufRead, writer: impl Write) -> io::Result<()> {
    serve_with(&Responses::new(name), reader, writer)
}

fn serve_with(
    responses: &Responses,
    mut reader: impl BufRead,
    mut writer: impl Write,
) -> io::Result<()> {
    while responses.answer(&mut reader, &mut writer)? {}
    Ok(())
}

struct Request {
    close: bool,
}

/// Reads one request head (and discards its body); `None` when the client closed between requests.
fn read_request(reader: &mut impl BufRead) -> io::Result<Option<Request>> {
    let mut request_line = String::new();
    if reader.read_line(&mut request_line)? == 0 {
        return Ok(None);
    }
    let http10 = request_line.trim_end().ends_with("HTTP/1.0");
    let mut close = http10;
    let mut content_length = 0usize;
    let mut head_len = request_line.len();
    loop {
        let mut line = String::new();
        let n = reader.read_line(&mut line)?;
        head_len += n;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed inside a request head",
            ));
        }
        if head_len > MAX_HEAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "request head too large",
            ));
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let Some((field, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if field.eq_ignore_ascii_case("content-length") {
            content_length = value
                .parse()
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad Content-Length"))?;
        } else if field.eq_ignore_ascii_case("connection") {
            if value.eq_ignore_ascii_case("close") {
                close = true;
            } else if value.eq_ignore_ascii_case("keep-alive") {
                close = false;
            }
        }
    }
    io::copy(
        &mut reader.by_ref().take(content_length as u64),
        &mut io::sink(),
    )?;
    Ok(Some(Request { close }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::read_response;
    use std::net::{Ipv4Addr, Shutdown};

    fn serve(input: &str) -> String {
        let mut out = Vec::new();
        serve_http("backend-1", input.as_bytes(), &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn answers_each_keep_alive_request_until_the_client_closes() {
        let out = serve(
            "GET / HTTP/1.1\r\nHost: x\r\n\r\nPOST /p HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET / HTTP/1.1\r\n\r\n",
        );
        let mut reader = out.as_bytes();
        for _ in 0..3 {
            assert_eq!(read_response(&mut reader).unwrap(), "backend-1\n");
        }
        assert!(reader.is_empty(), "unexpected trailing output: {out:?}");
    }

    #[test]
    fn stops_after_connection_close() {
        let out = serve("GET / HTTP/1.1\r\nConnection: close\r\n\r\nGET / HTTP/1.1\r\n\r\n");
        assert_eq!(out.matches("HTTP/1.1 200 OK").count(), 1);
        assert!(out.contains("Connection: close\r\n"));
    }

    #[test]
    fn http10_closes_unless_keep_alive_is_asked_for() {
        let two = "GET / HTTP/1.0\r\n\r\nGET / HTTP/1.0\r\n\r\n";
        assert_eq!(serve(two).matches("200 OK").count(), 1);
        let keep = "GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET / HTTP/1.0\r\n\r\n";
        assert_eq!(serve(keep).matches("200 OK").count(), 2);
    }

    #[test]
    fn a_truncated_head_is_an_error() {
        let mut out = Vec::new();
        let err = serve_http("b", "GET / HTTP/1.1\r\nHost".as_bytes(), &mut out).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn udp_requests_get_the_name_a_padded_name_or_the_count() {
        let mut served = 0;
        assert_eq!(udp_reply("pod-a", b"count", &mut served), b"0");
        assert_eq!(udp_reply("pod-a", b"ping", &mut served), b"pod-a");
        let big = udp_reply("pod-a", b"size 3000", &mut served);
        assert_eq!(big.len(), 3000);
        assert!(big.starts_with(b"pod-a."));
        assert!(big[5..].iter().all(|&b| b == b'.'));
        assert_eq!(udp_reply("pod-a", b"size 2", &mut served), b"pod-a");
        assert_eq!(
            udp_reply("pod-a", b"size 99999999", &mut served).len(),
            MAX_UDP_REPLY
        );
        assert_eq!(udp_reply("pod-a", b"count\n", &mut served), b"4");
    }

    #[test]
    fn discard_counts_everything_it_reads() {
        let data = vec![7u8; 3 * SINK_BUFFER + 5];
        assert_eq!(discard(data.as_slice()).unwrap(), data.len() as u64);
    }

    /// A loopback server with a pool smaller than the number of connections held open.
    fn start_server(workers: usize) -> std::net::SocketAddr {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || serve_tcp("pod", &listener, workers));
        addr
    }

    fn connect(addr: std::net::SocketAddr) -> (BufReader<TcpStream>, TcpStream) {
        let stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        (BufReader::new(stream.try_clone().unwrap()), stream)
    }

    #[test]
    fn more_keep_alive_and_idle_connections_than_workers_are_all_served() {
        let addr = start_server(2);
        // Idle ones first: they must not pin the two workers.
        let mut idle: Vec<_> = (0..4).map(|_| connect(addr)).collect();
        let mut busy: Vec<_> = (0..6).map(|_| connect(addr)).collect();
        for _ in 0..3 {
            for (reader, writer) in busy.iter_mut().chain(idle.iter_mut()) {
                writer
                    .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                    .unwrap();
                assert_eq!(read_response(reader).unwrap(), "pod\n");
            }
        }
        // Pipelined requests behind the first one survive the hand-off to a thread.
        let (mut reader, mut writer) = connect(addr);
        writer
            .write_all(b"GET / HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\nGET /3 HTTP/1.1\r\nConnection: close\r\n\r\n")
            .unwrap();
        for _ in 0..3 {
            assert_eq!(read_response(&mut reader).unwrap(), "pod\n");
        }
        let mut rest = Vec::new();
        reader.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "closed after Connection: close");
    }

    #[test]
    fn short_connections_are_answered_and_closed() {
        let addr = start_server(1);
        for _ in 0..50 {
            let (mut reader, mut writer) = connect(addr);
            writer
                .write_all(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
                .unwrap();
            assert_eq!(read_response(&mut reader).unwrap(), "pod\n");
            let mut rest = Vec::new();
            reader.read_to_end(&mut rest).unwrap();
            assert!(rest.is_empty());
        }
    }

    #[test]
    fn the_sink_closes_after_reading_everything() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || serve_sink("pod", &listener));
        let mut stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        stream.write_all(&vec![1u8; 1 << 20]).unwrap();
        stream.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "the sink never sends anything");
    }
}

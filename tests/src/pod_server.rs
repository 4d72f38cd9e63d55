//! The servers every lab pod runs (see the `lab-pod` binary): they answer with the pod's name so a
//! test can tell which backend a connection to a Service landed on.
//!
//! - TCP: a minimal HTTP/1.1 server with keep-alive. Every request, whatever its method or path, is
//!   answered `200 OK` with the body `NAME\n` (the trailing newline keeps `curl` output tidy).
//! - UDP: every datagram is answered with `NAME`, without a newline.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};

/// A request head larger than this is refused; lab clients send a few dozen bytes.
const MAX_HEAD: usize = 16 * 1024;

/// Serves HTTP on `listener`, one thread per connection, until accepting fails.
pub fn serve_tcp(name: &str, listener: &TcpListener) -> io::Result<()> {
    loop {
        let (stream, peer) = listener.accept()?;
        let name = name.to_owned();
        std::thread::spawn(move || {
            if let Err(e) = serve_connection(&name, &stream) {
                eprintln!("lab-pod {name}: connection from {peer}: {e}");
            }
        });
    }
}

/// Answers every datagram on `socket` with `name`, until receiving fails.
pub fn serve_udp(name: &str, socket: &UdpSocket) -> io::Result<()> {
    let mut buf = [0u8; 2048];
    loop {
        let (_, peer) = socket.recv_from(&mut buf)?;
        socket.send_to(name.as_bytes(), peer)?;
    }
}

fn serve_connection(name: &str, stream: &TcpStream) -> io::Result<()> {
    // Responses go out in one write each; without this, a pipelining client would wait for the
    // delayed ACK of the previous response.
    stream.set_nodelay(true)?;
    serve_http(name, BufReader::new(stream), stream)
}

/// Answers requests read from `reader` on `writer` until the client closes or asks to close.
pub(crate) fn serve_http(
    name: &str,
    mut reader: impl BufRead,
    mut writer: impl Write,
) -> io::Result<()> {
    let body = format!("{name}\n");
    while let Some(request) = read_request(&mut reader)? {
        let connection = if request.close { "close" } else { "keep-alive" };
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: {connection}\r\n\r\n{body}",
            body.len()
        );
        writer.write_all(response.as_bytes())?;
        writer.flush()?;
        if request.close {
            break;
        }
    }
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
}

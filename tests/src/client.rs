//! Clients that talk to lab pods and Services from inside a namespace.
//!
//! Every function makes its sockets inside the namespace it is given (see [`in_netns`]), so the
//! traffic takes that namespace's routes: from the client pod, a Service VIP is reached through the
//! node, where vipx translates it.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::netns::in_netns;

/// Timeout used by [`KeepAlive::connect`] for connecting and for each request.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// One HTTP `GET /` over a new TCP connection from namespace `ns`; returns the body, which for a
/// lab pod is its name followed by `\n`. The connection is closed afterwards.
pub fn http_get(ns: &str, addr: SocketAddr, timeout: Duration) -> Result<String> {
    let mut conn =
        in_netns(ns, || connect(addr, timeout))?.with_context(|| format!("from namespace {ns}"))?;
    conn.request(false)
        .with_context(|| format!("HTTP GET http://{addr}/ from namespace {ns}"))
}

/// Sends one UDP datagram from namespace `ns` to `addr` and returns the reply (a lab pod's name,
/// without a newline).
///
/// The socket is connected, so only a reply whose source is `addr` itself is accepted: a reply
/// that comes back with the backend's address instead of the Service's is a failure, not an answer.
/// There is no retry; a lost datagram shows up as a timeout.
pub fn udp_request(ns: &str, addr: SocketAddr, timeout: Duration) -> Result<String> {
    let socket = in_netns(ns, || UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)))?
        .with_context(|| format!("binding a UDP socket in namespace {ns}"))?;
    let exchange = || -> io::Result<String> {
        socket.set_read_timeout(Some(timeout))?;
        socket.connect(addr)?;
        socket.send(b"ping")?;
        let mut buf = [0u8; 2048];
        let n = socket.recv(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    };
    exchange().with_context(|| format!("UDP request to {addr} from namespace {ns}"))
}

/// Sends `payload` in one datagram from namespace `ns` to `addr` over a connected socket and
/// returns the reply, up to 64 KiB (a `size N` request to a lab pod asks for an N-byte reply).
/// As with [`udp_request`], only a reply whose source is `addr` itself is accepted.
pub fn udp_exchange(
    ns: &str,
    addr: SocketAddr,
    payload: &[u8],
    timeout: Duration,
) -> Result<Vec<u8>> {
    let socket = in_netns(ns, || UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)))?
        .with_context(|| format!("binding a UDP socket in namespace {ns}"))?;
    let exchange = || -> io::Result<Vec<u8>> {
        socket.set_read_timeout(Some(timeout))?;
        socket.connect(addr)?;
        socket.send(payload)?;
        let mut buf = vec![0u8; 65_536];
        let n = socket.recv(&mut buf)?;
        buf.truncate(n);
        Ok(buf)
    };
    exchange().with_context(|| format!("UDP exchange with {addr} from namespace {ns}"))
}

/// How many datagrams the lab pod server at `addr` has answered (its `count` request), asked
/// from namespace `ns`.
pub fn udp_count(ns: &str, addr: SocketAddr, timeout: Duration) -> Result<u64> {
    let reply = udp_exchange(ns, addr, b"count", timeout)?;
    let text = String::from_utf8_lossy(&reply);
    text.trim()
        .parse()
        .with_context(|| format!("{addr} answered `count` with {text:?}"))
}

/// An HTTP/1.1 connection opened inside a namespace and kept open for several requests, to check
/// that an established flow keeps its backend.
pub struct KeepAlive {
    conn: Connection,
    ns: String,
    addr: SocketAddr,
}

impl KeepAlive {
    /// Opens a TCP connection to `addr` from namespace `ns`, with [`DEFAULT_TIMEOUT`].
    pub fn connect(ns: &str, addr: SocketAddr) -> Result<Self> {
        Self::connect_timeout(ns, addr, DEFAULT_TIMEOUT)
    }

    /// Opens a TCP connection to `addr` from namespace `ns`; `timeout` bounds the connect and every
    /// later request.
    pub fn connect_timeout(ns: &str, addr: SocketAddr, timeout: Duration) -> Result<Self> {
        let conn = in_netns(ns, || connect(addr, timeout))?
            .with_context(|| format!("from namespace {ns}"))?;
        Ok(Self {
            conn,
            ns: ns.to_owned(),
            addr,
        })
    }

    /// One `GET /` on the open connection; returns the body.
    pub fn request(&mut self) -> Result<String> {
        self.conn.request(true).with_context(|| {
            format!(
                "keep-alive HTTP GET http://{}/ from namespace {}",
                self.addr, self.ns
            )
        })
    }

    /// The client side of the connection, to find its flow in conntrack.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.conn.writer.local_addr()?)
    }

    /// The peer the socket reports (`getpeername`).
    pub fn peer_addr(&self) -> Result<SocketAddr> {
        Ok(self.conn.writer.peer_addr()?)
    }
}

struct Connection {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    host: SocketAddr,
}

fn connect(addr: SocketAddr, timeout: Duration) -> Result<Connection> {
    let stream = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.set_nodelay(true)?;
    Ok(Connection {
        reader: BufReader::new(stream.try_clone()?),
        writer: stream,
        host: addr,
    })
}

impl Connection {
    fn request(&mut self, keep_alive: bool) -> Result<String> {
        let connection = if keep_alive { "keep-alive" } else { "close" };
        let request = format!(
            "GET / HTTP/1.1\r\nHost: {}\r\nConnection: {connection}\r\n\r\n",
            self.host
        );
        self.writer.write_all(request.as_bytes())?;
        read_response(&mut self.reader)
    }
}

/// Reads one HTTP response with a Content-Length body (what lab pods send) and returns the body;
/// a status other than 200 is an error.
pub fn read_response(reader: &mut impl BufRead) -> Result<String> {
    let mut status = String::new();
    if reader.read_line(&mut status)? == 0 {
        bail!("connection closed before a response");
    }
    let status = status.trim_end().to_owned();
    if status.split_whitespace().nth(1) != Some("200") {
        bail!("unexpected HTTP status line {status:?}");
    }
    let mut content_length = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            bail!("connection closed inside the response head");
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((field, value)) = line.split_once(':')
            && field.eq_ignore_ascii_case("content-length")
        {
            content_length = Some(
                value
                    .trim()
                    .parse::<u64>()
                    .with_context(|| format!("bad Content-Length {value:?}"))?,
            );
        }
    }
    let len = content_length.context("response without Content-Length")?;
    let mut body = String::new();
    reader.by_ref().take(len).read_to_string(&mut body)?;
    if body.len() as u64 != len {
        bail!("response body cut short: {} of {len} bytes", body.len());
    }
    Ok(body)
}

/// One `GET path` to `127.0.0.1:port` inside namespace `ns` (vipx's health and metrics
/// servers): (status, body). Panics when nothing answers: a test asks only what must be there.
pub fn local_get(ns: &str, port: u16, path: &str) -> (u16, String) {
    let mut s = in_netns(ns, || TcpStream::connect(("127.0.0.1", port)))
        .expect("entering the namespace")
        .unwrap_or_else(|e| panic!("connecting to 127.0.0.1:{port} in {ns}: {e}"));
    s.set_read_timeout(Some(DEFAULT_TIMEOUT * 2))
        .expect("socket timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .expect("sending the request");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("reading the response");
    let (head, body) = resp.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status code");
    (status, body.to_owned())
}

/// The value of the Prometheus sample named exactly `series` (name and labels) in `metrics`.
pub fn metric_sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_body_by_content_length_and_leaves_the_rest() {
        let mut input =
            "HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nabc\nHTTP/1.1 200 OK".as_bytes();
        assert_eq!(read_response(&mut input).unwrap(), "abc\n");
        assert_eq!(input, b"HTTP/1.1 200 OK");
    }

    #[test]
    fn rejects_other_statuses_and_short_bodies() {
        let mut not_ok = "HTTP/1.1 503 Service Unavailable\r\n\r\n".as_bytes();
        assert!(read_response(&mut not_ok).is_err());
        let mut short = "HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nab".as_bytes();
        assert!(read_response(&mut short).is_err());
    }
}

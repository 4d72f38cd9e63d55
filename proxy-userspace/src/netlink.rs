//! The rtnetlink requests vipx makes itself: one request, one answer, never a dump, so a few
//! lines of framing serve instead of a netlink crate.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use anyhow::{Context, Result, bail};

const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
/// `NLA_F_NESTED | NLA_F_NET_BYTEORDER` are flags on an attribute's type, not part of it.
const NLA_TYPE_MASK: u16 = 0x3fff;

/// A `NETLINK_ROUTE` socket for a series of requests.
pub struct Rtnl {
    sock: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

impl Rtnl {
    pub fn open() -> Result<Self> {
        // SAFETY: plain socket(2); owned at once.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if raw < 0 {
            return Err(std::io::Error::last_os_error()).context("opening a netlink socket");
        }
        Ok(Self {
            // SAFETY: a descriptor we just opened and own.
            sock: unsafe { OwnedFd::from_raw_fd(raw) },
            seq: 0,
            // A link message with every statistic fits in a few KiB.
            buf: vec![0; 64 * 1024],
        })
    }

    /// Sends request `kind` (`flags` besides `NLM_F_REQUEST`) with `body` after the header and
    /// returns the answer's body after its header: empty for an acknowledgement (`NLM_F_ACK`).
    pub fn request(&mut self, kind: u16, flags: u16, body: &[u8]) -> Result<&[u8]> {
        self.seq = self.seq.wrapping_add(1);
        let len = NLMSG_HDRLEN + body.len();
        let mut msg = Vec::with_capacity(len);
        msg.extend_from_slice(&u32::try_from(len)?.to_ne_bytes());
        msg.extend_from_slice(&kind.to_ne_bytes());
        msg.extend_from_slice(&(flags | libc::NLM_F_REQUEST as u16).to_ne_bytes());
        msg.extend_from_slice(&self.seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(body);
        // SAFETY: sends a buffer we own, of its own length.
        let sent = unsafe { libc::send(self.sock.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if sent < 0 {
            return Err(std::io::Error::last_os_error()).context("sending a netlink request");
        }
        loop {
            // SAFETY: receives into a buffer we own, of its length.
            let n = unsafe {
                libc::recv(
                    self.sock.as_raw_fd(),
                    self.buf.as_mut_ptr().cast(),
                    self.buf.len(),
                    0,
                )
            };
            let n = usize::try_from(n)
                .map_err(|_| std::io::Error::last_os_error())
                .context("reading the netlink answer")?;
            if n < NLMSG_HDRLEN {
                bail!("a netlink answer of {n} bytes");
            }
            let b = &self.buf;
            let msg_len = (u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize).min(n);
            let msg_kind = u16::from_ne_bytes([b[4], b[5]]);
            let msg_seq = u32::from_ne_bytes([b[8], b[9], b[10], b[11]]);
            if msg_seq != self.seq {
                // An answer to an earlier request that timed out on our side: not ours now.
                continue;
            }
            if msg_kind == NLMSG_ERROR {
                let code = b
                    .get(NLMSG_HDRLEN..NLMSG_HDRLEN + 4)
                    .map_or(0, |c| i32::from_ne_bytes([c[0], c[1], c[2], c[3]]));
                if code != 0 {
                    bail!(
                        "the kernel refused: {}",
                        std::io::Error::from_raw_os_error(-code)
                    );
                }
                return Ok(&[]);
            }
            return Ok(&self.buf[NLMSG_HDRLEN.min(msg_len)..msg_len]);
        }
    }
}

/// Attribute `kind` holding `payload`, padded to 4 bytes.
pub fn attribute(kind: u16, payload: &[u8]) -> Vec<u8> {
    let len = 4 + payload.len();
    let mut out = Vec::with_capacity((len + 3) & !3);
    out.extend_from_slice(&(len as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(payload);
    out.resize((len + 3) & !3, 0);
    out
}

/// The attributes (type, payload) of an answer's body whose fixed part is `fixed` bytes; stops at
/// the first malformed one.
pub fn attributes(body: &[u8], fixed: usize) -> impl Iterator<Item = (u16, &[u8])> {
    let mut rest = body.get(fixed..).unwrap_or(&[]);
    std::iter::from_fn(move || {
        let len = usize::from(u16::from_ne_bytes([*rest.first()?, *rest.get(1)?]));
        let kind = u16::from_ne_bytes([*rest.get(2)?, *rest.get(3)?]) & NLA_TYPE_MASK;
        if len < 4 || len > rest.len() {
            return None;
        }
        let payload = &rest[4..len];
        rest = rest.get((len + 3) & !3..).unwrap_or(&[]);
        Some((kind, payload))
    })
}

/// An attribute's payload as a native-endian `i32`.
pub fn attribute_i32(payload: &[u8]) -> Option<i32> {
    Some(i32::from_ne_bytes(payload.get(..4)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_round_trip_and_stop_at_garbage() {
        let mut body = vec![9u8; 4];
        body.extend(attribute(37, &5i32.to_ne_bytes()));
        body.extend(attribute(3 | 0x8000, b"abc"));
        body.extend([200, 0, 1, 0]);
        let got: Vec<(u16, Vec<u8>)> = attributes(&body, 4).map(|(k, p)| (k, p.to_vec())).collect();
        assert_eq!(
            got,
            vec![(37, 5i32.to_ne_bytes().to_vec()), (3, b"abc".to_vec())]
        );
        assert_eq!(attribute_i32(&got[0].1), Some(5));
        assert_eq!(attribute_i32(b"ab"), None);
        assert_eq!(attributes(&body, 400).count(), 0);
    }

    #[test]
    fn the_loopback_link_is_asked_and_a_missing_one_refused() {
        const RTM_GETLINK: u16 = 18;
        const IFLA_IFNAME: u16 = 3;
        let mut rtnl = Rtnl::open().expect("netlink socket");
        let mut ifinfo = [0u8; 16];
        ifinfo[4..8].copy_from_slice(&1i32.to_ne_bytes());
        let body = rtnl.request(RTM_GETLINK, 0, &ifinfo).expect("lo");
        let name = attributes(body, 16)
            .find(|(k, _)| *k == IFLA_IFNAME)
            .map(|(_, p)| p.to_vec());
        assert_eq!(name.as_deref(), Some(&b"lo\0"[..]));
        ifinfo[4..8].copy_from_slice(&i32::MAX.to_ne_bytes());
        let err = rtnl.request(RTM_GETLINK, 0, &ifinfo).unwrap_err();
        assert!(format!("{err:#}").contains("No such device"), "{err:#}");
    }
}

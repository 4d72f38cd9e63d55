//! Pure packet-path logic shared by the kernel programs and host tests: header field decoding,
//! the flow hash and backend slot choice. Nothing here touches a context or a map, so it runs
//! unchanged as plain unit tests on the host.
#![cfg_attr(not(test), no_std)]

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const IPV4_MIN_HLEN: usize = 20;
pub const TCP_MIN_HLEN: usize = 20;
pub const UDP_HLEN: usize = 8;

/// Offsets inside the IPv4 header.
pub const IP_CSUM_OFF: usize = 10;
pub const IP_SADDR_OFF: usize = 12;
pub const IP_DADDR_OFF: usize = 16;
/// Offsets inside the TCP/UDP header.
pub const L4_SPORT_OFF: usize = 0;
pub const L4_DPORT_OFF: usize = 2;
pub const TCP_FLAGS_OFF: usize = 13;
pub const TCP_CSUM_OFF: usize = 16;
pub const UDP_CSUM_OFF: usize = 6;

/// Offsets inside the IPv4 header.
pub const IP_ID_OFF: usize = 4;
pub const IP_FRAG_OFF: usize = 6;
pub const IP_PROTO_OFF: usize = 9;

/// ICMP: header length, checksum offset, and the error types that quote the offending packet.
pub const ICMP_HLEN: usize = 8;
pub const ICMP_CSUM_OFF: usize = 2;
pub const ICMP_DEST_UNREACH: u8 = 3;
/// Destination unreachable, code 3: what a client's socket turns into ECONNREFUSED.
pub const ICMP_PORT_UNREACH: u8 = 3;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
pub const ICMP_PARAMETER_PROBLEM: u8 = 12;
/// An ICMP error quotes the offending IP header and at least the first 8 bytes of its payload
/// (RFC 792): enough for the ports, not always for the TCP checksum.
pub const ICMP_QUOTED_L4: usize = 8;

pub const TCP_FLAG_FIN: u8 = 0x01;
pub const TCP_FLAG_SYN: u8 = 0x02;
pub const TCP_FLAG_RST: u8 = 0x04;
pub const TCP_FLAG_ACK: u8 = 0x10;

/// IPv4 header length in bytes from the version/IHL byte, or `None` when it is not a valid
/// IPv4 header (version != 4 or IHL < 5).
#[inline(always)]
pub const fn ipv4_header_len(version_ihl: u8) -> Option<usize> {
    if version_ihl >> 4 != 4 {
        return None;
    }
    let ihl = (version_ihl & 0x0f) as usize;
    if ihl < 5 { None } else { Some(ihl * 4) }
}

/// True for any fragment (MF set or non-zero offset).
#[inline(always)]
pub const fn is_fragment(frag_off_be: [u8; 2]) -> bool {
    (u16::from_be_bytes(frag_off_be) & 0x3fff) != 0
}

/// True for a fragment other than the first (non-zero offset): it carries no L4 header, so its
/// ports come from what the first fragment recorded.
#[inline(always)]
pub const fn is_later_fragment(frag_off_be: [u8; 2]) -> bool {
    (u16::from_be_bytes(frag_off_be) & 0x1fff) != 0
}

/// ICMP types whose payload quotes the packet that caused them (and so name a flow).
#[inline(always)]
pub const fn is_icmp_error(icmp_type: u8) -> bool {
    matches!(
        icmp_type,
        ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM
    )
}

/// A SYN without ACK: the only TCP packet that should open a flow.
#[inline(always)]
pub const fn is_tcp_syn(flags: u8) -> bool {
    flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN
}

/// A FIN or RST: it ends a flow, so one that finds no conntrack entry must not create one.
#[inline(always)]
pub const fn is_tcp_close(flags: u8) -> bool {
    flags & (TCP_FLAG_FIN | TCP_FLAG_RST) != 0
}

/// The conntrack state bits (`proxy_common::CT_F_FIN`, `CT_F_RST`) a TCP packet with `flags`
/// sets on the entry of its direction.
#[inline(always)]
pub const fn ct_state_of_tcp(flags: u8) -> u32 {
    let mut bits = 0;
    if flags & TCP_FLAG_FIN != 0 {
        bits |= proxy_common::CT_F_FIN;
    }
    if flags & TCP_FLAG_RST != 0 {
        bits |= proxy_common::CT_F_RST;
    }
    bits
}

/// Bob Jenkins' lookup3 final mix: cheap (no multiplications, no loops) and spreads source
/// ports well, which is what decides the backend of a new flow.
#[inline(always)]
const fn jhash_final(mut a: u32, mut b: u32, mut c: u32) -> u32 {
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(14));
    a ^= c;
    a = a.wrapping_sub(c.rotate_left(11));
    b ^= a;
    b = b.wrapping_sub(a.rotate_left(25));
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(16));
    a ^= c;
    a = a.wrapping_sub(c.rotate_left(4));
    b ^= a;
    b = b.wrapping_sub(a.rotate_left(14));
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(24));
    c
}

const JHASH_INITVAL: u32 = 0xdead_beef;

/// Hash of a flow's 5-tuple (as on the wire). Deterministic, so a retransmitted SYN whose
/// conntrack entry was lost still lands on the same backend while the backend set is unchanged.
#[inline(always)]
pub const fn flow_hash(
    saddr: [u8; 4],
    daddr: [u8; 4],
    sport: [u8; 2],
    dport: [u8; 2],
    proto: u8,
) -> u32 {
    let init = JHASH_INITVAL
        .wrapping_add(12 << 2)
        .wrapping_add(proto as u32);
    let a = u32::from_ne_bytes(saddr).wrapping_add(init);
    let b = u32::from_ne_bytes(daddr).wrapping_add(init);
    let ports = (u16::from_ne_bytes(sport) as u32) << 16 | u16::from_ne_bytes(dport) as u32;
    let c = ports.wrapping_add(init);
    jhash_final(a, b, c)
}

/// Backend slot (1..=count) for a hash: multiply-shift instead of modulo (no division on the
/// packet path, and uniform for any count). `count` must be non-zero.
#[inline(always)]
pub const fn pick_slot(hash: u32, count: u16) -> u16 {
    (((hash as u64) * (count as u64)) >> 32) as u16 + 1
}

/// Position (0..m) in a Maglev table of size `m` for a flow hash: multiply-shift as in
/// [`pick_slot`] (no division, uniform). Userspace predicts backends with the same function.
#[inline(always)]
pub const fn maglev_index(hash: u32, m: u32) -> u32 {
    (((hash as u64) * (m as u64)) >> 32) as u32
}

/// Index in the flat Maglev array of position `pos` of table `table` (1-based; entry 0 of the
/// array holds `m`). Wrapping: an out-of-range result fails the array lookup, never panics.
#[inline(always)]
pub const fn maglev_entry(table: u32, m: u32, pos: u32) -> u32 {
    1u32.wrapping_add(table.wrapping_sub(1).wrapping_mul(m))
        .wrapping_add(pos)
}

/// The slot after `slot` (1..=count, wrapping to 1). `count` must be non-zero.
#[inline(always)]
pub const fn next_slot(slot: u16, count: u16) -> u16 {
    if slot >= count { 1 } else { slot + 1 }
}

/// Incremental update of an Internet checksum (RFC 1624, eqn. 3) for a 4-byte field that
/// changes from `old` to `new`. All values in network byte order, as in the packet. Used for the
/// IPv4 header checksum, which is always complete (no CHECKSUM_PARTIAL), so the program can
/// write it directly instead of calling a helper.
#[inline(always)]
pub const fn csum_replace4(check: [u8; 2], old: [u8; 4], new: [u8; 4]) -> [u8; 2] {
    let mut sum = (!u16::from_be_bytes(check)) as u32;
    sum += (!u16::from_be_bytes([old[0], old[1]])) as u32;
    sum += (!u16::from_be_bytes([old[2], old[3]])) as u32;
    sum += u16::from_be_bytes([new[0], new[1]]) as u32;
    sum += u16::from_be_bytes([new[2], new[3]]) as u32;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    (!(sum as u16)).to_be_bytes()
}

/// RFC 1624 incremental update for a 2-byte field (a port, or another checksum), as
/// [`csum_replace4`]. The field must sit at an even offset from the start of the checksummed data.
#[inline(always)]
pub const fn csum_replace2(check: [u8; 2], old: [u8; 2], new: [u8; 2]) -> [u8; 2] {
    let mut sum = (!u16::from_be_bytes(check)) as u32;
    sum += (!u16::from_be_bytes(old)) as u32;
    sum += u16::from_be_bytes(new) as u32;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    (!(sum as u16)).to_be_bytes()
}

/// [`csum_replace4`] on values as they sit in memory, read as native integers: the ones'
/// complement sum does not depend on byte order (RFC 1071, 2.B), so no byte is swapped. `check`
/// and the result are the checksum field's two bytes read and written the same way.
#[inline(always)]
pub const fn csum_replace4_raw(check: u16, old: u32, new: u32) -> u16 {
    let mut sum = (!check) as u32;
    sum += (!(old as u16)) as u32 + (!((old >> 16) as u16)) as u32;
    sum += (new as u16) as u32 + (new >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// [`csum_replace2`] on raw values, as [`csum_replace4_raw`].
#[inline(always)]
pub const fn csum_replace2_raw(check: u16, old: u16, new: u16) -> u16 {
    let mut sum = (!check) as u32 + (!old) as u32 + new as u32;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// The L4 checksum field after one address (`addr`: old, new) and one port (`port`) of the
/// packet changed, computed in the program where it knows how the skb carries the sum, instead
/// of two calls of the kernel's `bpf_l4_csum_replace` (~22 ns each here). `partial`
/// (CHECKSUM_PARTIAL): the field holds the pseudo-header sum alone, not complemented, which
/// takes the address change and not the port's, as the kernel's `inet_proto_csum_replace4`
/// does it; otherwise (CHECKSUM_NONE, CHECKSUM_UNNECESSARY) the field is the whole sum and takes
/// both. As the helper with `BPF_F_MARK_MANGLED_0` for UDP: a UDP sum of 0 (none) stays 0 and a
/// result of 0 is written as 0xffff. Raw values as in [`csum_replace4_raw`].
#[inline(always)]
pub const fn l4_csum_after_nat(
    check: u16,
    addr: (u32, u32),
    port: (u16, u16),
    partial: bool,
    udp: bool,
) -> u16 {
    if udp && check == 0 {
        return 0;
    }
    let c = if partial {
        !csum_replace4_raw(!check, addr.0, addr.1)
    } else {
        csum_replace2_raw(csum_replace4_raw(check, addr.0, addr.1), port.0, port.1)
    };
    if udp && c == 0 { 0xffff } else { c }
}

/// Ones' complement sum over 16-bit big-endian words, folded (RFC 1071). Used by host tests to
/// check checksums independently of the kernel helpers.
pub fn csum_fold(data: &[u8], initial: u32) -> u16 {
    let mut sum = initial as u64;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u16::from_be_bytes([c[0], c[1]]) as u64;
    }
    if let [last] = chunks.remainder() {
        sum += (*last as u64) << 8;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ihl_decoding() {
        assert_eq!(ipv4_header_len(0x45), Some(20));
        assert_eq!(ipv4_header_len(0x4f), Some(60));
        assert_eq!(ipv4_header_len(0x44), None);
        assert_eq!(ipv4_header_len(0x65), None);
    }

    #[test]
    fn fragments() {
        assert!(!is_fragment([0x40, 0x00])); // DF only
        assert!(is_fragment([0x20, 0x00])); // MF
        assert!(is_fragment([0x00, 0x10])); // offset
    }

    #[test]
    fn syn_detection() {
        assert!(is_tcp_syn(TCP_FLAG_SYN));
        assert!(!is_tcp_syn(TCP_FLAG_SYN | TCP_FLAG_ACK));
        assert!(!is_tcp_syn(TCP_FLAG_ACK));
        assert!(is_tcp_close(TCP_FLAG_FIN | TCP_FLAG_ACK));
        assert!(is_tcp_close(TCP_FLAG_RST));
        assert!(!is_tcp_close(TCP_FLAG_ACK));
        assert_eq!(ct_state_of_tcp(TCP_FLAG_ACK), 0);
        assert_eq!(
            ct_state_of_tcp(TCP_FLAG_FIN | TCP_FLAG_RST | TCP_FLAG_ACK),
            proxy_common::CT_F_FIN | proxy_common::CT_F_RST
        );
    }

    #[test]
    fn slot_always_in_range() {
        for count in [1u16, 2, 3, 10, 1000, u16::MAX] {
            for h in [0u32, 1, u32::MAX / 2, u32::MAX - 1, u32::MAX] {
                let s = pick_slot(h, count);
                assert!((1..=count).contains(&s), "h={h} count={count} slot={s}");
            }
        }
    }

    /// New connections from one client differ only in the source port; the spread over
    /// backends must still be even.
    #[test]
    fn spread_over_source_ports_is_even() {
        for count in [2u16, 3, 10] {
            let mut hits = [0u32; 11];
            let n = 100_000u32;
            for i in 0..n {
                let sport = (32768 + (i % 28000)) as u16;
                let h = flow_hash(
                    [198, 18, 64, 2 + (i / 28000) as u8],
                    [198, 19, 0, 10],
                    sport.to_be_bytes(),
                    80u16.to_be_bytes(),
                    6,
                );
                hits[pick_slot(h, count) as usize] += 1;
            }
            let expected = n / count as u32;
            for &h in &hits[1..=count as usize] {
                let dev = (h as f64 - expected as f64).abs() / expected as f64;
                assert!(dev < 0.03, "count={count} hits={hits:?}");
            }
        }
    }

    #[test]
    fn incremental_ipv4_csum_matches_full_recompute() {
        let mut hdr = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        for new in [
            [198, 18, 64, 11],
            [0, 0, 0, 0],
            [255, 255, 255, 255],
            [198, 19, 0, 10],
        ] {
            let old = [hdr[16], hdr[17], hdr[18], hdr[19]];
            let check = csum_replace4([hdr[10], hdr[11]], old, new);
            hdr[16..20].copy_from_slice(&new);
            hdr[10..12].copy_from_slice(&check);
            assert_eq!(csum_fold(&hdr, 0), 0, "after rewriting to {new:?}");
        }
    }

    #[test]
    fn raw_incremental_csums_match_the_network_order_ones() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..100_000 {
            let r = next();
            let check = [r as u8, (r >> 8) as u8];
            let old = ((r >> 16) as u32).to_ne_bytes();
            let new = (next() as u32).to_ne_bytes();
            let raw = csum_replace4_raw(
                u16::from_ne_bytes(check),
                u32::from_ne_bytes(old),
                u32::from_ne_bytes(new),
            );
            assert_eq!(raw.to_ne_bytes(), csum_replace4(check, old, new));
            let (o2, n2) = ([old[0], old[1]], [new[2], new[3]]);
            let raw = csum_replace2_raw(
                u16::from_ne_bytes(check),
                u16::from_ne_bytes(o2),
                u16::from_ne_bytes(n2),
            );
            assert_eq!(raw.to_ne_bytes(), csum_replace2(check, o2, n2));
        }
    }

    /// A TCP/UDP segment's sum recomputed from scratch after a DNAT (daddr and dport) equals
    /// the incremental one, whole (CHECKSUM_NONE) and pseudo-header only (CHECKSUM_PARTIAL).
    #[test]
    fn nat_checksums_in_place_match_a_recomputed_sum() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for i in 0..20_000 {
            let udp = i % 2 == 1;
            let proto = if udp { 17u8 } else { 6 };
            let (r, s) = (next(), next());
            let saddr = (r as u32).to_be_bytes();
            let (daddr, new_daddr) = (((r >> 32) as u32).to_be_bytes(), (s as u32).to_be_bytes());
            let (dport, new_dport) = (
                ((s >> 32) as u16).to_be_bytes(),
                ((s >> 48) as u16).to_be_bytes(),
            );
            let len = 8 + (i % 40);
            let mut seg: std::vec::Vec<u8> = (0..len).map(|_| next() as u8).collect();
            seg[2..4].copy_from_slice(&dport);
            let pseudo = |d: [u8; 4]| {
                let mut p = std::vec::Vec::from(saddr);
                p.extend_from_slice(&d);
                p.extend_from_slice(&[0, proto]);
                p.extend_from_slice(&(len as u16).to_be_bytes());
                p
            };
            let whole = |d: [u8; 4], seg: &[u8]| {
                let mut p = pseudo(d);
                p.extend_from_slice(seg);
                csum_fold(&p, 0)
            };
            let raw = |b: [u8; 4]| u32::from_ne_bytes(b);
            let rawp = |b: [u8; 2]| u16::from_ne_bytes(b);
            let before = whole(daddr, &seg);
            let mut after = seg.clone();
            after[2..4].copy_from_slice(&new_dport);
            let want = whole(new_daddr, &after);
            let got = l4_csum_after_nat(
                rawp(before.to_be_bytes()),
                (raw(daddr), raw(new_daddr)),
                (rawp(dport), rawp(new_dport)),
                false,
                udp,
            );
            // Ones' complement has two zeros (0 and 0xffff); a receiver accepts either.
            assert_eq!(
                u16::from_be_bytes(got.to_ne_bytes()) % 0xffff,
                want % 0xffff
            );
            let partial_before = !csum_fold(&pseudo(daddr), 0);
            let partial_want = !csum_fold(&pseudo(new_daddr), 0);
            let got = l4_csum_after_nat(
                rawp(partial_before.to_be_bytes()),
                (raw(daddr), raw(new_daddr)),
                (rawp(dport), rawp(new_dport)),
                true,
                udp,
            );
            assert_eq!(
                u16::from_be_bytes(got.to_ne_bytes()) % 0xffff,
                partial_want % 0xffff
            );
        }
        // UDP without a sum keeps none; a TCP sum of 0 is a sum like any other.
        assert_eq!(l4_csum_after_nat(0, (1, 2), (3, 4), false, true), 0);
        assert_eq!(l4_csum_after_nat(0, (1, 2), (3, 4), true, true), 0);
        assert_ne!(l4_csum_after_nat(0, (1, 2), (3, 4), false, false), 0);
    }

    #[test]
    fn maglev_positions_stay_in_their_table() {
        for m in [7u32, 1021, 65_521] {
            for h in [0u32, 1, u32::MAX / 2, u32::MAX] {
                assert!(maglev_index(h, m) < m, "h={h} m={m}");
            }
            assert_eq!(maglev_entry(1, m, 0), 1);
            assert_eq!(maglev_entry(2, m, m - 1), 2 * m);
        }
    }

    #[test]
    fn next_slot_wraps() {
        assert_eq!(next_slot(1, 3), 2);
        assert_eq!(next_slot(3, 3), 1);
        assert_eq!(next_slot(1, 1), 1);
    }

    #[test]
    fn fragment_kinds() {
        assert!(!is_later_fragment([0x20, 0x00])); // first: MF, offset 0
        assert!(is_later_fragment([0x20, 0xb9])); // middle
        assert!(is_later_fragment([0x00, 0xb9])); // last
        assert!(!is_later_fragment([0x40, 0x00]));
    }

    #[test]
    fn incremental_csum2_matches_full_recompute() {
        // An ICMP message: rewriting a quoted port and a quoted checksum keeps it valid.
        let mut msg = [
            3u8, 3, 0, 0, 0, 0, 0, 0, 0x9c, 0x40, 0x13, 0x88, 0x01, 0x02, 0x03, 0x04,
        ];
        let c = csum_fold(&msg, 0).to_be_bytes();
        msg[2..4].copy_from_slice(&c);
        assert_eq!(csum_fold(&msg, 0), 0);
        for (off, new) in [(10usize, [0, 80]), (12, [0xff, 0xff]), (14, [0, 0])] {
            let old = [msg[off], msg[off + 1]];
            let check = csum_replace2([msg[2], msg[3]], old, new);
            msg[off..off + 2].copy_from_slice(&new);
            msg[2..4].copy_from_slice(&check);
            assert_eq!(
                csum_fold(&msg, 0),
                0,
                "after rewriting offset {off} to {new:?}"
            );
        }
    }

    #[test]
    fn icmp_errors() {
        assert!(is_icmp_error(ICMP_DEST_UNREACH));
        assert!(is_icmp_error(ICMP_TIME_EXCEEDED));
        assert!(!is_icmp_error(0)); // echo reply
        assert!(!is_icmp_error(8)); // echo request
    }

    #[test]
    fn csum_of_known_header() {
        // RFC 1071 example-style check: an IPv4 header with its checksum folds to zero.
        let hdr = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(csum_fold(&hdr, 0), 0);
    }
}

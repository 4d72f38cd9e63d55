//! Packet fixtures through BPF_PROG_TEST_RUN on the real compiled pod program, with maps filled
//! by the real map writer. Each fixture: {description, input packet, expected verdict, expected
//! output}; rewritten fields are asserted and checksums recomputed independently (etherparse).

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
};

use aya::{
    Ebpf, TestRunOptions,
    programs::{SchedClassifier, TestRun as _},
};
use etherparse::{
    EtherType, Ethernet2Header, IpNumber, Ipv4Header, Ipv4Options, TcpHeader, UdpHeader,
};
use proxy_common::{BACKEND_F_ACTIVE, CtKey4, IPPROTO_TCP, IPPROTO_UDP, prog_names};
use vipx::{
    desired::{Protocol, ServicePortName},
    loader::{self, MapSizes},
    maps::{L4Addr, MapWriter, Target, TargetFrontend},
};

const TC_ACT_OK: i32 = 0;
const TC_ACT_SHOT: i32 = 2;

const CLIENT: [u8; 4] = [198, 18, 64, 2];
const VIP: [u8; 4] = [198, 19, 0, 10];
const VIP_EMPTY: [u8; 4] = [198, 19, 0, 11];
const BE1: [u8; 4] = [198, 18, 64, 11];
const BE2: [u8; 4] = [198, 18, 64, 12];

fn privileged() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI is set but this test cannot load BPF programs (not root)"
        );
        eprintln!("skipping: needs root (CAP_BPF, CAP_NET_ADMIN)");
    }
    root
}

/// Loaded object with maps pinned in a unique directory that is removed on drop.
struct Loaded {
    ebpf: Ebpf,
    writer: MapWriter,
    pin_dir: PathBuf,
}

impl Drop for Loaded {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

fn addr(a: [u8; 4], port: u16, proto: u8) -> L4Addr {
    L4Addr {
        addr: Ipv4Addr::from(a),
        port,
        proto,
    }
}

fn frontend(name: &str, proto: Protocol, slots: Vec<L4Addr>) -> TargetFrontend {
    TargetFrontend {
        service: ServicePortName {
            namespace: "default".into(),
            name: name.into(),
            port_name: String::new(),
            protocol: proto,
        },
        flags: proxy_common::SVC_F_CLUSTER_IP,
        affinity_timeout_s: 0,
        slots,
    }
}

fn load(backends_tcp: &[[u8; 4]]) -> Loaded {
    static N: AtomicU32 = AtomicU32::new(0);
    let pin_dir = PathBuf::from(loader::BPFFS).join(format!(
        "vipx-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let sizes = MapSizes {
        services: 1024,
        backends: 1024,
        revnat: 256,
        conntrack: 4096,
    };
    let mut ebpf = loader::load(&pin_dir, sizes).expect("load eBPF object");
    let maps = loader::service_maps(&mut ebpf).unwrap();
    let mut writer = MapWriter::new(maps).unwrap();
    let mut t = Target::default();
    let tcp: Vec<L4Addr> = backends_tcp
        .iter()
        .map(|b| addr(*b, 5000, IPPROTO_TCP))
        .collect();
    for b in &tcp {
        t.backends.insert(*b, BACKEND_F_ACTIVE);
    }
    let udp = addr(BE1, 5353, IPPROTO_UDP);
    t.backends.insert(udp, BACKEND_F_ACTIVE);
    t.frontends.insert(
        addr(VIP, 80, IPPROTO_TCP),
        frontend("web", Protocol::Tcp, tcp),
    );
    t.frontends.insert(
        addr(VIP, 53, IPPROTO_UDP),
        frontend("dns", Protocol::Udp, vec![udp]),
    );
    t.frontends.insert(
        addr(VIP_EMPTY, 80, IPPROTO_TCP),
        frontend("empty", Protocol::Tcp, vec![]),
    );
    writer.apply(&t).expect("apply");
    let prog: &mut SchedClassifier = ebpf
        .program_mut(prog_names::POD_INGRESS)
        .unwrap()
        .try_into()
        .unwrap();
    prog.load().expect("verifier accepts the pod program");
    Loaded {
        ebpf,
        writer,
        pin_dir,
    }
}

fn run(l: &mut Loaded, input: &[u8]) -> (i32, Vec<u8>) {
    let prog: &mut SchedClassifier = l
        .ebpf
        .program_mut(prog_names::POD_INGRESS)
        .unwrap()
        .try_into()
        .unwrap();
    let mut out = vec![0u8; input.len() + 256];
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(input),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        })
        .expect("test run");
    out.truncate(r.data_size_out as usize);
    (r.return_value as i32, out)
}

enum L4 {
    Tcp {
        syn: bool,
        ack: bool,
        payload: &'static [u8],
    },
    Udp {
        zero_csum: bool,
        payload: &'static [u8],
    },
}

/// An Ethernet/IPv4/TCP-or-UDP frame with correct checksums.
fn frame(
    src: [u8; 4],
    sport: u16,
    dst: [u8; 4],
    dport: u16,
    l4: &L4,
    ip_options: &[u8],
) -> Vec<u8> {
    let mut buf = Vec::new();
    Ethernet2Header {
        source: [2, 0, 0, 0, 0, 1],
        destination: [2, 0, 0, 0, 0, 2],
        ether_type: EtherType::IPV4,
    }
    .write(&mut buf)
    .unwrap();
    let (proto, l4_bytes) = match l4 {
        L4::Tcp { syn, ack, payload } => {
            let mut t = TcpHeader::new(sport, dport, 1000, 64240);
            t.syn = *syn;
            t.ack = *ack;
            if *ack {
                t.acknowledgment_number = 1;
            }
            t.checksum = t.calc_checksum_ipv4_raw(src, dst, payload).unwrap();
            let mut b = t.to_bytes().to_vec();
            b.extend_from_slice(payload);
            (IpNumber::TCP, b)
        }
        L4::Udp { zero_csum, payload } => {
            let mut u = UdpHeader::with_ipv4_checksum(
                sport,
                dport,
                &Ipv4Header::new(0, 64, IpNumber::UDP, src, dst).unwrap(),
                payload,
            )
            .unwrap();
            if *zero_csum {
                u.checksum = 0;
            }
            let mut b = u.to_bytes().to_vec();
            b.extend_from_slice(payload);
            (IpNumber::UDP, b)
        }
    };
    let mut ip = Ipv4Header::new(l4_bytes.len() as u16, 64, proto, src, dst).unwrap();
    ip.options = Ipv4Options::try_from(ip_options).unwrap();
    // total_len covers the options too; `new` computed it before they were set.
    ip.set_payload_len(l4_bytes.len()).unwrap();
    ip.header_checksum = ip.calc_header_checksum();
    ip.write(&mut buf).unwrap();
    buf.extend_from_slice(&l4_bytes);
    buf
}

/// What the output frame carries, with checksums verified independently.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    src: [u8; 4],
    sport: u16,
    dst: [u8; 4],
    dport: u16,
    /// None for a UDP checksum of 0.
    l4_csum_ok: Option<bool>,
}

fn inspect(frame: &[u8]) -> Seen {
    let (eth, rest) = Ethernet2Header::from_slice(frame).unwrap();
    assert_eq!(eth.ether_type, EtherType::IPV4);
    let (ip, rest) = Ipv4Header::from_slice(rest).unwrap();
    assert_eq!(
        ip.header_checksum,
        ip.calc_header_checksum(),
        "IPv4 header checksum"
    );
    match ip.protocol {
        IpNumber::TCP => {
            let (tcp, payload) = TcpHeader::from_slice(rest).unwrap();
            let ok = tcp.checksum == tcp.calc_checksum_ipv4(&ip, payload).unwrap();
            Seen {
                src: ip.source,
                sport: tcp.source_port,
                dst: ip.destination,
                dport: tcp.destination_port,
                l4_csum_ok: Some(ok),
            }
        }
        IpNumber::UDP => {
            let (udp, payload) = UdpHeader::from_slice(rest).unwrap();
            let ok = (udp.checksum != 0)
                .then(|| udp.checksum == udp.calc_checksum_ipv4(&ip, payload).unwrap());
            Seen {
                src: ip.source,
                sport: udp.source_port,
                dst: ip.destination,
                dport: udp.destination_port,
                l4_csum_ok: ok,
            }
        }
        p => panic!("unexpected protocol {p:?}"),
    }
}

const SYN: L4 = L4::Tcp {
    syn: true,
    ack: false,
    payload: b"",
};
const DATA: L4 = L4::Tcp {
    syn: false,
    ack: true,
    payload: b"GET / HTTP/1.1\r\n\r\n",
};
const SYNACK: L4 = L4::Tcp {
    syn: true,
    ack: true,
    payload: b"",
};

#[test]
fn translation_fixtures() {
    if !privileged() {
        return;
    }
    let mut l = load(&[BE1]);
    let nop4 = [1u8, 1, 1, 1];
    struct Case {
        what: &'static str,
        input: Vec<u8>,
        verdict: i32,
        /// None: the frame must leave byte for byte unchanged.
        expect: Option<Seen>,
    }
    let rewritten = |src, sport, dst, dport, csum| {
        Some(Seen {
            src,
            sport,
            dst,
            dport,
            l4_csum_ok: csum,
        })
    };
    let cases = [
        Case {
            what: "TCP SYN to the VIP is DNATed to the backend",
            input: frame(CLIENT, 40000, VIP, 80, &SYN, &[]),
            verdict: TC_ACT_OK,
            expect: rewritten(CLIENT, 40000, BE1, 5000, Some(true)),
        },
        Case {
            what: "TCP data of the established flow follows it",
            input: frame(CLIENT, 40000, VIP, 80, &DATA, &[]),
            verdict: TC_ACT_OK,
            expect: rewritten(CLIENT, 40000, BE1, 5000, Some(true)),
        },
        Case {
            what: "the backend's reply is reverse-NATed to the VIP",
            input: frame(BE1, 5000, CLIENT, 40000, &SYNACK, &[]),
            verdict: TC_ACT_OK,
            expect: rewritten(VIP, 80, CLIENT, 40000, Some(true)),
        },
        Case {
            what: "UDP to the VIP is DNATed with a valid checksum",
            input: frame(
                CLIENT,
                41000,
                VIP,
                53,
                &L4::Udp {
                    zero_csum: false,
                    payload: b"q",
                },
                &[],
            ),
            verdict: TC_ACT_OK,
            expect: rewritten(CLIENT, 41000, BE1, 5353, Some(true)),
        },
        Case {
            what: "UDP reply is reverse-NATed",
            input: frame(
                BE1,
                5353,
                CLIENT,
                41000,
                &L4::Udp {
                    zero_csum: false,
                    payload: b"answer",
                },
                &[],
            ),
            verdict: TC_ACT_OK,
            expect: rewritten(VIP, 53, CLIENT, 41000, Some(true)),
        },
        Case {
            what: "UDP with checksum 0 keeps checksum 0",
            input: frame(
                CLIENT,
                41001,
                VIP,
                53,
                &L4::Udp {
                    zero_csum: true,
                    payload: b"q",
                },
                &[],
            ),
            verdict: TC_ACT_OK,
            expect: rewritten(CLIENT, 41001, BE1, 5353, None),
        },
        Case {
            what: "IPv4 options shift the L4 header; still DNATed",
            input: frame(CLIENT, 40001, VIP, 80, &SYN, &nop4),
            verdict: TC_ACT_OK,
            expect: rewritten(CLIENT, 40001, BE1, 5000, Some(true)),
        },
        Case {
            what: "traffic to a pod IP passes untouched",
            input: frame(CLIENT, 40002, BE1, 5000, &SYN, &[]),
            verdict: TC_ACT_OK,
            expect: None,
        },
        Case {
            what: "the VIP on a port that is not a service passes untouched",
            input: frame(CLIENT, 40003, VIP, 81, &SYN, &[]),
            verdict: TC_ACT_OK,
            expect: None,
        },
        Case {
            what: "a service without backends drops new flows",
            input: frame(CLIENT, 40004, VIP_EMPTY, 80, &SYN, &[]),
            verdict: TC_ACT_SHOT,
            expect: None,
        },
    ];
    for c in cases {
        let (verdict, out) = run(&mut l, &c.input);
        assert_eq!(verdict, c.verdict, "{}: verdict", c.what);
        match c.expect {
            None => {
                if verdict == TC_ACT_OK {
                    assert_eq!(out, c.input, "{}: must be unchanged", c.what)
                }
            }
            Some(seen) => {
                assert_eq!(out.len(), c.input.len(), "{}: length", c.what);
                assert_eq!(inspect(&out), seen, "{}", c.what);
            }
        }
    }

    // Both directions of the new flow are in conntrack.
    let ct = loader::conntrack_map(&mut l.ebpf).unwrap();
    let key = |s: [u8; 4], sp: u16, d: [u8; 4], dp: u16| CtKey4 {
        saddr: s,
        daddr: d,
        sport: sp.to_be_bytes(),
        dport: dp.to_be_bytes(),
        proto: IPPROTO_TCP,
        _pad: [0; 3],
    };
    let fwd = ct
        .get(&key(CLIENT, 40000, VIP, 80), 0)
        .expect("forward entry");
    let rep = ct
        .get(&key(BE1, 5000, CLIENT, 40000), 0)
        .expect("reply entry");
    assert_eq!(fwd.backend_id, rep.backend_id);
    assert_eq!(fwd.rev_nat_id, rep.rev_nat_id);
}

#[test]
fn malformed_and_foreign_frames_pass_untouched() {
    if !privileged() {
        return;
    }
    let mut l = load(&[BE1]);
    let good = frame(CLIENT, 40000, VIP, 80, &SYN, &[]);
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    // Cut inside the TCP header.
    cases.push(("truncated TCP header", good[..14 + 20 + 10].to_vec()));
    // A frame cut inside the IPv4 header cannot be fed here: BPF_PROG_TEST_RUN refuses IPv4
    // frames shorter than 34 bytes (EINVAL). The IHL and total-length cases below reach the same
    // bounds checks.
    // IHL claims options that are not there.
    let mut bad_ihl = good[..14 + 20 + 8].to_vec();
    bad_ihl[14] = 0x4f;
    cases.push(("IHL beyond the frame", bad_ihl));
    // IHL below the minimum.
    let mut small_ihl = good.clone();
    small_ihl[14] = 0x44;
    cases.push(("IHL < 5", small_ihl));
    // total_len shorter than IP + TCP headers.
    let mut short_total = good.clone();
    short_total[16..18].copy_from_slice(&30u16.to_be_bytes());
    cases.push(("IP total length shorter than the headers", short_total));
    // A fragment (MF set): never translated piecewise.
    let mut frag = good.clone();
    frag[20] |= 0x20;
    cases.push(("first fragment", frag));
    // Not IPv4 at all.
    let mut arp = good.clone();
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    cases.push(("ARP ethertype", arp));
    let mut v6 = good.clone();
    v6[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
    cases.push(("IPv6 ethertype", v6));
    // ICMP to the VIP.
    let mut icmp = good.clone();
    icmp[14 + 9] = 1;
    cases.push(("ICMP to the VIP", icmp));
    for (what, input) in cases {
        let (verdict, out) = run(&mut l, &input);
        assert_eq!(verdict, TC_ACT_OK, "{what}: verdict");
        assert_eq!(out, input, "{what}: must be unchanged");
    }
}

#[test]
fn new_flows_spread_and_flows_survive_backend_changes() {
    if !privileged() {
        return;
    }
    let mut l = load(&[BE1, BE2]);
    let mut hits = [0u32; 2];
    for sport in 20000..21000u16 {
        let (v, out) = run(&mut l, &frame(CLIENT, sport, VIP, 80, &SYN, &[]));
        assert_eq!(v, TC_ACT_OK);
        let s = inspect(&out);
        assert_eq!(s.l4_csum_ok, Some(true));
        match s.dst {
            BE1 => hits[0] += 1,
            BE2 => hits[1] += 1,
            other => panic!("unexpected backend {other:?}"),
        }
    }
    assert!(
        hits.iter().all(|&h| (400..=600).contains(&h)),
        "uneven spread {hits:?}"
    );

    // Find a flow on BE2 and one on BE1, then remove BE1: the BE2 flow keeps its backend, the
    // BE1 flow is re-selected (onto BE2, the only one left).
    let on = |l: &mut Loaded, sport: u16| {
        inspect(&run(l, &frame(CLIENT, sport, VIP, 80, &DATA, &[])).1).dst
    };
    let be2_flow = (20000..21000u16).find(|&p| on(&mut l, p) == BE2).unwrap();
    let be1_flow = (20000..21000u16).find(|&p| on(&mut l, p) == BE1).unwrap();
    let mut t = Target::default();
    let be2 = addr(BE2, 5000, IPPROTO_TCP);
    t.backends.insert(be2, BACKEND_F_ACTIVE);
    t.frontends.insert(
        addr(VIP, 80, IPPROTO_TCP),
        frontend("web", Protocol::Tcp, vec![be2]),
    );
    let st = l.writer.apply(&t).unwrap();
    assert_eq!(st.backends_removed, 2, "BE1 and the UDP backend are gone");
    assert_eq!(on(&mut l, be2_flow), BE2);
    assert_eq!(on(&mut l, be1_flow), BE2);

    // Adding a backend back does not move established flows.
    let be1 = addr(BE1, 5000, IPPROTO_TCP);
    t.backends.insert(be1, BACKEND_F_ACTIVE);
    t.frontends.insert(
        addr(VIP, 80, IPPROTO_TCP),
        frontend("web", Protocol::Tcp, vec![be1, be2]),
    );
    l.writer.apply(&t).unwrap();
    assert_eq!(on(&mut l, be2_flow), BE2);
    assert_eq!(on(&mut l, be1_flow), BE2);
    // Re-applying the same target writes nothing.
    assert!(l.writer.apply(&t).unwrap().is_noop());
}

#[test]
fn restart_adopts_pinned_state() {
    if !privileged() {
        return;
    }
    let l = load(&[BE1, BE2]);
    let before = l.writer.programmed().clone();
    // A second load with the same pin directory (a restarted vipx) sees the same state.
    let mut again = loader::load(
        &l.pin_dir,
        MapSizes {
            services: 1024,
            backends: 1024,
            revnat: 256,
            conntrack: 4096,
        },
    )
    .unwrap();
    let w = MapWriter::new(loader::service_maps(&mut again).unwrap()).unwrap();
    assert_eq!(w.programmed(), &before);
    assert_eq!(before.frontends.len(), 3);
    assert_eq!(before.backends.len(), 3);
}

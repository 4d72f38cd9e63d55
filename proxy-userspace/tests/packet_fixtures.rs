//! Packet fixtures through BPF_PROG_TEST_RUN on the real compiled pod programs (ingress: what a
//! pod sends; egress: what it receives), with maps filled by the real map writer. Each fixture:
//! {description, program, input packet, expected verdict, expected output}; rewritten fields are
//! asserted and checksums recomputed independently (etherparse, and a plain RFC 1071 sum here).

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use aya::maps::{Array, HashMap, MapData};
use aya::{
    Ebpf, TestRunOptions,
    programs::{SchedClassifier, TestRun as _},
};
use etherparse::{
    EtherType, Ethernet2Header, IpNumber, Ipv4Header, Ipv4Options, TcpHeader, UdpHeader,
};
use proxy_common::{
    BACKEND_F_ACTIVE, Backend4, CT_F_FIN, CT_F_FORWARD, CT_F_REPLIED, CT_F_REPLY, CT_F_RST,
    CT_F_STATE, CtKey4, CtValue, IPPROTO_TCP, IPPROTO_UDP, Stat, map_names, prog_names,
};
use vipx::{
    desired::{LbAlgorithm, Protocol, ServicePortName},
    loader::{self, MapSizes},
    maps::{L4Addr, MapWriter, Target, TargetFrontend},
};

/// TC_ACT_UNSPEC: vipx passes every packet it does not drop on to the next program.
const NEXT: i32 = -1;
const TC_ACT_SHOT: i32 = 2;
const TC_ACT_REDIRECT: i32 = 7;

const INGRESS: &str = prog_names::POD_INGRESS;
const EGRESS: &str = prog_names::POD_EGRESS;

const CLIENT: [u8; 4] = [198, 18, 64, 2];
const VIP: [u8; 4] = [198, 19, 0, 10];
const VIP_EMPTY: [u8; 4] = [198, 19, 0, 11];
const BE1: [u8; 4] = [198, 18, 64, 11];
const BE2: [u8; 4] = [198, 18, 64, 12];

/// A test that cannot load programs fails, unless skipping was asked for explicitly
/// (`VIPX_SKIP_PRIVILEGED=1`), which CI refuses.
fn privileged() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        return true;
    }
    let skip = std::env::var_os("VIPX_SKIP_PRIVILEGED").is_some_and(|v| v == "1");
    assert!(
        skip && std::env::var_os("CI").is_none(),
        "this test loads BPF programs and needs root (CAP_BPF, CAP_NET_ADMIN); \
         set VIPX_SKIP_PRIVILEGED=1 to skip it outside CI"
    );
    eprintln!("skipping (VIPX_SKIP_PRIVILEGED=1): needs root (CAP_BPF, CAP_NET_ADMIN)");
    false
}

/// A pin directory removed on drop: made before the object is loaded, so a load or verifier
/// failure (a panic) leaves no pins behind either.
struct PinDir(PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Loaded object with maps pinned in a unique directory that is removed on drop.
struct Loaded {
    ebpf: Ebpf,
    writer: MapWriter,
    pin_dir: PathBuf,
    _pins: PinDir,
}

fn addr(a: [u8; 4], port: u16, proto: u8) -> L4Addr {
    L4Addr {
        addr: Ipv4Addr::from(a),
        port,
        proto,
    }
}

fn frontend(name: &str, proto: Protocol, slots: Vec<L4Addr>) -> TargetFrontend {
    // As `maps::target` marks a Service port without any endpoint.
    let reject = if slots.is_empty() {
        proxy_common::SVC_F_REJECT
    } else {
        0
    };
    TargetFrontend {
        service: ServicePortName {
            namespace: "default".into(),
            name: name.into(),
            port_name: String::new(),
            protocol: proto,
        },
        flags: proxy_common::SVC_F_CLUSTER_IP | reject,
        affinity_timeout_s: 0,
        slots,
        lb_algorithm: None,
        source_ranges: Vec::new(),
    }
}

fn load(backends_tcp: &[[u8; 4]]) -> Loaded {
    load_with(backends_tcp, LbAlgorithm::Maglev)
}

/// `load` with frontends that choose backends by `lb` (Maglev is vipx's default).
fn load_with(backends_tcp: &[[u8; 4]], lb: LbAlgorithm) -> Loaded {
    load_sized(backends_tcp, lb, 4096)
}

/// `load_with` and a conntrack table of `conntrack` entries.
fn load_sized(backends_tcp: &[[u8; 4]], lb: LbAlgorithm, conntrack: u32) -> Loaded {
    load_object(
        backends_tcp,
        lb,
        conntrack,
        loader::ebpf_object().expect("the eBPF object"),
    )
}

/// A pin directory of its own for each load (removed by [`PinDir`]).
fn fresh_pin_dir() -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    PathBuf::from(loader::BPFFS).join(format!(
        "vipx-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

/// The fixtures' map sizes, with a conntrack table of `conntrack` entries.
fn fixture_sizes(conntrack: u32) -> MapSizes {
    MapSizes {
        services: 1024,
        backends: 1024,
        revnat: 256,
        conntrack,
        maglev_table_size: proxy_common::defaults::MAGLEV_TABLE_SIZE,
        maglev_tables: 64,
    }
}

/// `load_sized` of a given patch of the object (see `loader::Object`).
fn load_object(
    backends_tcp: &[[u8; 4]],
    lb: LbAlgorithm,
    conntrack: u32,
    object: &loader::Object,
) -> Loaded {
    let pin_dir = fresh_pin_dir();
    let pins = PinDir(pin_dir.clone());
    let (mut ebpf, _) =
        loader::load_object(&pin_dir, fixture_sizes(conntrack), object).expect("load eBPF object");
    loader::write_clock(&mut ebpf).expect("the programs' clock");
    let maps = loader::service_maps(&mut ebpf).unwrap();
    let mut writer = MapWriter::new(maps).unwrap();
    writer.set_default_lb_algorithm(lb);
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
    for name in [INGRESS, EGRESS] {
        let prog: &mut SchedClassifier = ebpf.program_mut(name).unwrap().try_into().unwrap();
        prog.load()
            .unwrap_or_else(|e| panic!("verifier rejects {name}: {e:?}"));
    }
    Loaded {
        ebpf,
        writer,
        pin_dir,
        _pins: pins,
    }
}

fn run(l: &mut Loaded, input: &[u8]) -> (i32, Vec<u8>) {
    run_on(l, INGRESS, input)
}

fn run_on(l: &mut Loaded, prog: &str, input: &[u8]) -> (i32, Vec<u8>) {
    let prog: &mut SchedClassifier = l.ebpf.program_mut(prog).unwrap().try_into().unwrap();
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

/// The Ethernet header every fixture frame starts with (IPv4).
fn write_ethernet(buf: &mut Vec<u8>) {
    Ethernet2Header {
        source: [2, 0, 0, 0, 0, 1],
        destination: [2, 0, 0, 0, 0, 2],
        ether_type: EtherType::IPV4,
    }
    .write(buf)
    .unwrap();
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
    write_ethernet(&mut buf);
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

/// Both ways the programs update L4 checksums: in the program, after reading how the skb
/// carries the sum (the running kernel's object: these machines have what it needs, and a
/// silent fallback would leave that path untested here), and through the kernel's helpers, as on
/// a kernel where the program cannot read it. (Frames from a test run carry whole sums,
/// CHECKSUM_NONE; the lab's node links, without TX checksum offload, check partial ones.)
#[test]
fn translation_fixtures() {
    if !privileged() {
        return;
    }
    let object = loader::ebpf_object().expect("the eBPF object");
    assert!(
        matches!(object.checksums, loader::ChecksumPath::InProgram { .. }),
        "this kernel should let the programs read ip_summed: {:?}",
        object.checksums
    );
    translations(load(&[BE1]));
    let helpers = loader::Object::with(loader::ChecksumPath::Helpers("test".into())).unwrap();
    translations(load_object(&[BE1], LbAlgorithm::Maglev, 4096, &helpers));
}

fn translations(mut l: Loaded) {
    let nop4 = [1u8, 1, 1, 1];
    struct Case {
        what: &'static str,
        prog: &'static str,
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
            prog: INGRESS,
            input: frame(CLIENT, 40000, VIP, 80, &SYN, &[]),
            verdict: NEXT,
            expect: rewritten(CLIENT, 40000, BE1, 5000, Some(true)),
        },
        Case {
            what: "TCP data of the established flow follows it",
            prog: INGRESS,
            input: frame(CLIENT, 40000, VIP, 80, &DATA, &[]),
            verdict: NEXT,
            expect: rewritten(CLIENT, 40000, BE1, 5000, Some(true)),
        },
        Case {
            what: "the backend's reply is reverse-NATed to the VIP",
            prog: EGRESS,
            input: frame(BE1, 5000, CLIENT, 40000, &SYNACK, &[]),
            verdict: NEXT,
            expect: rewritten(VIP, 80, CLIENT, 40000, Some(true)),
        },
        Case {
            what: "UDP to the VIP is DNATed with a valid checksum",
            prog: INGRESS,
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
            verdict: NEXT,
            expect: rewritten(CLIENT, 41000, BE1, 5353, Some(true)),
        },
        Case {
            what: "UDP reply is reverse-NATed",
            prog: EGRESS,
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
            verdict: NEXT,
            expect: rewritten(VIP, 53, CLIENT, 41000, Some(true)),
        },
        Case {
            what: "UDP with checksum 0 keeps checksum 0",
            prog: INGRESS,
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
            verdict: NEXT,
            expect: rewritten(CLIENT, 41001, BE1, 5353, None),
        },
        Case {
            what: "IPv4 options shift the L4 header; still DNATed",
            prog: INGRESS,
            input: frame(CLIENT, 40001, VIP, 80, &SYN, &nop4),
            verdict: NEXT,
            expect: rewritten(CLIENT, 40001, BE1, 5000, Some(true)),
        },
        Case {
            what: "traffic to a pod IP passes untouched",
            prog: INGRESS,
            input: frame(CLIENT, 40002, BE1, 5000, &SYN, &[]),
            verdict: NEXT,
            expect: None,
        },
        Case {
            what: "the ClusterIP on a port that is not a service is refused (ICMP, see below)",
            prog: INGRESS,
            input: frame(CLIENT, 40003, VIP, 81, &SYN, &[]),
            verdict: TC_ACT_REDIRECT,
            expect: None,
        },
        Case {
            what: "a service without backends answers new flows (ICMP, see below)",
            prog: INGRESS,
            input: frame(CLIENT, 40004, VIP_EMPTY, 80, &SYN, &[]),
            verdict: TC_ACT_REDIRECT,
            expect: None,
        },
    ];
    for c in cases {
        let (verdict, out) = run_on(&mut l, c.prog, &c.input);
        assert_eq!(verdict, c.verdict, "{}: verdict", c.what);
        match c.expect {
            None => {
                if verdict == NEXT {
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
        _pad: 0,
        _pad2: 0,
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
    // A fragment of a flow vipx does not translate.
    let mut frag = frame(CLIENT, 40000, BE1, 5000, &DATA, &[]);
    frag[20] |= 0x20;
    cases.push(("first fragment to a pod", frag));
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
        for prog in [INGRESS, EGRESS] {
            let (verdict, out) = run_on(&mut l, prog, &input);
            assert_eq!(verdict, NEXT, "{what} ({prog}): verdict");
            assert_eq!(out, input, "{what} ({prog}): must be unchanged");
        }
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
        assert_eq!(v, NEXT);
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

    // Find a flow on BE2 and one on BE1, then remove BE1 outright (not via terminating): the BE2
    // flow keeps its backend, and so does the BE1 flow, as netfilter conntrack keeps it behind
    // kube-proxy, while new connections avoid BE1. The UDP backend goes at once.
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
    assert_eq!(
        (st.backends_removed, st.backends_retiring),
        (1, 1),
        "the UDP backend is gone, BE1 retires"
    );
    assert_eq!(on(&mut l, be2_flow), BE2);
    assert_eq!(
        on(&mut l, be1_flow),
        BE1,
        "an established flow keeps its removed backend"
    );
    for sport in 21000..21100u16 {
        let (_, out) = run(&mut l, &frame(CLIENT, sport, VIP, 80, &SYN, &[]));
        assert_eq!(
            inspect(&out).dst,
            BE2,
            "a new connection never picks a removed backend"
        );
    }

    // Adding it back makes it an ordinary backend again; established flows do not move.
    let be1 = addr(BE1, 5000, IPPROTO_TCP);
    t.backends.insert(be1, BACKEND_F_ACTIVE);
    t.frontends.insert(
        addr(VIP, 80, IPPROTO_TCP),
        frontend("web", Protocol::Tcp, vec![be1, be2]),
    );
    l.writer.apply(&t).unwrap();
    assert_eq!(l.writer.retiring().count(), 0);
    assert_eq!(on(&mut l, be2_flow), BE2);
    assert_eq!(on(&mut l, be1_flow), BE1);
    // Re-applying the same target writes nothing.
    assert!(l.writer.apply(&t).unwrap().is_noop());

    // Removed again and its grace period over: freed, and its flows re-balanced.
    t.backends.remove(&be1);
    t.frontends.insert(
        addr(VIP, 80, IPPROTO_TCP),
        frontend("web", Protocol::Tcp, vec![be2]),
    );
    l.writer.apply(&t).unwrap();
    assert_eq!(on(&mut l, be1_flow), BE1);
    let later = std::time::Instant::now() + vipx::maps::DEFAULT_ENDPOINT_GRACE;
    let st = l.writer.apply_at(&t, later).unwrap();
    assert_eq!(st.backends_removed, 1, "BE1 freed after its grace period");
    assert_eq!(on(&mut l, be1_flow), BE2);
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
            maglev_table_size: proxy_common::defaults::MAGLEV_TABLE_SIZE,
            maglev_tables: 64,
        },
    )
    .unwrap();
    let w = MapWriter::new(loader::service_maps(&mut again).unwrap()).unwrap();
    assert_eq!(w.programmed(), &before);
    assert_eq!(before.frontends.len(), 3);
    assert_eq!(before.backends.len(), 3);

    // Pins cannot be resized: another size is refused with a message that says so, instead of
    // being silently ignored.
    let refused = loader::load(
        &l.pin_dir,
        MapSizes {
            services: 1024,
            backends: 1024,
            revnat: 256,
            conntrack: 8192,
            maglev_table_size: proxy_common::defaults::MAGLEV_TABLE_SIZE,
            maglev_tables: 64,
        },
    );
    let Err(err) = refused else {
        panic!("a different conntrack size must be refused");
    };
    let msg = format!("{err:#}");
    assert!(
        msg.contains("--max-conntrack") && msg.contains("4096"),
        "unhelpful error: {msg}"
    );
}

fn stat(l: &Loaded, which: Stat) -> u64 {
    loader::read_stats(&l.ebpf)
        .unwrap()
        .into_iter()
        .find(|(s, _)| *s == which)
        .map_or(0, |(_, v)| v)
}

fn ct_key(s: [u8; 4], sp: u16, d: [u8; 4], dp: u16, proto: u8) -> CtKey4 {
    CtKey4 {
        saddr: s,
        daddr: d,
        sport: sp.to_be_bytes(),
        dport: dp.to_be_bytes(),
        proto,
        _pad: 0,
        _pad2: 0,
    }
}

/// The Kafka pattern: bootstrap through the ClusterIP, then dial the pod from the same source
/// port. The reply entry of the first connection must not rewrite the second one's replies.
#[test]
fn direct_connection_after_a_vip_flow_is_not_rewritten() {
    if !privileged() {
        return;
    }
    let mut l = load(&[BE1]);
    let (v, out) = run(&mut l, &frame(CLIENT, 40100, VIP, 80, &SYN, &[]));
    assert_eq!((v, inspect(&out).dst), (NEXT, BE1));
    let direct = frame(CLIENT, 40100, BE1, 5000, &SYN, &[]);
    let (v, out) = run(&mut l, &direct);
    assert_eq!(
        (v, &out),
        (NEXT, &direct),
        "the direct SYN passes untouched"
    );
    assert_eq!(stat(&l, Stat::ReplyCleared), 1);
    let synack = frame(BE1, 5000, CLIENT, 40100, &SYNACK, &[]);
    let (v, out) = run_on(&mut l, EGRESS, &synack);
    assert_eq!(
        (v, &out),
        (NEXT, &synack),
        "the pod's SYN-ACK reaches the client from the pod, not from the VIP"
    );
}

/// The egress side's backend filter: a packet into a pod from an address and port that never
/// was a backend's passes before the conntrack lookup (even with a reply entry planted for it,
/// which only a backend's flow can make), and the replies of a backend's flows are translated
/// for as long as their entries live, also after the backend was freed (its bit stays set).
#[test]
fn the_backend_filter_keeps_every_reply_a_conntrack_entry_can_translate() {
    if !privileged() {
        return;
    }
    let mut l = load(&[BE1, BE2]);
    let be1_flow = (20000..21000u16)
        .find(|&p| inspect(&run(&mut l, &frame(CLIENT, p, VIP, 80, &SYN, &[])).1).dst == BE1)
        .unwrap();
    let reply = frame(BE1, 5000, CLIENT, be1_flow, &DATA, &[]);
    let (_, out) = run_on(&mut l, EGRESS, &reply);
    assert_eq!(
        (inspect(&out).src, inspect(&out).sport),
        (VIP, 80),
        "a reply is translated"
    );

    // BE1 leaves and is freed (grace over): its flow's reply entry still names a live frontend.
    let be2 = addr(BE2, 5000, IPPROTO_TCP);
    let mut t = Target::default();
    t.backends.insert(be2, BACKEND_F_ACTIVE);
    t.frontends.insert(
        addr(VIP, 80, IPPROTO_TCP),
        frontend("web", Protocol::Tcp, vec![be2]),
    );
    l.writer.apply(&t).unwrap();
    let later = std::time::Instant::now() + vipx::maps::DEFAULT_ENDPOINT_GRACE;
    assert_eq!(l.writer.apply_at(&t, later).unwrap().backends_removed, 1);
    let (_, out) = run_on(&mut l, EGRESS, &reply);
    assert_eq!(
        (inspect(&out).src, inspect(&out).sport),
        (VIP, 80),
        "a freed backend's reply is still translated"
    );

    // A reply entry for a source no backend ever had is never consulted.
    let stranger = [198, 18, 64, 99];
    let ct: HashMap<MapData, CtKey4, CtValue> = loader::open_pinned_conntrack(&l.pin_dir).unwrap();
    let key = ct_key(stranger, 7000, CLIENT, 41000, IPPROTO_TCP);
    let mut planted = ct
        .get(&ct_key(BE1, 5000, CLIENT, be1_flow, IPPROTO_TCP), 0)
        .unwrap();
    planted.seen = ct_now();
    let mut ct = ct;
    ct.insert(key, planted, 0).unwrap();
    let input = frame(stranger, 7000, CLIENT, 41000, &DATA, &[]);
    let (v, out) = run_on(&mut l, EGRESS, &input);
    assert_eq!((v, &out), (NEXT, &input), "passed by the filter, untouched");
}

/// A backend id freed by one Service and handed to another pod (a new generation) must not
/// carry an idle flow to that pod; a frontend re-created with a new reverse-NAT id does not
/// trust entries made for the old one.
#[test]
fn stale_conntrack_entries_are_never_followed() {
    if !privileged() {
        return;
    }
    let mut l = load(&[BE1, BE2]);
    let on_be1 = (20000..21000u16)
        .find(|&p| inspect(&run(&mut l, &frame(CLIENT, p, VIP, 80, &SYN, &[])).1).dst == BE1)
        .unwrap();
    let be1_id = *l
        .writer
        .programmed()
        .backends
        .iter()
        .find(|(_, (a, _))| a.addr == Ipv4Addr::from(BE1) && a.proto == IPPROTO_TCP)
        .unwrap()
        .0;
    // BE1 leaves the Service...
    let mut t = Target::default();
    let be2 = addr(BE2, 5000, IPPROTO_TCP);
    t.backends.insert(be2, BACKEND_F_ACTIVE);
    t.frontends.insert(
        addr(VIP, 80, IPPROTO_TCP),
        frontend("web", Protocol::Tcp, vec![be2]),
    );
    l.writer.apply(&t).unwrap();
    // ...and its id is reused for a pod of another Service (what a restarted vipx without
    // persisted ids did): same id, next generation.
    let other = [198, 18, 64, 99];
    let mut backends: Array<MapData, Backend4> = Array::try_from(
        aya::maps::Map::from_map_data(
            MapData::from_pin(l.pin_dir.join(map_names::BACKEND4)).unwrap(),
        )
        .unwrap(),
    )
    .unwrap();
    let ct: HashMap<MapData, CtKey4, CtValue> = loader::open_pinned_conntrack(&l.pin_dir).unwrap();
    let entry = ct
        .get(&ct_key(CLIENT, on_be1, VIP, 80, IPPROTO_TCP), 0)
        .unwrap();
    assert_eq!(entry.backend_id, be1_id);
    backends
        .set(
            be1_id,
            Backend4 {
                addr: other,
                port: 5000u16.to_be_bytes(),
                proto: IPPROTO_TCP,
                flags: BACKEND_F_ACTIVE,
                generation: entry.backend_gen.wrapping_add(1).max(1),
            },
            0,
        )
        .unwrap();
    // A reply entry naming the old generation restores nothing either (a direct flow to the
    // id's new owner must not be rewritten to the VIP).
    let reply = frame(BE1, 5000, CLIENT, on_be1, &DATA, &[]);
    let (v, out) = run_on(&mut l, EGRESS, &reply);
    assert_eq!(
        (v, &out),
        (NEXT, &reply),
        "a reply entry of an old generation"
    );
    let before = stat(&l, Stat::CtStale);
    let (v, out) = run(&mut l, &frame(CLIENT, on_be1, VIP, 80, &DATA, &[]));
    assert_eq!(v, NEXT);
    assert_eq!(
        inspect(&out).dst,
        BE2,
        "the idle flow is re-balanced, never sent to the id's new owner"
    );
    assert_eq!(stat(&l, Stat::CtStale), before + 1);

    // The frontend is deleted and re-created with no drain period: a new reverse-NAT id.
    l.writer.set_endpoint_grace(Duration::ZERO);
    let flow = (21000..22000u16)
        .find(|&p| run(&mut l, &frame(CLIENT, p, VIP, 80, &SYN, &[])).0 == NEXT)
        .unwrap();
    let removed = Target {
        backends: t.backends.clone(),
        ..Target::default()
    };
    l.writer.apply(&removed).unwrap();
    l.writer.apply(&t).unwrap();
    let before = stat(&l, Stat::CtStale);
    let (v, out) = run(&mut l, &frame(CLIENT, flow, VIP, 80, &DATA, &[]));
    assert_eq!((v, inspect(&out).dst), (NEXT, BE2));
    assert_eq!(
        stat(&l, Stat::CtStale),
        before + 1,
        "an entry made for the old frontend is not trusted"
    );
}

/// RFC 1071 sum, written here so the programs' own checksum code is not what checks them.
fn inet_csum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A UDP datagram of `payload_len` bytes split into IPv4 fragments of at most 1480 payload bytes.
fn udp_fragments(
    src: [u8; 4],
    sport: u16,
    dst: [u8; 4],
    dport: u16,
    id: u16,
    payload_len: usize,
) -> Vec<Vec<u8>> {
    let payload: Vec<u8> = (0..payload_len).map(|i| (i % 251) as u8).collect();
    let udp = UdpHeader::with_ipv4_checksum(
        sport,
        dport,
        &Ipv4Header::new(0, 64, IpNumber::UDP, src, dst).unwrap(),
        &payload,
    )
    .unwrap();
    let mut datagram = udp.to_bytes().to_vec();
    datagram.extend_from_slice(&payload);
    let chunks: Vec<&[u8]> = datagram.chunks(1480).collect();
    let n = chunks.len();
    chunks
        .into_iter()
        .enumerate()
        .map(|(i, chunk)| {
            let mut buf = Vec::new();
            write_ethernet(&mut buf);
            let mut ip = Ipv4Header::new(chunk.len() as u16, 64, IpNumber::UDP, src, dst).unwrap();
            ip.identification = id;
            ip.more_fragments = i + 1 < n;
            ip.fragment_offset = etherparse::IpFragOffset::try_new((i * 1480 / 8) as u16).unwrap();
            ip.header_checksum = ip.calc_header_checksum();
            ip.write(&mut buf).unwrap();
            buf.extend_from_slice(chunk);
            buf
        })
        .collect()
}

/// (source, destination) of one fragment.
type Addrs = ([u8; 4], [u8; 4]);

/// Addresses of each fragment and the reassembled datagram's ports and UDP checksum validity.
fn reassemble(frames: &[Vec<u8>]) -> (Vec<Addrs>, u16, u16, bool) {
    let mut addrs = Vec::new();
    let mut datagram = Vec::new();
    for f in frames {
        let (ip, rest) = Ipv4Header::from_slice(&f[14..]).unwrap();
        assert_eq!(
            ip.header_checksum,
            ip.calc_header_checksum(),
            "IPv4 checksum"
        );
        addrs.push((ip.source, ip.destination));
        datagram.extend_from_slice(&rest[..ip.payload_len().unwrap() as usize]);
    }
    let (src, dst) = addrs[0];
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src);
    pseudo.extend_from_slice(&dst);
    pseudo.extend_from_slice(&[0, 17]);
    pseudo.extend_from_slice(&(datagram.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(&datagram);
    let sport = u16::from_be_bytes([datagram[0], datagram[1]]);
    let dport = u16::from_be_bytes([datagram[2], datagram[3]]);
    (addrs, sport, dport, inet_csum(&pseudo) == 0)
}

/// A UDP answer above the MTU (DNS with EDNS0) arrives as fragments; only the first carries
/// the ports. Every fragment of a translated datagram is translated, in both directions.
#[test]
fn fragments_of_translated_datagrams_are_translated() {
    if !privileged() {
        return;
    }
    let mut l = load(&[BE1]);
    // Client -> VIP, 3000 bytes: DNAT every fragment.
    let out: Vec<Vec<u8>> = udp_fragments(CLIENT, 42000, VIP, 53, 0x1234, 3000)
        .iter()
        .map(|f| {
            let (v, out) = run(&mut l, f);
            assert_eq!(v, NEXT);
            out
        })
        .collect();
    assert_eq!(out.len(), 3);
    let (addrs, sport, dport, ok) = reassemble(&out);
    assert!(addrs.iter().all(|a| *a == (CLIENT, BE1)), "{addrs:?}");
    assert_eq!((sport, dport, ok), (42000, 5353, true));

    // Backend -> client, 3000 bytes: reverse-NAT every fragment on the way into the client.
    let out: Vec<Vec<u8>> = udp_fragments(BE1, 5353, CLIENT, 42000, 0x4321, 3000)
        .iter()
        .map(|f| {
            let (v, out) = run_on(&mut l, EGRESS, f);
            assert_eq!(v, NEXT);
            out
        })
        .collect();
    let (addrs, sport, dport, ok) = reassemble(&out);
    assert!(addrs.iter().all(|a| *a == (VIP, CLIENT)), "{addrs:?}");
    assert_eq!((sport, dport, ok), (53, 42000, true));
    assert_eq!(stat(&l, Stat::FragTranslated), 4);

    // Backend and client on one node without netfilter defragmenting in between: each fragment
    // of the answer passes the backend's veth ingress, then the client's veth egress, in turn.
    let mut out = Vec::new();
    for f in udp_fragments(BE1, 5353, CLIENT, 42000, 0x4444, 3000) {
        let (v, through_ingress) = run(&mut l, &f);
        assert_eq!(
            (v, &through_ingress),
            (NEXT, &f),
            "not a flow to a frontend"
        );
        let (v, into_client) = run_on(&mut l, EGRESS, &through_ingress);
        assert_eq!(v, NEXT);
        out.push(into_client);
    }
    let (addrs, sport, dport, ok) = reassemble(&out);
    assert!(addrs.iter().all(|a| *a == (VIP, CLIENT)), "{addrs:?}");
    assert_eq!((sport, dport, ok), (53, 42000, true));

    // Later fragments whose first fragment was never seen pass untouched.
    let orphan = &udp_fragments(BE1, 5353, CLIENT, 42000, 0x5555, 3000)[1];
    let (v, out) = run_on(&mut l, EGRESS, orphan);
    assert_eq!((v, &out), (NEXT, orphan));

    // The IP id wraps: a datagram of another flow between the same addresses reuses the id of
    // a translated one whose record is still there (its last fragment was lost). Its later
    // fragments must take their own datagram's ports, not the translated flow's.
    let translated = udp_fragments(BE1, 5353, CLIENT, 42000, 0x7777, 3000);
    run_on(&mut l, EGRESS, &translated[0]);
    for f in udp_fragments(BE1, 6000, CLIENT, 42001, 0x7777, 3000) {
        let (v, out) = run_on(&mut l, EGRESS, &f);
        assert_eq!(
            (v, &out),
            (NEXT, &f),
            "a fragment of an untranslated datagram"
        );
    }
}

/// An ICMP error frame: `outer_src -> dst`, quoting `quote` (an IPv4 header and its payload).
fn icmp_error(outer_src: [u8; 4], dst: [u8; 4], icmp_type: u8, code: u8, quote: &[u8]) -> Vec<u8> {
    let mut icmp = vec![icmp_type, code, 0, 0, 0, 0, 0x05, 0x78];
    icmp.extend_from_slice(quote);
    let c = inet_csum(&icmp).to_be_bytes();
    icmp[2..4].copy_from_slice(&c);
    let mut buf = Vec::new();
    write_ethernet(&mut buf);
    let mut ip = Ipv4Header::new(icmp.len() as u16, 64, IpNumber::ICMP, outer_src, dst).unwrap();
    ip.header_checksum = ip.calc_header_checksum();
    ip.write(&mut buf).unwrap();
    buf.extend_from_slice(&icmp);
    buf
}

/// ICMP errors about a translated flow reach the client as if about its packet to the VIP:
/// port unreachable from the backend (ECONNREFUSED on a connected UDP socket) and
/// fragmentation needed from a router on the way (PMTU discovery).
#[test]
fn icmp_errors_about_translated_flows_are_translated() {
    if !privileged() {
        return;
    }
    let mut l = load(&[BE1]);
    let udp = L4::Udp {
        zero_csum: false,
        payload: b"query",
    };
    // The client's datagram, as the backend received it (after DNAT).
    run(&mut l, &frame(CLIENT, 43000, VIP, 53, &udp, &[]));
    let quoted = frame(CLIENT, 43000, BE1, 5353, &udp, &[])[14..].to_vec();
    let err = icmp_error(BE1, CLIENT, 3, 3, &quoted);
    let (v, out) = run_on(&mut l, EGRESS, &err);
    assert_eq!(v, NEXT);
    let (ip, icmp) = Ipv4Header::from_slice(&out[14..]).unwrap();
    assert_eq!(ip.header_checksum, ip.calc_header_checksum());
    assert_eq!(
        (ip.source, ip.destination),
        (VIP, CLIENT),
        "outer: from the VIP"
    );
    assert_eq!(inet_csum(icmp), 0, "ICMP checksum");
    let quote = &icmp[8..];
    let (inner, inner_l4) = Ipv4Header::from_slice(quote).unwrap();
    assert_eq!(
        inner.header_checksum,
        inner.calc_header_checksum(),
        "quoted IPv4 checksum"
    );
    assert_eq!((inner.source, inner.destination), (CLIENT, VIP));
    let (u, payload) = UdpHeader::from_slice(inner_l4).unwrap();
    assert_eq!((u.source_port, u.destination_port), (43000, 53));
    assert_eq!(
        u.checksum,
        u.calc_checksum_ipv4(&inner, payload).unwrap(),
        "quoted UDP checksum"
    );

    // Fragmentation needed from a router (the node), quoting only 8 bytes of the TCP header.
    run(&mut l, &frame(CLIENT, 44000, VIP, 80, &SYN, &[]));
    let tcp = frame(CLIENT, 44000, BE1, 5000, &DATA, &[]);
    let quoted = &tcp[14..14 + 28];
    let router = [198, 18, 0, 1];
    let err = icmp_error(router, CLIENT, 3, 4, quoted);
    let (v, out) = run_on(&mut l, EGRESS, &err);
    assert_eq!(v, NEXT);
    let (ip, icmp) = Ipv4Header::from_slice(&out[14..]).unwrap();
    assert_eq!(ip.header_checksum, ip.calc_header_checksum());
    assert_eq!(ip.source, router, "a router's own address stays");
    assert_eq!(inet_csum(icmp), 0, "ICMP checksum");
    let (inner, inner_l4) = Ipv4Header::from_slice(&icmp[8..]).unwrap();
    assert_eq!(inner.header_checksum, inner.calc_header_checksum());
    assert_eq!((inner.source, inner.destination), (CLIENT, VIP));
    assert_eq!(
        &inner_l4[..4],
        &[0xab, 0xe0, 0, 80][..],
        "ports 44000 -> 80"
    );
    assert_eq!(stat(&l, Stat::IcmpTranslated), 2);

    // The client's own error about an answer it got from the VIP (its socket closed): it
    // reaches the backend, quoting the packet the backend sent.
    let answer = L4::Udp {
        zero_csum: false,
        payload: b"late answer",
    };
    let quoted = frame(VIP, 53, CLIENT, 43000, &answer, &[])[14..].to_vec();
    let err = icmp_error(CLIENT, VIP, 3, 3, &quoted);
    let (v, out) = run(&mut l, &err);
    assert_eq!(v, NEXT);
    let (ip, icmp) = Ipv4Header::from_slice(&out[14..]).unwrap();
    assert_eq!(ip.header_checksum, ip.calc_header_checksum());
    assert_eq!(
        (ip.source, ip.destination),
        (CLIENT, BE1),
        "outer: to the backend"
    );
    assert_eq!(inet_csum(icmp), 0, "ICMP checksum");
    let (inner, inner_l4) = Ipv4Header::from_slice(&icmp[8..]).unwrap();
    assert_eq!(inner.header_checksum, inner.calc_header_checksum());
    assert_eq!((inner.source, inner.destination), (BE1, CLIENT));
    let (u, payload) = UdpHeader::from_slice(inner_l4).unwrap();
    assert_eq!((u.source_port, u.destination_port), (5353, 43000));
    assert_eq!(u.checksum, u.calc_checksum_ipv4(&inner, payload).unwrap());
    assert_eq!(stat(&l, Stat::IcmpTranslated), 3);

    // A quote of a later fragment has payload where the ports would be: untouched.
    let mut quoted = frame(CLIENT, 43000, BE1, 5353, &udp, &[])[14..].to_vec();
    quoted[7] = 0xb9;
    let err = icmp_error(BE1, CLIENT, 3, 3, &quoted);
    let (v, out) = run_on(&mut l, EGRESS, &err);
    assert_eq!((v, &out), (NEXT, &err), "a quoted later fragment");

    // An ICMP error about a flow vipx did not translate passes untouched.
    let quoted = frame(CLIENT, 45000, BE2, 5000, &udp, &[])[14..].to_vec();
    let err = icmp_error(BE2, CLIENT, 3, 3, &quoted);
    let (v, out) = run_on(&mut l, EGRESS, &err);
    assert_eq!((v, &out), (NEXT, &err));
}

/// A pod reaching its own Service is never sent to itself while another backend exists: it would
/// get the answer from its own address (no hairpin SNAT yet) and drop it.
#[test]
fn a_pod_is_not_sent_to_itself_through_its_own_service() {
    if !privileged() {
        return;
    }
    let mut l = load(&[BE1, BE2]);
    for sport in 30000..30200u16 {
        let (v, out) = run(&mut l, &frame(BE1, sport, VIP, 80, &SYN, &[]));
        assert_eq!(v, NEXT);
        assert_eq!(inspect(&out).dst, BE2, "source port {sport}");
    }
    assert!(stat(&l, Stat::HairpinAvoided) > 50);
}

/// A new connection or datagram to a frontend without endpoints gets ICMP port unreachable from
/// the frontend (kube-proxy's REJECT), sent back where it came from; other packets are dropped.
#[test]
fn no_endpoints_rejects_new_flows_with_icmp_port_unreachable() {
    if !privileged() {
        return;
    }
    let mut l = load(&[BE1]);
    let mut t = Target::default();
    t.frontends.insert(
        addr(VIP_EMPTY, 80, IPPROTO_TCP),
        frontend("empty", Protocol::Tcp, vec![]),
    );
    t.frontends.insert(
        addr(VIP_EMPTY, 53, IPPROTO_UDP),
        frontend("empty-dns", Protocol::Udp, vec![]),
    );
    l.writer.apply(&t).unwrap();
    let udp = L4::Udp {
        zero_csum: false,
        payload: b"query",
    };
    // The quote: the IPv4 header and the whole TCP header (it must cover the L4 checksum field:
    // the kernel will not cut a CHECKSUM_PARTIAL packet before it), or the UDP header.
    for (what, input, quoted) in [
        (
            "TCP SYN",
            frame(CLIENT, 40500, VIP_EMPTY, 80, &SYN, &[]),
            40,
        ),
        ("UDP", frame(CLIENT, 40501, VIP_EMPTY, 53, &udp, &[]), 28),
    ] {
        assert_port_unreachable(&mut l, what, &input, VIP_EMPTY, quoted);
    }
    // A TCP packet that is not a SYN (a flow that lost its backends) is dropped, not answered.
    let (v, _) = run(&mut l, &frame(CLIENT, 40502, VIP_EMPTY, 80, &DATA, &[]));
    assert_eq!(v, TC_ACT_SHOT);
    assert_eq!(stat(&l, Stat::Rejected), 2);

    // Endpoints exist, but none this frontend may use (none local under a Local policy): drop,
    // as kube-proxy does, not reject.
    let mut local_only = frontend("empty", Protocol::Tcp, vec![]);
    local_only.flags &= !proxy_common::SVC_F_REJECT;
    t.frontends
        .insert(addr(VIP_EMPTY, 80, IPPROTO_TCP), local_only);
    l.writer.apply(&t).unwrap();
    let (v, _) = run(&mut l, &frame(CLIENT, 40503, VIP_EMPTY, 80, &SYN, &[]));
    assert_eq!(v, TC_ACT_SHOT);
    assert_eq!(stat(&l, Stat::Rejected), 2);
}

/// `input` is answered with ICMP port unreachable from `from`, sent back to the client, quoting
/// the first `quoted` bytes of its IPv4 packet.
fn assert_port_unreachable(l: &mut Loaded, what: &str, input: &[u8], from: [u8; 4], quoted: usize) {
    let (v, out) = run(l, input);
    assert_eq!(v, TC_ACT_REDIRECT, "{what}: sent back");
    let (eth, rest) = Ethernet2Header::from_slice(&out).unwrap();
    let (in_eth, _) = Ethernet2Header::from_slice(input).unwrap();
    assert_eq!(
        (eth.source, eth.destination),
        (in_eth.destination, in_eth.source),
        "{what}: MACs swapped"
    );
    let (ip, icmp) = Ipv4Header::from_slice(rest).unwrap();
    assert_eq!(ip.header_checksum, ip.calc_header_checksum(), "{what}");
    assert_eq!(
        (ip.source, ip.destination, ip.protocol),
        (from, CLIENT, IpNumber::ICMP),
        "{what}"
    );
    assert_eq!(usize::from(ip.total_len), 20 + icmp.len(), "{what}: length");
    assert_eq!(&icmp[..2], &[3, 3], "{what}: port unreachable");
    assert_eq!(inet_csum(icmp), 0, "{what}: ICMP checksum");
    assert_eq!(
        &icmp[8..],
        &input[14..14 + quoted],
        "{what}: the quote is the original"
    );
}

/// kube-proxy's nftables mode refuses traffic to a ClusterIP on a port no Service port serves
/// (no host owns a ClusterIP, so it would otherwise wander off or time out). External IPs are
/// real addresses of something else: their other ports pass. An address whose last frontend
/// went is nobody's business again.
#[test]
fn unserved_cluster_ip_ports_are_refused() {
    if !privileged() {
        return;
    }
    let mut l = load(&[BE1]);
    const VIP_EXT: [u8; 4] = [198, 19, 0, 12];
    let udp = L4::Udp {
        zero_csum: false,
        payload: b"query",
    };
    for (what, input, quoted) in [
        (
            "TCP SYN, unserved port",
            frame(CLIENT, 41000, VIP, 81, &SYN, &[]),
            40,
        ),
        (
            "UDP, unserved port",
            frame(CLIENT, 41001, VIP, 54, &udp, &[]),
            28,
        ),
        (
            "TCP SYN to a port served for UDP only",
            frame(CLIENT, 41002, VIP, 53, &SYN, &[]),
            40,
        ),
    ] {
        assert_port_unreachable(&mut l, what, &input, VIP, quoted);
    }
    let (v, _) = run(&mut l, &frame(CLIENT, 41003, VIP, 81, &DATA, &[]));
    assert_eq!(
        v, TC_ACT_SHOT,
        "a TCP packet that is not a SYN is dropped, not answered"
    );
    assert_eq!(stat(&l, Stat::UnservedPort), 4);
    assert_eq!(stat(&l, Stat::Rejected), 3);
    // The served port still works.
    let (v, _) = run(&mut l, &frame(CLIENT, 41004, VIP, 80, &SYN, &[]));
    assert_eq!(v, NEXT, "served port translated");

    // The ClusterIP Services go, with no drain period (a draining frontend keeps its address).
    l.writer.set_endpoint_grace(Duration::ZERO);
    let mut t = Target::default();
    let be = addr(BE1, 5000, IPPROTO_TCP);
    t.backends.insert(be, BACKEND_F_ACTIVE);
    let mut ext = frontend("ext", Protocol::Tcp, vec![be]);
    ext.flags = proxy_common::SVC_F_EXTERNAL_IP;
    t.frontends.insert(addr(VIP_EXT, 80, IPPROTO_TCP), ext);
    l.writer.apply(&t).unwrap();
    for (what, input) in [
        (
            "an external IP on another port",
            frame(CLIENT, 41005, VIP_EXT, 81, &SYN, &[]),
        ),
        (
            "a former ClusterIP",
            frame(CLIENT, 41006, VIP, 81, &SYN, &[]),
        ),
    ] {
        let (v, out) = run(&mut l, &input);
        assert_eq!(v, NEXT, "{what}: passes");
        assert_eq!(out, input, "{what}: untouched");
    }
    assert_eq!(
        l.writer.vips().keys().copied().collect::<Vec<_>>(),
        [Ipv4Addr::from(VIP_EXT)],
        "only addresses with frontends are in the address map"
    );
    assert_eq!(stat(&l, Stat::UnservedPort), 4);
}

/// sessionAffinity ClientIP: every new connection of a client follows its first one; another
/// client is balanced on its own; without affinity the same client spreads.
#[test]
fn client_ip_affinity_keeps_a_client_on_one_backend() {
    if !privileged() {
        return;
    }
    let mut l = load(&[BE1, BE2]);
    let tcp: Vec<L4Addr> = [BE1, BE2]
        .iter()
        .map(|b| addr(*b, 5000, IPPROTO_TCP))
        .collect();
    let mut t = Target::default();
    for b in &tcp {
        t.backends.insert(*b, BACKEND_F_ACTIVE);
    }
    let mut web = frontend("web", Protocol::Tcp, tcp.clone());
    web.flags |= proxy_common::SVC_F_AFFINITY;
    web.affinity_timeout_s = 10800;
    t.frontends.insert(addr(VIP, 80, IPPROTO_TCP), web);
    l.writer.apply(&t).unwrap();
    let picks = |l: &mut Loaded, client: [u8; 4], ports: std::ops::Range<u16>| {
        ports
            .map(|p| inspect(&run(l, &frame(client, p, VIP, 80, &SYN, &[])).1).dst)
            .collect::<std::collections::BTreeSet<_>>()
    };
    assert_eq!(
        picks(&mut l, CLIENT, 30000..30050).len(),
        1,
        "one client, one backend"
    );
    assert!(stat(&l, Stat::AffinityHit) >= 49);
    let other_clients: std::collections::BTreeSet<_> = (20..60u8)
        .flat_map(|c| picks(&mut l, [198, 18, 64, c], 31000..31001))
        .collect();
    assert_eq!(other_clients.len(), 2, "clients are still balanced");

    // The client's backend leaves this Service but still backs another one (blue/green): the
    // client's next connection must not follow it there.
    let kept = *picks(&mut l, CLIENT, 30100..30101).iter().next().unwrap();
    let (gone, stays): (Vec<L4Addr>, Vec<L4Addr>) =
        tcp.iter().partition(|b| b.addr == Ipv4Addr::from(kept));
    let mut moved = t.clone();
    let mut web = frontend("web", Protocol::Tcp, stays.clone());
    web.flags |= proxy_common::SVC_F_AFFINITY;
    web.affinity_timeout_s = 10800;
    moved.frontends.insert(addr(VIP, 80, IPPROTO_TCP), web);
    moved.frontends.insert(
        addr(VIP_EMPTY, 8080, IPPROTO_TCP),
        frontend("preview", Protocol::Tcp, gone),
    );
    l.writer.apply(&moved).unwrap();
    assert_eq!(
        picks(&mut l, CLIENT, 30200..30210),
        [stays[0].addr.octets()].into_iter().collect(),
        "affinity never follows a backend out of its Service"
    );
    l.writer.apply(&t).unwrap();

    // Affinity switched off: the same client spreads again.
    t.frontends.insert(
        addr(VIP, 80, IPPROTO_TCP),
        frontend("web", Protocol::Tcp, tcp),
    );
    l.writer.apply(&t).unwrap();
    assert_eq!(picks(&mut l, CLIENT, 32000..32100).len(), 2);
}

/// A TCP segment with the FIN and RST flags as given (ACK set), checksums correct.
fn tcp_closing(
    src: [u8; 4],
    sport: u16,
    dst: [u8; 4],
    dport: u16,
    fin: bool,
    rst: bool,
) -> Vec<u8> {
    let mut t = TcpHeader::new(sport, dport, 2000, 64240);
    t.ack = true;
    t.acknowledgment_number = 1;
    t.fin = fin;
    t.rst = rst;
    t.checksum = t.calc_checksum_ipv4_raw(src, dst, &[]).unwrap();
    let mut buf = Vec::new();
    write_ethernet(&mut buf);
    let b = t.to_bytes();
    let mut ip = Ipv4Header::new(b.len() as u16, 64, IpNumber::TCP, src, dst).unwrap();
    ip.header_checksum = ip.calc_header_checksum();
    ip.write(&mut buf).unwrap();
    buf.extend_from_slice(&b);
    buf
}

/// `CtValue::seen` now, as userspace reads it (the coarse clock). The programs read jiffies
/// scaled onto it (`loader::write_clock`): the two agree to a tick, so a unit either way only
/// when one turns between the two reads.
fn ct_now() -> u32 {
    vipx::conntrack::now_seen()
}

/// Conntrack entries carry what garbage collection needs: when each direction was last seen,
/// whether a reply went through, and FIN/RST; a FIN or RST that finds no entry creates none.
#[test]
fn conntrack_entries_follow_the_tcp_state() {
    if !privileged() {
        return;
    }
    let mut l = load(&[BE1]);
    let before = ct_now();
    let (v, out) = run(&mut l, &frame(CLIENT, 41000, VIP, 80, &SYN, &[]));
    assert_eq!((v, inspect(&out).dst), (NEXT, BE1));
    assert_eq!(stat(&l, Stat::CtCreated), 2, "two entries for a new flow");
    // A retransmitted SYN rewrites them; nothing new is created.
    run(&mut l, &frame(CLIENT, 41000, VIP, 80, &SYN, &[]));
    assert_eq!(
        stat(&l, Stat::CtCreated),
        2,
        "a retransmission creates nothing"
    );

    let ct: HashMap<MapData, CtKey4, CtValue> = loader::open_pinned_conntrack(&l.pin_dir).unwrap();
    let fwd_key = ct_key(CLIENT, 41000, VIP, 80, IPPROTO_TCP);
    let rep_key = ct_key(BE1, 5000, CLIENT, 41000, IPPROTO_TCP);
    let fwd = ct.get(&fwd_key, 0).unwrap();
    let rep = ct.get(&rep_key, 0).unwrap();
    let after = ct_now();
    for (what, e) in [("forward", fwd), ("reply", rep)] {
        assert!(
            (before.wrapping_sub(1)..=after + 1).contains(&e.seen),
            "{what} entry seen {} outside {before}..={after} (a unit either way)",
            e.seen
        );
        assert_eq!(e.flags & CT_F_STATE, 0, "{what}: no state yet");
    }
    assert_eq!(fwd.flags & CT_F_FORWARD, CT_F_FORWARD);
    assert_eq!(rep.flags & CT_F_REPLY, CT_F_REPLY);

    // The SYN-ACK marks the flow answered.
    let (v, out) = run_on(
        &mut l,
        EGRESS,
        &frame(BE1, 5000, CLIENT, 41000, &SYNACK, &[]),
    );
    assert_eq!((v, inspect(&out).src), (NEXT, VIP));
    assert_eq!(
        ct.get(&rep_key, 0).unwrap().flags & CT_F_STATE,
        CT_F_REPLIED
    );
    // The client's FIN marks its direction.
    let (v, out) = run(&mut l, &tcp_closing(CLIENT, 41000, VIP, 80, true, false));
    assert_eq!((v, inspect(&out).dst), (NEXT, BE1));
    assert_eq!(ct.get(&fwd_key, 0).unwrap().flags & CT_F_STATE, CT_F_FIN);
    // The backend's RST marks the other.
    let (v, out) = run_on(
        &mut l,
        EGRESS,
        &tcp_closing(BE1, 5000, CLIENT, 41000, false, true),
    );
    assert_eq!((v, inspect(&out).src), (NEXT, VIP));
    assert_eq!(
        ct.get(&rep_key, 0).unwrap().flags & CT_F_STATE,
        CT_F_REPLIED | CT_F_RST
    );

    // A FIN and a RST of a flow vipx does not know (collected, or never seen) are translated
    // but leave nothing behind.
    for (port, fin, rst) in [(41001, true, false), (41002, false, true)] {
        let (v, out) = run(&mut l, &tcp_closing(CLIENT, port, VIP, 80, fin, rst));
        assert_eq!((v, inspect(&out).dst), (NEXT, BE1));
        assert!(
            ct.get(&ct_key(CLIENT, port, VIP, 80, IPPROTO_TCP), 0)
                .is_err()
        );
        assert!(
            ct.get(&ct_key(BE1, 5000, CLIENT, port, IPPROTO_TCP), 0)
                .is_err()
        );
    }
    assert_eq!(stat(&l, Stat::CtUntracked), 2);
    assert_eq!(stat(&l, Stat::CtCreated), 2);
}

/// Garbage collection over the real map: each flow goes when both of its entries have been idle
/// past what its state allows, a busy direction keeps an idle one, stale entries go, and a
/// purge takes the UDP flows of a backend that left their Service.
#[test]
fn collection_removes_what_ended_and_keeps_what_lives() {
    use vipx::conntrack::{self, Purge, Timeouts};
    if !privileged() {
        return;
    }
    let mut l = load(&[BE1]);
    const UDP: L4 = L4::Udp {
        zero_csum: false,
        payload: b"q",
    };
    let tcp = |p| ct_key(CLIENT, p, VIP, 80, IPPROTO_TCP);
    let tcp_rep = |p| ct_key(BE1, 5000, CLIENT, p, IPPROTO_TCP);
    let udp = |p| ct_key(CLIENT, p, VIP, 53, IPPROTO_UDP);
    let udp_rep = |p| ct_key(BE1, 5353, CLIENT, p, IPPROTO_UDP);
    // A: established; B: closed both ways; C: never answered; D: established, only the reply
    // direction busy; E: UDP to purge; F: UDP answered; G: never answered, then the client's
    // FIN (the SYN's timeout, not close-wait's hour: a SYN+FIN flood must not outlive it).
    for p in [42001, 42002, 42003, 42004, 42009] {
        run(&mut l, &frame(CLIENT, p, VIP, 80, &SYN, &[]));
        if p != 42003 && p != 42009 {
            run_on(&mut l, EGRESS, &frame(BE1, 5000, CLIENT, p, &SYNACK, &[]));
        }
    }
    run(&mut l, &tcp_closing(CLIENT, 42002, VIP, 80, true, false));
    run(&mut l, &tcp_closing(CLIENT, 42009, VIP, 80, true, false));
    run_on(
        &mut l,
        EGRESS,
        &tcp_closing(BE1, 5000, CLIENT, 42002, true, false),
    );
    for p in [42005, 42006] {
        run(&mut l, &frame(CLIENT, p, VIP, 53, &UDP, &[]));
    }
    run_on(&mut l, EGRESS, &frame(BE1, 5353, CLIENT, 42006, &UDP, &[]));

    let mut ct: HashMap<MapData, CtKey4, CtValue> =
        loader::open_pinned_conntrack(&l.pin_dir).unwrap();
    let now = conntrack::now_seen();
    let mut age = |k: CtKey4, units: u32| {
        let mut v = ct.get(&k, 0).unwrap();
        v.seen = now.wrapping_sub(units);
        ct.insert(k, v, 0).unwrap();
    };
    // One seen unit is 2^30 ns, about 1.07 s.
    age(tcp(42001), 100);
    age(tcp_rep(42001), 100);
    age(tcp(42002), 20);
    age(tcp_rep(42002), 20);
    age(tcp(42003), 100);
    age(tcp_rep(42003), 100);
    age(tcp(42004), 2000);
    // Past the SYN timeout (60 s), within close-wait's (100 s).
    age(tcp(42009), 80);
    age(tcp_rep(42009), 80);
    age(udp(42006), 40);
    age(udp_rep(42006), 40);
    let purge = {
        let v = ct.get(&udp(42005), 0).unwrap();
        Purge {
            rev_nat_id: v.rev_nat_id,
            rev_nat_gen: v.rev_nat_gen,
            backend_id: v.backend_id,
            backend_gen: v.backend_gen,
        }
    };
    let timeouts = Timeouts {
        tcp_established: Duration::from_secs(1000),
        tcp_close_wait: Duration::from_secs(100),
        tcp_closed: Duration::from_secs(10),
        tcp_syn: Duration::from_secs(60),
        udp: Duration::from_secs(30),
        udp_stream: Duration::from_secs(120),
    };
    let tables = loader::conntrack_tables(&l.pin_dir).unwrap();
    // F's flow is purged too (same frontend, same backend): a purge is for the whole backend.
    let purges = [purge].into_iter().collect();
    let st = conntrack::pass(&tables, &timeouts, &purges).unwrap();
    let present = |k: &CtKey4| tables.ct.get(k, 0).is_ok();
    for (what, p, kept) in [
        ("established", 42001, true),
        ("closed both ways", 42002, false),
        ("never answered", 42003, false),
        ("busy in one direction", 42004, true),
        ("never answered, then a FIN", 42009, false),
    ] {
        assert_eq!(present(&tcp(p)), kept, "{what}: forward entry");
        assert_eq!(present(&tcp_rep(p)), kept, "{what}: reply entry");
    }
    for p in [42005, 42006] {
        assert!(!present(&udp(p)) && !present(&udp_rep(p)), "UDP {p} purged");
    }
    assert_eq!((st.expired, st.stale, st.purged), (3, 0, 4), "{st:?}");
    assert_eq!((st.deleted, st.entries), (10, 4), "{st:?}");

    // Nothing purged now, and the answered UDP flow idle for 40 s lives (stream: 120 s).
    run(&mut l, &frame(CLIENT, 42007, VIP, 53, &UDP, &[]));
    run_on(&mut l, EGRESS, &frame(BE1, 5353, CLIENT, 42007, &UDP, &[]));
    let mut ct2: HashMap<MapData, CtKey4, CtValue> =
        loader::open_pinned_conntrack(&l.pin_dir).unwrap();
    for k in [udp(42007), udp_rep(42007)] {
        let mut v = ct2.get(&k, 0).unwrap();
        v.seen = now.wrapping_sub(40);
        ct2.insert(k, v, 0).unwrap();
    }
    let st = conntrack::pass(&tables, &timeouts, &Default::default()).unwrap();
    assert!(present(&udp(42007)), "{st:?}");

    // The web frontend goes (no drain period): its flows' entries are stale and go at the next
    // pass.
    l.writer.set_endpoint_grace(Duration::ZERO);
    let mut t = Target::default();
    let udp_be = addr(BE1, 5353, IPPROTO_UDP);
    t.backends.insert(udp_be, BACKEND_F_ACTIVE);
    t.frontends.insert(
        addr(VIP, 53, IPPROTO_UDP),
        frontend("dns", Protocol::Udp, vec![udp_be]),
    );
    l.writer.apply(&t).unwrap();
    let st = conntrack::pass(&tables, &timeouts, &Default::default()).unwrap();
    assert_eq!(st.stale, 4, "{st:?}");
    assert!(!present(&tcp(42001)) && !present(&tcp_rep(42004)));
    assert!(present(&udp(42007)));
}

/// A flow the walk found expired but that a packet woke before the delete is kept whole; one
/// that stayed idle goes.
#[test]
fn a_flow_touched_between_the_walk_and_the_delete_is_kept() {
    use vipx::conntrack::{self, Timeouts};
    if !privileged() {
        return;
    }
    let mut l = load(&[BE1]);
    let fwd = |p| ct_key(CLIENT, p, VIP, 80, IPPROTO_TCP);
    let rep = |p| ct_key(BE1, 5000, CLIENT, p, IPPROTO_TCP);
    for p in [44001, 44002] {
        run(&mut l, &frame(CLIENT, p, VIP, 80, &SYN, &[]));
        run_on(&mut l, EGRESS, &frame(BE1, 5000, CLIENT, p, &SYNACK, &[]));
    }
    let mut ct: HashMap<MapData, CtKey4, CtValue> =
        loader::open_pinned_conntrack(&l.pin_dir).unwrap();
    let now = conntrack::now_seen();
    for k in [fwd(44001), rep(44001), fwd(44002), rep(44002)] {
        let mut v = ct.get(&k, 0).unwrap();
        v.seen = now.wrapping_sub(2000);
        ct.insert(k, v, 0).unwrap();
    }
    let timeouts = Timeouts {
        tcp_established: Duration::from_secs(1000),
        ..Timeouts::default()
    };
    let tables = loader::conntrack_tables(&l.pin_dir).unwrap();
    let st = conntrack::pass_with_pause(&tables, &timeouts, &Default::default(), || {
        // The client sends on 44001 after the walk chose both flows.
        let (v, out) = run(&mut l, &frame(CLIENT, 44001, VIP, 80, &DATA, &[]));
        assert_eq!((v, inspect(&out).dst), (NEXT, BE1));
    })
    .unwrap();
    let present = |k: &CtKey4| tables.ct.get(k, 0).is_ok();
    assert!(
        present(&fwd(44001)) && present(&rep(44001)),
        "the woken flow keeps both entries: {st:?}"
    );
    assert!(!present(&fwd(44002)) && !present(&rep(44002)), "{st:?}");
    assert_eq!((st.expired, st.spared, st.deleted), (1, 1, 2), "{st:?}");
}

/// A purge of a UDP backend that left its Service runs later than the sync that asked for it;
/// if the backend's id was handed to another backend meanwhile, the new backend's flows of the
/// same frontend are not the ones purged.
#[test]
fn a_purge_spares_the_flows_of_a_new_backend_with_the_same_id() {
    use vipx::conntrack::{self, Timeouts};
    if !privileged() {
        return;
    }
    let mut l = load(&[BE1]);
    const UDP: L4 = L4::Udp {
        zero_csum: false,
        payload: b"q",
    };
    run(&mut l, &frame(CLIENT, 45001, VIP, 53, &UDP, &[]));
    let ct: HashMap<MapData, CtKey4, CtValue> = loader::open_pinned_conntrack(&l.pin_dir).unwrap();
    let old_fwd = ct_key(CLIENT, 45001, VIP, 53, IPPROTO_UDP);
    let old = ct.get(&old_fwd, 0).unwrap();
    // The DNS frontend moves from BE1 to BE2: BE1's UDP backend is freed at once.
    let mut t = Target::default();
    let be2 = addr(BE2, 5353, IPPROTO_UDP);
    t.backends.insert(be2, BACKEND_F_ACTIVE);
    t.frontends.insert(
        addr(VIP, 53, IPPROTO_UDP),
        frontend("dns", Protocol::Udp, vec![be2]),
    );
    l.writer.apply(&t).unwrap();
    let purges = l.writer.take_udp_purges();
    assert!(!purges.is_empty());
    // Before the purge runs, the freed id goes to a new backend (a later generation) that
    // serves the same frontend, and a client has a flow on it.
    let new_gen = old.backend_gen + 1;
    let be3 = [198, 18, 64, 13];
    let mut backends: Array<MapData, Backend4> = Array::try_from(
        aya::maps::Map::from_map_data(
            MapData::from_pin(l.pin_dir.join(map_names::BACKEND4)).unwrap(),
        )
        .unwrap(),
    )
    .unwrap();
    backends
        .set(
            old.backend_id,
            Backend4 {
                addr: be3,
                port: 5353u16.to_be_bytes(),
                proto: IPPROTO_UDP,
                flags: BACKEND_F_ACTIVE,
                generation: new_gen,
            },
            0,
        )
        .unwrap();
    let mut ct = ct;
    let now = conntrack::now_seen();
    let value = CtValue {
        backend_gen: new_gen,
        seen: now,
        ..old
    };
    let new_fwd = ct_key(CLIENT, 45002, VIP, 53, IPPROTO_UDP);
    let new_rep = ct_key(be3, 5353, CLIENT, 45002, IPPROTO_UDP);
    ct.insert(new_fwd, value, 0).unwrap();
    ct.insert(
        new_rep,
        CtValue {
            flags: CT_F_REPLY,
            ..value
        },
        0,
    )
    .unwrap();
    let tables = loader::conntrack_tables(&l.pin_dir).unwrap();
    let purges = purges.into_iter().collect();
    let st = conntrack::pass(&tables, &Timeouts::default(), &purges).unwrap();
    let present = |k: &CtKey4| tables.ct.get(k, 0).is_ok();
    assert!(!present(&old_fwd), "the old backend's flow goes: {st:?}");
    assert!(
        present(&new_fwd) && present(&new_rep),
        "the new backend's flow stays: {st:?}"
    );
}

/// A pin directory holding a conntrack map of the previous layout (LRU hash, 16-byte keys,
/// 20-byte values) pinned as `name`.
fn legacy_pin_dir(tag: &str) -> (PinDir, PathBuf) {
    static N: AtomicU32 = AtomicU32::new(0);
    let pin_dir = PathBuf::from(loader::BPFFS).join(format!(
        "vipx-test-legacy-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let pins = PinDir(pin_dir.clone());
    std::fs::create_dir_all(&pin_dir).unwrap();
    (pins, pin_dir)
}

fn pin_legacy_ct(pin_dir: &std::path::Path, name: &str) {
    let fd = legacy_lru_map(16, 20, 2048);
    let path =
        std::ffi::CString::new(pin_dir.join(name).to_str().unwrap().as_bytes().to_vec()).unwrap();
    bpf_obj_pin(&fd, &path);
}

fn open_legacy_ct(pin_dir: &std::path::Path, name: &str) -> HashMap<MapData, CtKey4, [u8; 20]> {
    HashMap::try_from(
        aya::maps::Map::from_map_data(MapData::from_pin(pin_dir.join(name)).unwrap()).unwrap(),
    )
    .unwrap()
}

fn legacy_bytes(v: &CtValue) -> [u8; 20] {
    let mut bytes = [0u8; 20];
    bytes.copy_from_slice(&bytemuck::bytes_of(v)[..20]);
    bytes
}

fn ct_pins(pin_dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(pin_dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("VIPX_CT4"))
        .collect();
    names.sort();
    names
}

const LEGACY_SIZES: MapSizes = MapSizes {
    services: 1024,
    backends: 1024,
    revnat: 256,
    conntrack: 4096,
    maglev_table_size: proxy_common::defaults::MAGLEV_TABLE_SIZE,
    maglev_tables: 0,
};

/// An upgrade from the build whose conntrack entries had no `seen` (20-byte values): the new
/// build carries every flow over instead of refusing the pin or starting empty. The copy runs
/// before the new programs are attached (the old ones still serve from the old map), and again
/// after: then only what the old programs added meanwhile, never over an entry the new
/// programs made.
#[test]
fn conntrack_of_the_previous_layout_is_carried_over() {
    if !privileged() {
        return;
    }
    let (_pins, pin_dir) = legacy_pin_dir("carry");
    pin_legacy_ct(&pin_dir, map_names::CT4);
    let key = ct_key(CLIENT, 43000, VIP, 80, IPPROTO_TCP);
    let old_value = CtValue {
        backend_id: 7,
        backend_gen: 3,
        rev_nat_id: 2,
        rev_nat_gen: 1,
        flags: CT_F_FORWARD,
        seen: 0,
    };
    open_legacy_ct(&pin_dir, map_names::CT4)
        .insert(key, legacy_bytes(&old_value), 0)
        .unwrap();
    let (_ebpf, moved) = loader::load_moving_legacy(&pin_dir, LEGACY_SIZES)
        .expect("the previous layout is moved aside");
    assert!(moved);
    // Before the swap: copied, and the old map stays (the old programs still write it).
    assert_eq!(loader::copy_legacy_conntrack(&pin_dir).unwrap(), 1);
    assert_eq!(ct_pins(&pin_dir), ["VIPX_CT4", "VIPX_CT4_v1"]);
    let mut ct: HashMap<MapData, CtKey4, CtValue> =
        loader::open_pinned_conntrack(&pin_dir).unwrap();
    let v = ct.get(&key, 0).expect("the flow is carried over");
    let now = vipx::conntrack::now_seen();
    assert_eq!(
        CtValue {
            seen: old_value.seen,
            ..v
        },
        old_value,
        "a forward entry is carried over as it was"
    );
    assert!(now.wrapping_sub(v.seen) <= 1, "stamped as seen now");

    // Between the copy and the swap the old programs track two more flows; after the swap the
    // new programs track one of them anew.
    let mut old = open_legacy_ct(&pin_dir, "VIPX_CT4_v1");
    let added = ct_key(CLIENT, 43001, VIP, 80, IPPROTO_TCP);
    let renewed = ct_key(CLIENT, 43002, VIP, 80, IPPROTO_TCP);
    old.insert(added, legacy_bytes(&old_value), 0).unwrap();
    old.insert(renewed, legacy_bytes(&old_value), 0).unwrap();
    let fresh = CtValue {
        backend_id: 9,
        seen: now,
        ..old_value
    };
    ct.insert(renewed, fresh, 0).unwrap();
    assert_eq!(loader::migrate_legacy_conntrack(&pin_dir).unwrap(), 1);
    assert_eq!(ct.get(&added, 0).unwrap().backend_id, old_value.backend_id);
    assert_eq!(
        ct.get(&renewed, 0).unwrap(),
        fresh,
        "the new programs' entry stays"
    );
    assert_eq!(ct_pins(&pin_dir), ["VIPX_CT4"], "the old map's pin is gone");
    assert_eq!(loader::migrate_legacy_conntrack(&pin_dir).unwrap(), 0);
}

/// An upgrade that fails before the new programs are attached leaves the old build's conntrack
/// map where the old programs and the old build expect it; two maps of the previous layout are
/// refused rather than one of them overwritten.
#[test]
fn a_failed_upgrade_leaves_the_previous_conntrack_in_place() {
    if !privileged() {
        return;
    }
    // The load itself fails (a pin this build refuses) after the old map was moved aside.
    let (_pins, pin_dir) = legacy_pin_dir("fail");
    pin_legacy_ct(&pin_dir, map_names::CT4);
    let key = ct_key(CLIENT, 43100, VIP, 80, IPPROTO_TCP);
    open_legacy_ct(&pin_dir, map_names::CT4)
        .insert(key, [1; 20], 0)
        .unwrap();
    pin_legacy_ct(&pin_dir, map_names::AFFINITY4);
    let Err(e) = loader::load_moving_legacy(&pin_dir, LEGACY_SIZES) else {
        panic!("an affinity map of another layout must be refused");
    };
    assert!(format!("{e:#}").contains(map_names::AFFINITY4), "{e:#}");
    assert_eq!(ct_pins(&pin_dir), ["VIPX_CT4"], "put back");
    assert_eq!(
        open_legacy_ct(&pin_dir, map_names::CT4)
            .get(&key, 0)
            .unwrap(),
        [1; 20],
        "the same map, with its flows"
    );

    // The load succeeds but vipx stops before attaching: the guard puts the old map back and
    // the new (never used) one goes.
    std::fs::remove_file(pin_dir.join(map_names::AFFINITY4)).unwrap();
    let (ebpf, moved) = loader::load_moving_legacy(&pin_dir, LEGACY_SIZES).unwrap();
    assert!(moved);
    assert_eq!(ct_pins(&pin_dir), ["VIPX_CT4", "VIPX_CT4_v1"]);
    drop(loader::LegacyConntrackGuard::new(&pin_dir, moved));
    drop(ebpf);
    assert_eq!(ct_pins(&pin_dir), ["VIPX_CT4"]);
    assert_eq!(
        open_legacy_ct(&pin_dir, map_names::CT4)
            .get(&key, 0)
            .unwrap(),
        [1; 20]
    );
    // Disarmed once the programs are attached: the old map stays aside for the migration.
    let (_ebpf, moved) = loader::load_moving_legacy(&pin_dir, LEGACY_SIZES).unwrap();
    loader::LegacyConntrackGuard::new(&pin_dir, moved).disarm();
    assert_eq!(ct_pins(&pin_dir), ["VIPX_CT4", "VIPX_CT4_v1"]);

    // Two maps of the previous layout: refused, both left as they are.
    let (_pins2, two) = legacy_pin_dir("two");
    pin_legacy_ct(&two, map_names::CT4);
    pin_legacy_ct(&two, "VIPX_CT4_v1");
    let Err(e) = loader::load_moving_legacy(&two, LEGACY_SIZES) else {
        panic!("two maps of the previous layout must be refused");
    };
    assert!(format!("{e:#}").contains("remove one"), "{e:#}");
    assert_eq!(ct_pins(&two), ["VIPX_CT4", "VIPX_CT4_v1"]);
}

/// A map as the previous build's object defined it (BPF_MAP_CREATE).
fn legacy_lru_map(key_size: u32, value_size: u32, max_entries: u32) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    #[repr(C)]
    #[derive(Default)]
    struct CreateAttr {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
    }
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
    let attr = CreateAttr {
        map_type: BPF_MAP_TYPE_LRU_HASH,
        key_size,
        value_size,
        max_entries,
        map_flags: 0,
    };
    // SAFETY: a valid bpf_attr prefix of the size given.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            &attr as *const CreateAttr,
            size_of::<CreateAttr>(),
        )
    };
    assert!(
        fd >= 0,
        "BPF_MAP_CREATE: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a new descriptor the call just returned, owned by nothing else.
    unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) }
}

fn bpf_obj_pin(fd: &std::os::fd::OwnedFd, path: &std::ffi::CStr) {
    use std::os::fd::AsRawFd;
    #[repr(C)]
    struct PinAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    const BPF_OBJ_PIN: libc::c_long = 6;
    let attr = PinAttr {
        pathname: path.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        file_flags: 0,
    };
    // SAFETY: a valid bpf_attr prefix; the path outlives the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_PIN,
            &attr as *const PinAttr,
            size_of::<PinAttr>(),
        )
    };
    assert_eq!(r, 0, "BPF_OBJ_PIN: {}", std::io::Error::last_os_error());
}

/// A pod whose Service's only backend is itself: its flow is SNATed to the hairpin address (it
/// would drop a packet from its own address) and sent straight back into it; its answer is
/// restored to come from the frontend. Both directions keep conntrack entries the collector
/// pairs up.
#[test]
fn a_pod_reaching_itself_through_its_service_is_snated_to_the_hairpin_address() {
    if !privileged() {
        return;
    }
    const HAIRPIN: [u8; 4] = [198, 18, 255, 254];
    let mut l = load(&[BE1]);
    loader::write_config(&mut l.ebpf, Some(Ipv4Addr::from(HAIRPIN))).unwrap();
    l.writer.set_hairpin(Some(Ipv4Addr::from(HAIRPIN))).unwrap();
    let macs = |f: &[u8]| (f[0..6].to_vec(), f[6..12].to_vec());

    let syn = frame(BE1, 30000, VIP, 80, &SYN, &[]);
    let (v, out) = run(&mut l, &syn);
    assert_eq!(v, TC_ACT_REDIRECT, "back into the pod");
    assert_eq!(
        inspect(&out),
        Seen {
            src: HAIRPIN,
            sport: 30000,
            dst: BE1,
            dport: 5000,
            l4_csum_ok: Some(true)
        }
    );
    assert_eq!(macs(&out), (macs(&syn).1, macs(&syn).0), "MACs swapped");

    let (v, out) = run(&mut l, &frame(BE1, 5000, HAIRPIN, 30000, &SYNACK, &[]));
    assert_eq!(v, TC_ACT_REDIRECT, "the answer goes back into the pod too");
    assert_eq!(
        inspect(&out),
        Seen {
            src: VIP,
            sport: 80,
            dst: BE1,
            dport: 30000,
            l4_csum_ok: Some(true)
        }
    );
    let (v, out) = run(&mut l, &frame(BE1, 30000, VIP, 80, &DATA, &[]));
    assert_eq!(v, TC_ACT_REDIRECT);
    assert_eq!((inspect(&out).src, inspect(&out).dst), (HAIRPIN, BE1));
    assert_eq!(stat(&l, Stat::Hairpin), 3);

    // The collector pairs the two entries (the reply is keyed by the hairpin address).
    let mut tables = loader::conntrack_tables(&l.pin_dir).unwrap();
    tables.hairpin = Some(HAIRPIN);
    let st = vipx::conntrack::pass(
        &tables,
        &vipx::conntrack::Timeouts::default(),
        &Default::default(),
    )
    .unwrap();
    assert_eq!((st.stale, st.deleted, st.entries), (0, 0, 2), "{st:?}");

    // Without a hairpin address the old behaviour stays: DNAT only.
    loader::write_config(&mut l.ebpf, None).unwrap();
    let (v, out) = run(&mut l, &frame(BE1, 30001, VIP, 80, &SYN, &[]));
    assert_eq!((v, inspect(&out).src, inspect(&out).dst), (NEXT, BE1, BE1));
}

/// A removed frontend drains: its established flows keep being translated both ways while its
/// reverse-NAT entry stays, new connections to it are not served, and a frontend re-created at
/// the same address and port gets the same id back, so those flows stay valid through it.
#[test]
fn a_removed_frontend_drains_its_flows_and_a_recreated_one_keeps_them() {
    if !privileged() {
        return;
    }
    let mut l = load(&[BE1]);
    let (v, out) = run(&mut l, &frame(CLIENT, 44000, VIP, 80, &SYN, &[]));
    assert_eq!((v, inspect(&out).dst), (NEXT, BE1));
    let web = addr(VIP, 80, IPPROTO_TCP);
    let id = l.writer.programmed().frontends[&web].rev_nat_id;
    // Every Service goes.
    l.writer.apply(&Target::default()).unwrap();
    assert!(l.writer.draining().any(|f| *f == web));
    let (v, out) = run(&mut l, &frame(CLIENT, 44000, VIP, 80, &DATA, &[]));
    assert_eq!(
        (v, inspect(&out).dst, inspect(&out).dport),
        (NEXT, BE1, 5000),
        "the established flow is still translated"
    );
    let (v, out) = run_on(&mut l, EGRESS, &frame(BE1, 5000, CLIENT, 44000, &DATA, &[]));
    assert_eq!((v, inspect(&out).src), (NEXT, VIP), "and its replies");
    assert_eq!(stat(&l, Stat::CtForward), 1, "followed by its entry");
    let syn = frame(CLIENT, 44001, VIP, 80, &SYN, &[]);
    let (v, out) = run(&mut l, &syn);
    assert_eq!((v, &out), (NEXT, &syn), "a new connection is not served");

    // Re-created: the same reverse-NAT id, and the flow carries on through the frontend.
    let mut t = Target::default();
    let be = addr(BE1, 5000, IPPROTO_TCP);
    t.backends.insert(be, BACKEND_F_ACTIVE);
    t.frontends
        .insert(web, frontend("web", Protocol::Tcp, vec![be]));
    l.writer.apply(&t).unwrap();
    assert_eq!(l.writer.programmed().frontends[&web].rev_nat_id, id);
    assert!(
        !l.writer.draining().any(|f| *f == web),
        "back, not draining"
    );
    let before = stat(&l, Stat::CtForward);
    let (v, out) = run(&mut l, &frame(CLIENT, 44000, VIP, 80, &DATA, &[]));
    assert_eq!((v, inspect(&out).dst), (NEXT, BE1));
    assert_eq!(
        stat(&l, Stat::CtForward),
        before + 1,
        "followed, not re-selected"
    );

    // Removed again and past the drain period: the id is freed, the flow is no longer followed.
    l.writer.apply(&Target::default()).unwrap();
    l.writer
        .apply_at(
            &Target::default(),
            std::time::Instant::now() + vipx::maps::DEFAULT_ENDPOINT_GRACE,
        )
        .unwrap();
    assert!(l.writer.draining().next().is_none());
    assert!(l.writer.vips().is_empty(), "{:?}", l.writer.vips());
    let data = frame(CLIENT, 44000, VIP, 80, &DATA, &[]);
    let (v, out) = run(&mut l, &data);
    assert_eq!(
        (v, &out),
        (NEXT, &data),
        "not translated after the drain period"
    );
}

/// A deleted Service port over UDP: its flows are purged from conntrack, as kube-proxy clears the
/// UDP conntrack entries of a deleted Service (`conntrack -D --orig-dst <ClusterIP> -p udp`);
/// a TCP connection of the same removal drains.
#[test]
fn a_removed_udp_frontend_loses_its_flows_and_a_tcp_one_drains() {
    use vipx::conntrack::{self, Timeouts};
    if !privileged() {
        return;
    }
    let mut l = load(&[BE1]);
    const UDP: L4 = L4::Udp {
        zero_csum: false,
        payload: b"q",
    };
    run(&mut l, &frame(CLIENT, 46001, VIP, 53, &UDP, &[]));
    run_on(&mut l, EGRESS, &frame(BE1, 5353, CLIENT, 46001, &UDP, &[]));
    run(&mut l, &frame(CLIENT, 46002, VIP, 80, &SYN, &[]));
    run_on(
        &mut l,
        EGRESS,
        &frame(BE1, 5000, CLIENT, 46002, &SYNACK, &[]),
    );
    l.writer.apply(&Target::default()).unwrap();
    assert!(l.writer.draining().count() > 0);
    let purges = l.writer.take_udp_purges().into_iter().collect();
    let tables = loader::conntrack_tables(&l.pin_dir).unwrap();
    let st = conntrack::pass(&tables, &Timeouts::default(), &purges).unwrap();
    let present = |k: &CtKey4| tables.ct.get(k, 0).is_ok();
    assert!(
        !present(&ct_key(CLIENT, 46001, VIP, 53, IPPROTO_UDP))
            && !present(&ct_key(BE1, 5353, CLIENT, 46001, IPPROTO_UDP)),
        "{st:?}"
    );
    assert_eq!(st.purged, 2, "{st:?}");
    assert!(
        present(&ct_key(CLIENT, 46002, VIP, 80, IPPROTO_TCP))
            && present(&ct_key(BE1, 5000, CLIENT, 46002, IPPROTO_TCP)),
        "{st:?}"
    );
    let (v, out) = run(&mut l, &frame(CLIENT, 46002, VIP, 80, &DATA, &[]));
    assert_eq!((v, inspect(&out).dst), (NEXT, BE1), "the TCP flow drains");
}

/// A Service shrinking: the writer lowers the count, then removes the slots beyond it. A SYN that
/// read the old count and finds its slot gone chooses among what is there instead of being
/// dropped (here the in-between state is held still: slot 2 gone, the count still 2). Slot
/// hashing: a Maglev frontend's table is swapped whole before the slots change, and only its
/// fallback reads the slots.
#[test]
fn a_syn_that_read_the_old_count_of_a_shrinking_service_is_not_dropped() {
    if !privileged() {
        return;
    }
    let l = load_with(&[BE1, BE2], LbAlgorithm::Hash);
    remove_web_slot(&l, 2);
    let mut l = l;
    for sport in 31000..31100u16 {
        let (v, out) = run(&mut l, &frame(CLIENT, sport, VIP, 80, &SYN, &[]));
        assert_eq!(v, NEXT, "source port {sport}: not dropped");
        assert_eq!(inspect(&out).dst, BE1, "source port {sport}");
    }
    assert_eq!(stat(&l, Stat::NoBackend), 0);
}

/// The Maglev table the writer put behind the web frontend, read from the pinned maps as the
/// kernel reads it: (table size, backend id per position).
fn maglev_table(l: &Loaded) -> (u32, Vec<u32>) {
    let svc: HashMap<MapData, proxy_common::SvcKey4, proxy_common::SvcValue> = HashMap::try_from(
        aya::maps::Map::from_map_data(MapData::from_pin(l.pin_dir.join(map_names::SVC4)).unwrap())
            .unwrap(),
    )
    .unwrap();
    let maglev: Array<MapData, u32> = Array::try_from(
        aya::maps::Map::from_map_data(
            MapData::from_pin(l.pin_dir.join(map_names::MAGLEV4)).unwrap(),
        )
        .unwrap(),
    )
    .unwrap();
    let head = svc
        .get(&vipx::maps::svc_key(&addr(VIP, 80, IPPROTO_TCP), 0), 0)
        .unwrap();
    assert!(
        head.flags & proxy_common::SVC_F_MAGLEV != 0,
        "web is not a Maglev frontend"
    );
    let table = head.backend_id;
    assert_ne!(table, 0, "web has no Maglev table");
    let m = maglev.get(&0, 0).unwrap();
    let base = 1 + (table - 1) * m;
    (
        m,
        (base..base + m)
            .map(|i| maglev.get(&i, 0).unwrap())
            .collect(),
    )
}

fn backend_addr(l: &Loaded, id: u32) -> [u8; 4] {
    l.writer.programmed().backends[&id].0.addr.octets()
}

/// A Maglev frontend sends each new flow to the backend at `maglev_index(flow_hash)` of the
/// table userspace computed (the same table `vipx::maglev::populate` gives for the backend set);
/// removing one of four backends changes the choice only for tuples that were on it.
#[test]
fn maglev_frontend_dnats_to_the_backend_the_table_predicts() {
    if !privileged() {
        return;
    }
    const BE3: [u8; 4] = [198, 18, 64, 13];
    const BE4: [u8; 4] = [198, 18, 64, 14];
    let mut l = load(&[BE1, BE2, BE3, BE4]);
    let (m, table) = maglev_table(&l);
    assert_eq!(m, proxy_common::defaults::MAGLEV_TABLE_SIZE);
    let set: Vec<(L4Addr, u32)> = l
        .writer
        .programmed()
        .backends
        .iter()
        .filter(|(_, (a, _))| a.proto == IPPROTO_TCP)
        .map(|(id, (a, _))| (*a, *id))
        .collect();
    assert_eq!(set.len(), 4);
    assert_eq!(
        table,
        vipx::maglev::populate(&set, m),
        "a new frontend gets the paper's table"
    );

    let predict = |table: &[u32], sport: u16| {
        let h = vipx_ebpf::flow_hash(
            CLIENT,
            VIP,
            sport.to_be_bytes(),
            80u16.to_be_bytes(),
            IPPROTO_TCP,
        );
        table[vipx_ebpf::maglev_index(h, m) as usize]
    };
    let ports = 30000..30400u16;
    let mut first = Vec::new();
    for sport in ports.clone() {
        let (v, out) = run(&mut l, &frame(CLIENT, sport, VIP, 80, &SYN, &[]));
        assert_eq!(v, NEXT);
        let s = inspect(&out);
        assert_eq!(s.l4_csum_ok, Some(true));
        let want = backend_addr(&l, predict(&table, sport));
        assert_eq!(s.dst, want, "sport {sport}");
        first.push(s.dst);
    }
    assert_eq!(stat(&l, Stat::MaglevFallback), 0);
    let mut per: std::collections::BTreeMap<[u8; 4], u32> = Default::default();
    for d in &first {
        *per.entry(*d).or_default() += 1;
    }
    assert_eq!(per.len(), 4, "all four backends get flows: {per:?}");

    // Remove BE3: a new table swapped in; SYNs from the same tuples keep their backend unless
    // it was BE3.
    let mut t = Target::default();
    let kept: Vec<L4Addr> = [BE1, BE2, BE4]
        .iter()
        .map(|b| addr(*b, 5000, IPPROTO_TCP))
        .collect();
    for b in &kept {
        t.backends.insert(*b, BACKEND_F_ACTIVE);
    }
    t.frontends.insert(
        addr(VIP, 80, IPPROTO_TCP),
        frontend("web", Protocol::Tcp, kept),
    );
    l.writer.apply(&t).unwrap();
    let (_, after) = maglev_table(&l);
    let mut moved = 0;
    let mut was_on_be3 = 0;
    for (sport, before) in ports.clone().zip(&first) {
        let (_, out) = run(&mut l, &frame(CLIENT, sport, VIP, 80, &SYN, &[]));
        let now = inspect(&out).dst;
        assert_eq!(
            now,
            backend_addr(&l, predict(&after, sport)),
            "sport {sport}"
        );
        assert_ne!(now, BE3);
        if *before == BE3 {
            was_on_be3 += 1;
        } else {
            assert_eq!(
                now, *before,
                "sport {sport} moved off a backend that stayed"
            );
        }
        if now != *before {
            moved += 1;
        }
    }
    assert_eq!(moved, was_on_be3);
    println!(
        "maglev fixture: removing 1 of 4 moved {moved} of {} tuples (all of them on the removed \
         backend)",
        ports.len()
    );

    // `vipx.io/lb-algorithm: hash` switches the frontend to slot hashing: no table.
    t.frontends
        .get_mut(&addr(VIP, 80, IPPROTO_TCP))
        .unwrap()
        .lb_algorithm = Some(LbAlgorithm::Hash);
    l.writer.apply(&t).unwrap();
    let (v, out) = run(&mut l, &frame(CLIENT, 31000, VIP, 80, &SYN, &[]));
    assert_eq!(v, NEXT);
    assert!([BE1, BE2, BE4].contains(&inspect(&out).dst));
    assert_eq!(stat(&l, Stat::MaglevFallback), 0);
}

/// The flood guard: one source opening flows far faster than the limit would push a quiet
/// client's idle connection out of a full conntrack table (shown first, without the guard);
/// with it, the source's flows beyond the limit are dropped and counted, the quiet client's
/// entries stay, and the source gets room again in the next window.
#[test]
fn a_flood_from_one_source_does_not_evict_other_clients_flows() {
    if !privileged() {
        return;
    }
    const FLOODER: [u8; 4] = [198, 18, 64, 3];
    const FLOWS: u16 = 2000;
    const LIMIT: u32 = 100;
    let quiet_fwd = ct_key(CLIENT, 41000, VIP, 80, IPPROTO_TCP);
    let quiet_rep = ct_key(BE1, 5000, CLIENT, 41000, IPPROTO_TCP);
    for guard in [0, LIMIT] {
        let mut l = load_sized(&[BE1], LbAlgorithm::Maglev, 1024);
        loader::write_flood_limit(&mut l.ebpf, guard).unwrap();
        let (v, _) = run(&mut l, &frame(CLIENT, 41000, VIP, 80, &SYN, &[]));
        assert_eq!(v, NEXT);
        let mut dropped = 0u32;
        for sport in 20000..20000 + FLOWS {
            let (v, _) = run(&mut l, &frame(FLOODER, sport, VIP, 80, &SYN, &[]));
            if v == TC_ACT_SHOT {
                dropped += 1;
            }
        }
        let ct: HashMap<MapData, CtKey4, CtValue> =
            loader::open_pinned_conntrack(&l.pin_dir).unwrap();
        let quiet_kept = ct.get(&quiet_fwd, 0).is_ok() && ct.get(&quiet_rep, 0).is_ok();
        if guard == 0 {
            assert_eq!(dropped, 0, "no guard, nothing dropped");
            assert!(
                !quiet_kept,
                "without the guard the flood evicts the quiet client's entries (else this test \
                 shows nothing)"
            );
            continue;
        }
        // The loop takes milliseconds; at most one window boundary (~1.07 s) falls inside it.
        let allowed = u32::from(FLOWS) - dropped;
        assert!(
            (LIMIT..=2 * LIMIT).contains(&allowed),
            "{allowed} flows let through with a limit of {LIMIT} a window"
        );
        assert_eq!(stat(&l, Stat::FloodDropped), u64::from(dropped));
        assert!(quiet_kept, "the quiet client's entries survive the flood");
        // Its packets still follow them, and other clients still get new flows.
        let (v, out) = run(&mut l, &frame(CLIENT, 41000, VIP, 80, &DATA, &[]));
        assert_eq!((v, inspect(&out).dst), (NEXT, BE1));
        let (v, _) = run(&mut l, &frame(CLIENT, 41001, VIP, 80, &SYN, &[]));
        assert_eq!(v, NEXT, "another source is not limited");
        // The next window gives the flooder room again (its window is aged here, not waited for).
        let mut flood: HashMap<&mut MapData, [u8; 4], proxy_common::FloodValue> =
            HashMap::try_from(l.ebpf.map_mut(map_names::FLOOD4).unwrap()).unwrap();
        let mut w = flood.get(&FLOODER, 0).unwrap();
        assert!(w.count > u64::from(LIMIT));
        w.window = w.window.wrapping_sub(1);
        flood.insert(FLOODER, w, 0).unwrap();
        let (v, _) = run(&mut l, &frame(FLOODER, 30000, VIP, 80, &SYN, &[]));
        assert_eq!(v, NEXT, "a new window lets the source start flows again");
    }
}

/// The flood guard counts the flows a source keeps open, not those it closes for good: a client
/// opening and closing connections far faster than the limit (an ingress controller, a client
/// without keep-alive; the server closing first, or the client resetting an answered flow) is
/// never dropped, through the pod program or the node program, while the same number of flows
/// left open, half-closed by the client, or reset unanswered is still limited. (Found by the bench: a load generator's closed
/// connections filled half the table, the guard engaged, and its SYNs were dropped, each a
/// second's stall.)
#[test]
fn a_client_closing_its_flows_is_not_limited_by_the_flood_guard() {
    if !privileged() {
        return;
    }
    const FLOWS: u16 = 1000;
    const LIMIT: u32 = 50;
    let mut l = load_sized(&[BE1], LbAlgorithm::Maglev, 1 << 16);
    mark_local(&l, BE1);
    node_program(&mut l)
        .load()
        .expect("verifying the node program");
    loader::write_flood_limit(&mut l.ebpf, LIMIT).unwrap();
    let mut dropped = 0u32;
    for (i, sport) in (20000..20000 + FLOWS).enumerate() {
        // Half the flows closed by the server and then the client (FIN), half answered and then
        // reset by the client; the pod's and an external client's.
        let (fin, rst) = (i % 2 == 0, i % 2 == 1);
        let server_closes = |l: &mut Loaded, client: [u8; 4]| {
            let answer = if fin {
                tcp_closing(BE1, 5000, client, sport, true, false)
            } else {
                frame(BE1, 5000, client, sport, &SYNACK, &[])
            };
            let (v, out) = run_on(l, EGRESS, &answer);
            assert_eq!(
                (v, inspect(&out).src),
                (NEXT, VIP),
                "the answer is translated"
            );
        };
        let (v, _) = run(&mut l, &frame(CLIENT, sport, VIP, 80, &SYN, &[]));
        dropped += u32::from(v == TC_ACT_SHOT);
        server_closes(&mut l, CLIENT);
        let (v, out) = run(&mut l, &tcp_closing(CLIENT, sport, VIP, 80, fin, rst));
        assert_eq!(
            (v, inspect(&out).dst),
            (NEXT, BE1),
            "the close is translated"
        );
        let (v, _) = run_node_program(
            node_program(&mut l),
            &frame(EXTERNAL, sport, VIP, 80, &SYN, &[]),
            None,
        );
        dropped += u32::from(v == XDP_DROP);
        server_closes(&mut l, EXTERNAL);
        let (v, _) = run_node_program(
            node_program(&mut l),
            &tcp_closing(EXTERNAL, sport, VIP, 80, fin, rst),
            None,
        );
        assert_eq!(v, XDP_PASS, "the external client's close is translated");
    }
    assert_eq!(dropped, 0, "flows that close are not limited");
    assert_eq!(stat(&l, Stat::FloodDropped), 0);
    // Flows left open still are (at most one window boundary falls inside the loop).
    let mut open = 0u32;
    for sport in 30000..30000 + FLOWS {
        let (v, _) = run(&mut l, &frame(CLIENT, sport, VIP, 80, &SYN, &[]));
        open += u32::from(v == NEXT);
    }
    assert!(
        (LIMIT..=2 * LIMIT + 1).contains(&open),
        "{open} open flows let through with a limit of {LIMIT} a window"
    );
    // A client's half-close (FIN before the server's), or a RST of a flow never answered, gives
    // nothing back: those entries live the close-wait and SYN timeouts.
    const HALF: [u8; 4] = [198, 18, 64, 6];
    let mut half = 0u32;
    for (i, sport) in (30000..30000 + FLOWS).enumerate() {
        let (v, _) = run(&mut l, &frame(HALF, sport, VIP, 80, &SYN, &[]));
        half += u32::from(v == NEXT);
        if v == NEXT {
            let (fin, rst) = (i % 2 == 0, i % 2 == 1);
            run(&mut l, &tcp_closing(HALF, sport, VIP, 80, fin, rst));
        }
    }
    assert!(
        (LIMIT..=2 * LIMIT + 1).contains(&half),
        "{half} half-closed or unanswered flows let through with a limit of {LIMIT} a window"
    );
    // A flow gives its count back once: a retransmitted FIN, or a RST after it, gives nothing.
    const CLOSER: [u8; 4] = [198, 18, 64, 4];
    let count_of = |l: &mut Loaded| flood_count(l, CLOSER);
    let once = (0..3).any(|attempt| {
        let base = 50000 + attempt * 10;
        for sport in base..base + 3 {
            run(&mut l, &frame(CLOSER, sport, VIP, 80, &SYN, &[]));
        }
        let (opened, window) = count_of(&mut l);
        run_on(
            &mut l,
            EGRESS,
            &tcp_closing(BE1, 5000, CLOSER, base, true, false),
        );
        run(&mut l, &tcp_closing(CLOSER, base, VIP, 80, true, false));
        run(&mut l, &tcp_closing(CLOSER, base, VIP, 80, true, false));
        run(&mut l, &tcp_closing(CLOSER, base, VIP, 80, false, true));
        let (left, _) = count_of(&mut l);
        // The programs' clock at the close (its entry's `seen`): a window that turned since the
        // SYNs' restarts the count at the next SYN, and the credit went to none: try again.
        let ct: HashMap<MapData, CtKey4, CtValue> =
            loader::open_pinned_conntrack(&l.pin_dir).unwrap();
        let closed_at = ct
            .get(&ct_key(CLOSER, base, VIP, 80, IPPROTO_TCP), 0)
            .unwrap()
            .seen;
        if window != closed_at {
            return false;
        }
        assert_eq!(left, opened - 1, "one close, one credit");
        true
    });
    assert!(once, "three windows turned during a few test runs");
    // Close to full (strict): closed flows count too, so a source churning connections (or SYN
    // and RST pairs) is held to the limit.
    const CHURNER: [u8; 4] = [198, 18, 64, 5];
    loader::write_flood_limit(&mut l.ebpf, LIMIT | proxy_common::FLOOD_STRICT).unwrap();
    let mut churned = 0u32;
    for sport in 40000..40000 + FLOWS {
        let (v, _) = run(&mut l, &frame(CHURNER, sport, VIP, 80, &SYN, &[]));
        if v == NEXT {
            churned += 1;
            run_on(
                &mut l,
                EGRESS,
                &frame(BE1, 5000, CHURNER, sport, &SYNACK, &[]),
            );
            run(&mut l, &tcp_closing(CHURNER, sport, VIP, 80, false, true));
        }
    }
    assert!(
        (LIMIT..=2 * LIMIT + 1).contains(&churned),
        "strict: {churned} closed flows let through with a limit of {LIMIT} a window"
    );
}

/// Review finding: a pod's flows to its own Service (hairpin) counted against the flood guard
/// but never gave their count back when closed, so a pod churning connections to a Service it
/// backs was held to the limit once the guard engaged. Their answers come back to the hairpin
/// address, where the credit now looks.
#[test]
fn a_pod_closing_flows_to_itself_through_its_service_is_not_limited() {
    if !privileged() {
        return;
    }
    const HAIRPIN: [u8; 4] = [198, 18, 255, 254];
    const LIMIT: u32 = 50;
    let mut l = load(&[BE1]);
    loader::write_config(&mut l.ebpf, Some(Ipv4Addr::from(HAIRPIN))).unwrap();
    l.writer.set_hairpin(Some(Ipv4Addr::from(HAIRPIN))).unwrap();
    loader::write_flood_limit(&mut l.ebpf, LIMIT).unwrap();
    let mut dropped = 0u32;
    for sport in 33000..34000u16 {
        let (v, _) = run(&mut l, &frame(BE1, sport, VIP, 80, &SYN, &[]));
        if v == TC_ACT_SHOT {
            dropped += 1;
            continue;
        }
        assert_eq!(v, TC_ACT_REDIRECT, "back into the pod");
        let (v, out) = run(&mut l, &tcp_closing(BE1, 5000, HAIRPIN, sport, true, false));
        assert_eq!(
            (v, inspect(&out).src),
            (TC_ACT_REDIRECT, VIP),
            "the server's FIN"
        );
        let (v, _) = run(&mut l, &tcp_closing(BE1, sport, VIP, 80, true, false));
        assert_eq!(v, TC_ACT_REDIRECT, "the client's FIN");
    }
    assert_eq!(dropped, 0, "flows that close are not limited");
}

/// The node program's SNAT path (backend on another node) gives a flow back when the client
/// closes it after its server did. Review finding: a reply entry the LRU had taken was put back
/// marked answered, so a client's RST of a flow its backend never answered was credited as the
/// reset of an answered one, letting a source open flows past the limit; the entry put back now
/// gives no credit.
#[test]
fn the_node_snat_path_credits_only_flows_its_server_closed() {
    if !privileged() {
        return;
    }
    const NODE: [u8; 4] = [198, 18, 0, 2];
    let ns = FibNs::create();
    let ifindex = ns.ifindex("fx0");
    // BE1 runs on another node (the map writer's default: no BACKEND_F_LOCAL).
    let mut l = load(&[BE1]);
    node_program(&mut l)
        .load()
        .expect("verifying the node program");
    loader::write_flood_limit(&mut l.ebpf, 50).unwrap();
    let run_xdp = |l: &mut Loaded, input: &[u8]| {
        let prog = node_program(l);
        ns.run(|| run_node_program(prog, input, Some(ifindex)))
    };
    // What closing one flow gave back: `None` when the guard's window turned meanwhile (the
    // count then restarts at the next SYN, and the credit went to none).
    let credit = |l: &mut Loaded, sport: u16, server_closes: bool, reply_evicted: bool| {
        let (v, out) = run_xdp(l, &frame(EXTERNAL, sport, VIP, 80, &SYN, &[]));
        assert_eq!(v, XDP_TX, "sent on to the other node");
        let port = inspect(&out).sport;
        if server_closes {
            let (v, out) = run_xdp(l, &tcp_closing(BE1, 5000, NODE, port, true, false));
            assert_eq!(
                (v, inspect(&out).dst),
                (XDP_TX, EXTERNAL),
                "the server's FIN"
            );
        }
        let mut ct: HashMap<MapData, CtKey4, CtValue> =
            loader::open_pinned_conntrack(&l.pin_dir).unwrap();
        if reply_evicted {
            ct.remove(&ct_key(BE1, 5000, NODE, port, IPPROTO_TCP))
                .unwrap();
        }
        let count_of = |l: &mut Loaded| flood_count(l, EXTERNAL);
        let (opened, window) = count_of(l);
        // The server closed: the client's FIN. Evicted: its RST, unanswered.
        let (v, out) = run_xdp(
            l,
            &tcp_closing(EXTERNAL, sport, VIP, 80, server_closes, !server_closes),
        );
        assert_eq!(
            (v, inspect(&out).dst),
            (XDP_TX, BE1),
            "the client's close is sent on"
        );
        let (left, _) = count_of(l);
        let closed_at = ct
            .get(&ct_key(EXTERNAL, sport, VIP, 80, IPPROTO_TCP), 0)
            .unwrap()
            .seen;
        (window == closed_at).then_some(opened - left)
    };
    let mut sport = 51000u16;
    let mut tried = |server_closes: bool, reply_evicted: bool| {
        (0..3)
            .find_map(|_| {
                sport += 1;
                credit(&mut l, sport, server_closes, reply_evicted)
            })
            .expect("three windows turned during a few test runs")
    };
    assert_eq!(tried(true, false), 1, "closed by its server: given back");
    assert_eq!(
        tried(false, true),
        0,
        "reset, its reply entry taken back after eviction: nothing is known of an answer"
    );
}

/// A source's flood-guard count (signed: concurrent credits may take it below zero) and the
/// window it is for.
fn flood_count(l: &mut Loaded, source: [u8; 4]) -> (i64, u32) {
    let flood: HashMap<&mut MapData, [u8; 4], proxy_common::FloodValue> =
        HashMap::try_from(l.ebpf.map_mut(map_names::FLOOD4).unwrap()).unwrap();
    let v = flood.get(&source, 0).unwrap();
    (v.count as i64, v.window)
}

/// Review finding: a pod calling its own shrinking Service, sent past itself to the next slot
/// that the shrink had just removed (its count read before the change), was dropped. It now
/// lands on slot 1 and, that being itself, is answered through the hairpin SNAT.
#[test]
fn a_pod_sent_past_itself_to_a_removed_slot_is_not_dropped() {
    if !privileged() {
        return;
    }
    const HAIRPIN: [u8; 4] = [198, 18, 255, 254];
    let mut l = load_with(&[BE1, BE2], LbAlgorithm::Hash);
    loader::write_config(&mut l.ebpf, Some(Ipv4Addr::from(HAIRPIN))).unwrap();
    l.writer.set_hairpin(Some(Ipv4Addr::from(HAIRPIN))).unwrap();
    // The in-between state of a shrink to BE1 alone, held still: slot 2 gone, the count 2.
    remove_web_slot(&l, 2);
    for sport in 32000..32050u16 {
        let (v, out) = run(&mut l, &frame(BE1, sport, VIP, 80, &SYN, &[]));
        assert_eq!(
            v, TC_ACT_REDIRECT,
            "source port {sport}: answered, not dropped"
        );
        assert_eq!(
            (inspect(&out).src, inspect(&out).dst),
            (HAIRPIN, BE1),
            "source port {sport}"
        );
    }
    assert_eq!(stat(&l, Stat::NoBackend), 0);
}

/// Review finding: the memory-scaled default asked a restarted or upgraded vipx for another
/// conntrack size than its pin (524,288 from the previous build on an 8 GiB node), and the pin
/// was refused. Without `--max-conntrack`, the pinned size is the default.
#[test]
fn the_default_conntrack_size_is_the_pinned_one() {
    if !privileged() {
        return;
    }
    let l = load(&[BE1]);
    assert_eq!(loader::default_conntrack_entries(&l.pin_dir), 4096);
    let none = PathBuf::from(loader::BPFFS).join(format!("vipx-test-none-{}", std::process::id()));
    assert_eq!(
        Some(loader::default_conntrack_entries(&none)),
        loader::conntrack_entries_for_memory(),
        "no pin: scaled to memory"
    );
}

/// Review finding: a purge for a removed UDP frontend ran late, after its reverse-NAT id went
/// to a new frontend, and removed the new frontend's flows to a backend they share. The purge
/// names the reverse-NAT generation too.
#[test]
fn a_purge_spares_the_flows_of_a_new_frontend_with_the_same_id() {
    use vipx::conntrack::{self, Purge, Timeouts};
    if !privileged() {
        return;
    }
    let mut l = load(&[BE1]);
    const UDP: L4 = L4::Udp {
        zero_csum: false,
        payload: b"q",
    };
    run(&mut l, &frame(CLIENT, 45011, VIP, 53, &UDP, &[]));
    let tables = loader::conntrack_tables(&l.pin_dir).unwrap();
    let fwd = ct_key(CLIENT, 45011, VIP, 53, IPPROTO_UDP);
    let v = tables.ct.get(&fwd, 0).unwrap();
    // Asked for while the id meant the frontend before this one (an older generation).
    let late = Purge {
        rev_nat_id: v.rev_nat_id,
        rev_nat_gen: v.rev_nat_gen.wrapping_sub(1),
        backend_id: v.backend_id,
        backend_gen: v.backend_gen,
    };
    let st = conntrack::pass(&tables, &Timeouts::default(), &[late].into()).unwrap();
    assert!(
        tables.ct.get(&fwd, 0).is_ok(),
        "the new frontend's flow stays: {st:?}"
    );
    let due = Purge {
        rev_nat_gen: v.rev_nat_gen,
        ..late
    };
    conntrack::pass(&tables, &Timeouts::default(), &[due].into()).unwrap();
    assert!(
        tables.ct.get(&fwd, 0).is_err(),
        "a purge of its own generation removes it"
    );
}

/// Review finding: under Maglev, affinity was checked by the table position it was chosen at,
/// so adding a backend took about 1/(N+1) of the clients off theirs (the position now named
/// the new one). kube-proxy keeps a client on its endpoint while the endpoint is there; so does
/// the membership map. Forty clients each open a flow, a third backend is added, and every
/// client's next flows stay on its backend; a client whose backend leaves moves.
#[test]
fn affinity_survives_a_backend_added_under_maglev() {
    if !privileged() {
        return;
    }
    const BE3: [u8; 4] = [198, 18, 64, 13];
    let mut l = load(&[BE1, BE2]);
    let target = |backends: &[[u8; 4]]| {
        let tcp: Vec<L4Addr> = backends
            .iter()
            .map(|b| addr(*b, 5000, IPPROTO_TCP))
            .collect();
        let mut t = Target::default();
        for b in &tcp {
            t.backends.insert(*b, BACKEND_F_ACTIVE);
        }
        let mut web = frontend("web", Protocol::Tcp, tcp);
        web.flags |= proxy_common::SVC_F_AFFINITY;
        web.affinity_timeout_s = 10800;
        t.frontends.insert(addr(VIP, 80, IPPROTO_TCP), web);
        t
    };
    l.writer.apply(&target(&[BE1, BE2])).unwrap();
    let pick = |l: &mut Loaded, client: [u8; 4], port: u16| {
        inspect(&run(l, &frame(client, port, VIP, 80, &SYN, &[])).1).dst
    };
    let clients: Vec<[u8; 4]> = (100..140u8).map(|c| [198, 18, 64, c]).collect();
    let first: Vec<[u8; 4]> = clients.iter().map(|c| pick(&mut l, *c, 30000)).collect();
    l.writer.apply(&target(&[BE1, BE2, BE3])).unwrap();
    for (c, was) in clients.iter().zip(&first) {
        for port in 30001..30004 {
            assert_eq!(
                pick(&mut l, *c, port),
                *was,
                "client {c:?} port {port}: kept on its backend after a backend was added"
            );
        }
    }
    // Without affinity the same flows would spread onto the new backend: the table changed.
    let fresh: std::collections::BTreeSet<_> = (200..240u8)
        .map(|c| pick(&mut l, [198, 18, 64, c], 30000))
        .collect();
    assert!(fresh.contains(&BE3), "new clients reach the added backend");
    // A backend removed: its clients move.
    l.writer.apply(&target(&[BE2, BE3])).unwrap();
    for (c, was) in clients.iter().zip(&first) {
        let now = pick(&mut l, *c, 30010);
        assert_ne!(now, BE1, "client {c:?} left the removed backend");
        if *was != BE1 {
            assert_eq!(now, *was, "client {c:?} stays");
        }
    }
}

/// Remove slot `slot` of the web frontend behind the writer's back: the in-between state of a
/// shrink (slots removed, count not yet lowered), held still.
fn remove_web_slot(l: &Loaded, slot: u16) {
    let mut svc: HashMap<MapData, proxy_common::SvcKey4, proxy_common::SvcValue> =
        HashMap::try_from(
            aya::maps::Map::from_map_data(
                MapData::from_pin(l.pin_dir.join(map_names::SVC4)).unwrap(),
            )
            .unwrap(),
        )
        .unwrap();
    svc.remove(&proxy_common::SvcKey4::new(
        VIP,
        80,
        IPPROTO_TCP,
        proxy_common::SCOPE_EXTERNAL,
        slot,
    ))
    .unwrap();
}

/// An external flow sent on to another node's backend (DNAT + SNAT in the node program) pairs
/// its two conntrack entries through the SNAT map: closed both ways, it goes whole with its SNAT
/// entries (its port, locked by the reply entry, is free again; SNAT entries left behind would
/// fill the map and push live flows' out of its LRU); an established one stays; a reply entry
/// just written, whose SNAT entries the node program has not written yet, is not stale.
#[test]
fn collection_pairs_the_entries_of_snat_flows_and_frees_their_ports() {
    use proxy_common::{CT_F_SNAT, SnatValue4};
    use vipx::conntrack::{self, Timeouts};
    if !privileged() {
        return;
    }
    const NODE: [u8; 4] = [198, 18, 0, 1];
    let mut l = load(&[BE1]);
    // The ids and generations a flow to the frontend carries.
    run(&mut l, &frame(CLIENT, 42001, VIP, 80, &SYN, &[]));
    let mut ct: HashMap<MapData, CtKey4, CtValue> =
        loader::open_pinned_conntrack(&l.pin_dir).unwrap();
    let ids = ct
        .get(&ct_key(CLIENT, 42001, VIP, 80, IPPROTO_TCP), 0)
        .unwrap();
    let mut tables = loader::conntrack_tables(&l.pin_dir).unwrap();
    let now = conntrack::now_seen();
    // Flow p: the client's port p, SNAT port 61000 + p % 1000.
    let fwd = |p: u16| ct_key(EXTERNAL, p, VIP, 80, IPPROTO_TCP);
    let rep = |p: u16| ct_key(BE1, 5000, NODE, 61_000 + p % 1000, IPPROTO_TCP);
    for (p, closed) in [(50001u16, true), (50002, false)] {
        let state = if closed { CT_F_FIN } else { 0 };
        let age = if closed { 20 } else { 100 };
        let v = |flags| CtValue {
            flags: flags | CT_F_SNAT | state,
            seen: now.wrapping_sub(age),
            ..ids
        };
        ct.insert(fwd(p), v(CT_F_FORWARD), 0).unwrap();
        ct.insert(rep(p), v(CT_F_REPLY | CT_F_REPLIED), 0).unwrap();
        let snat = tables.snat.as_mut().expect("VIPX_SNAT4 pinned");
        let leave_as = SnatValue4 {
            addr: NODE,
            port: (61_000 + p % 1000).to_be_bytes(),
            _pad: [0; 2],
        };
        let client = SnatValue4 {
            addr: EXTERNAL,
            port: p.to_be_bytes(),
            _pad: [0; 2],
        };
        snat.insert(fwd(p), leave_as, 0).unwrap();
        snat.insert(rep(p), client, 0).unwrap();
    }
    // A port just locked (the node program is between the two inserts).
    let young = ct_key(BE1, 5000, NODE, 61_999, IPPROTO_TCP);
    ct.insert(
        young,
        CtValue {
            flags: CT_F_REPLY | CT_F_SNAT,
            seen: now,
            ..ids
        },
        0,
    )
    .unwrap();
    let timeouts = Timeouts {
        tcp_established: Duration::from_secs(1000),
        tcp_close_wait: Duration::from_secs(100),
        tcp_closed: Duration::from_secs(10),
        tcp_syn: Duration::from_secs(60),
        udp: Duration::from_secs(30),
        udp_stream: Duration::from_secs(120),
    };
    let st = conntrack::pass(&tables, &timeouts, &Default::default()).unwrap();
    let in_ct = |k: &CtKey4| tables.ct.get(k, 0).is_ok();
    let in_snat = |k: &CtKey4| tables.snat.as_ref().unwrap().get(k, 0).is_ok();
    for k in [fwd(50001), rep(50001)] {
        assert!(!in_ct(&k), "closed SNAT flow left {k:?} ({st:?})");
        assert!(
            !in_snat(&k),
            "closed SNAT flow left its SNAT entry {k:?} ({st:?})"
        );
    }
    assert!(
        in_ct(&young),
        "a port being locked was taken for stale ({st:?})"
    );
    for k in [fwd(50002), rep(50002)] {
        assert!(
            in_ct(&k) && in_snat(&k),
            "established SNAT flow lost {k:?} ({st:?})"
        );
    }
    assert_eq!(st.expired, 1, "{st:?}");
}

/// The external client of the node program's fixtures, and the XDP verdicts they expect.
const EXTERNAL: [u8; 4] = [198, 18, 0, 100];
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

fn node_program(l: &mut Loaded) -> &mut aya::programs::Xdp {
    l.ebpf
        .program_mut(prog_names::NODE_XDP)
        .unwrap()
        .try_into()
        .unwrap()
}

/// One run of the node program on `input` (as received on interface `ifindex`, whose namespace's
/// FIB the program then asks; the calling thread must be in it): verdict and output frame.
fn run_node_program(
    prog: &mut aya::programs::Xdp,
    input: &[u8],
    ifindex: Option<u32>,
) -> (u32, Vec<u8>) {
    // `struct xdp_md`: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
    // egress_ifindex.
    let ctx: Option<Vec<u8>> = ifindex.map(|i| {
        [0, input.len() as u32, 0, i, 0, 0]
            .iter()
            .flat_map(|v: &u32| v.to_ne_bytes())
            .collect()
    });
    let mut out = vec![0u8; input.len() + 256];
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(input),
            data_out: Some(&mut out),
            ctx_in: ctx.as_deref(),
            ..TestRunOptions::default()
        })
        .expect("test run");
    out.truncate(r.data_size_out as usize);
    (r.return_value, out)
}

/// The node program (XDP on the node's interfaces) for a client outside the cluster whose
/// backend runs on this node: DNAT (with checksums recomputed independently) and XDP_PASS for a
/// SYN, the next packet of the flow and a UDP datagram (a zero UDP checksum stays zero); the
/// pod's answer restored to the frontend by the pod egress program, as on the node interface's
/// egress; a FIN that finds no entry translated without leaving one; a frontend without
/// endpoints, and what is not to a frontend, handed to the stack untouched.
#[test]
fn node_program_dnats_external_flows_to_local_backends() {
    if !privileged() {
        return;
    }
    let mut l = load(&[BE1]);
    mark_local(&l, BE1);
    node_program(&mut l)
        .load()
        .expect("verifying the node program");
    let run_xdp = |l: &mut Loaded, input: &[u8]| run_node_program(node_program(l), input, None);
    let seen = |src, sport, dst, dport, csum| Seen {
        src,
        sport,
        dst,
        dport,
        l4_csum_ok: csum,
    };
    for (what, input) in [
        ("SYN", frame(EXTERNAL, 50000, VIP, 80, &SYN, &[])),
        ("data", frame(EXTERNAL, 50000, VIP, 80, &DATA, &[])),
    ] {
        let (v, out) = run_xdp(&mut l, &input);
        assert_eq!(v, XDP_PASS, "{what}");
        assert_eq!(
            inspect(&out),
            seen(EXTERNAL, 50000, BE1, 5000, Some(true)),
            "{what}"
        );
    }
    assert_eq!(stat(&l, Stat::NodeNewLocal), 1);
    assert_eq!(stat(&l, Stat::NodeTranslated), 1);
    // The pod's answer, on its way out of the node.
    let (v, out) = run_on(
        &mut l,
        EGRESS,
        &frame(BE1, 5000, EXTERNAL, 50000, &SYNACK, &[]),
    );
    assert_eq!(v, NEXT);
    assert_eq!(inspect(&out), seen(VIP, 80, EXTERNAL, 50000, Some(true)));

    const UDP: L4 = L4::Udp {
        zero_csum: false,
        payload: b"q",
    };
    const UDP0: L4 = L4::Udp {
        zero_csum: true,
        payload: b"q",
    };
    let (v, out) = run_xdp(&mut l, &frame(EXTERNAL, 50001, VIP, 53, &UDP, &[]));
    assert_eq!(v, XDP_PASS);
    assert_eq!(inspect(&out), seen(EXTERNAL, 50001, BE1, 5353, Some(true)));
    let (_, out) = run_xdp(&mut l, &frame(EXTERNAL, 50002, VIP, 53, &UDP0, &[]));
    assert_eq!(inspect(&out), seen(EXTERNAL, 50002, BE1, 5353, None));

    // A FIN that finds nothing: translated, nothing tracked.
    let fin = tcp_closing(EXTERNAL, 50003, VIP, 80, true, false);
    let (v, out) = run_xdp(&mut l, &fin);
    assert_eq!(v, XDP_PASS);
    assert_eq!(inspect(&out), seen(EXTERNAL, 50003, BE1, 5000, Some(true)));
    let ct: HashMap<MapData, CtKey4, CtValue> = loader::open_pinned_conntrack(&l.pin_dir).unwrap();
    assert!(
        ct.get(&ct_key(EXTERNAL, 50003, VIP, 80, IPPROTO_TCP), 0)
            .is_err()
    );
    assert!(
        ct.get(&ct_key(BE1, 5000, EXTERNAL, 50003, IPPROTO_TCP), 0)
            .is_err()
    );

    // A frontend without endpoints that is not a node port (the node does not own its
    // address: the stack would forward it on) is dropped; a packet to no frontend goes to the
    // stack untouched.
    let (v, _) = run_xdp(&mut l, &frame(EXTERNAL, 50004, VIP_EMPTY, 80, &SYN, &[]));
    assert_eq!(v, 1, "XDP_DROP");
    let input = frame(EXTERNAL, 50005, BE2, 80, &SYN, &[]);
    let (v, out) = run_xdp(&mut l, &input);
    assert_eq!(v, XDP_PASS);
    assert_eq!(out, input);

    // A pod's flow on the same tuple (its entry made by the pod program) is not the node
    // program's to follow as established: it is balanced as a new external flow.
    let (v, _) = run(&mut l, &frame(CLIENT, 42000, VIP, 80, &SYN, &[]));
    assert_eq!(v, NEXT);
    let translated = stat(&l, Stat::NodeTranslated);
    let new_local = stat(&l, Stat::NodeNewLocal);
    run_xdp(&mut l, &frame(CLIENT, 42000, VIP, 80, &DATA, &[]));
    assert_eq!(
        (stat(&l, Stat::NodeTranslated), stat(&l, Stat::NodeNewLocal)),
        (translated, new_local + 1),
        "a pod's conntrack entry followed by the node program"
    );
    // Entries of builds before these flags carry neither: both programs follow them (an
    // upgrade keeps the flows in flight on their backends).
    let mut ct: HashMap<MapData, CtKey4, CtValue> =
        loader::open_pinned_conntrack(&l.pin_dir).unwrap();
    for (sport, made) in [(42001u16, "pod"), (42002, "node")] {
        let syn = frame(CLIENT, sport, VIP, 80, &SYN, &[]);
        if made == "pod" {
            run(&mut l, &syn);
        } else {
            run_xdp(&mut l, &syn);
        }
        let key = ct_key(CLIENT, sport, VIP, 80, IPPROTO_TCP);
        let mut old = ct.get(&key, 0).unwrap();
        old.flags &= !(proxy_common::CT_F_NODE | proxy_common::CT_F_POD);
        ct.insert(key, old, 0).unwrap();
        let data = frame(CLIENT, sport, VIP, 80, &DATA, &[]);
        let (translated, forward) = (stat(&l, Stat::NodeTranslated), stat(&l, Stat::CtForward));
        let (v, out) = run_xdp(&mut l, &data);
        assert_eq!(
            (v, inspect(&out).dst),
            (XDP_PASS, BE1),
            "{made}'s old entry"
        );
        let (v, out) = run(&mut l, &data);
        assert_eq!((v, inspect(&out).dst), (NEXT, BE1), "{made}'s old entry");
        assert_eq!(
            (stat(&l, Stat::NodeTranslated), stat(&l, Stat::CtForward)),
            (translated + 1, forward + 1),
            "an old {made} entry followed by both programs"
        );
    }

    // Every Service goes. The flow established above is followed by its conntrack entry alone
    // while its frontend drains, as the pod program does; a new connection is not served.
    l.writer.apply(&Target::default()).unwrap();
    let (v, out) = run_xdp(&mut l, &frame(EXTERNAL, 50000, VIP, 80, &DATA, &[]));
    assert_eq!(v, XDP_PASS);
    assert_eq!(
        inspect(&out),
        seen(EXTERNAL, 50000, BE1, 5000, Some(true)),
        "an established flow while its frontend drains"
    );
    let syn = frame(EXTERNAL, 50006, VIP, 80, &SYN, &[]);
    let (v, out) = run_xdp(&mut l, &syn);
    assert_eq!(
        (v, &out),
        (XDP_PASS, &syn),
        "a new connection is not served"
    );
    // The drain over: the port is no frontend's (its bit cleared), and the flow's packets go to
    // the stack as they came.
    l.writer
        .apply_at(
            &Target::default(),
            std::time::Instant::now() + Duration::from_secs(24 * 3600),
        )
        .unwrap();
    let data = frame(EXTERNAL, 50000, VIP, 80, &DATA, &[]);
    let (v, out) = run_xdp(&mut l, &data);
    assert_eq!((v, &out), (XDP_PASS, &data), "after the drain");
}

/// `loadBalancerSourceRanges` hold for every packet of a flow from outside, not only its first:
/// narrowed so that the client is outside them, its established flow is dropped; with the
/// ranges gone, the flow is followed as it was (not balanced afresh).
#[test]
fn node_program_checks_established_flows_against_source_ranges() {
    if !privileged() {
        return;
    }
    const LB: [u8; 4] = [198, 19, 250, 1];
    let mut l = load(&[BE1]);
    node_program(&mut l)
        .load()
        .expect("verifying the node program");
    let trie =
        aya::maps::LpmTrie::try_from(l.ebpf.take_map(map_names::SRCRANGE4).unwrap()).unwrap();
    let mut ranges = vipx::ranges::SourceRanges::new(trie);
    let be = addr(BE1, 5000, IPPROTO_TCP);
    let lb = addr(LB, 80, IPPROTO_TCP);
    let mut program = |l: &mut Loaded, allowed: Vec<(Ipv4Addr, u8)>| {
        let mut t = Target::default();
        t.backends
            .insert(be, BACKEND_F_ACTIVE | proxy_common::BACKEND_F_LOCAL);
        let mut f = frontend("lb", Protocol::Tcp, vec![be]);
        f.flags = proxy_common::SVC_F_LOAD_BALANCER;
        if !allowed.is_empty() {
            f.flags |= proxy_common::SVC_F_SOURCE_RANGES;
        }
        f.source_ranges = allowed;
        t.frontends.insert(lb, f);
        // As `run.rs` does: unflag what changes, write the ranges, flag what is whole.
        l.writer.apply(&t).unwrap();
        let changing = ranges.changing(&t, l.writer.programmed());
        l.writer.unflag_source_ranges(&changing).unwrap();
        ranges.sync(&t, l.writer.programmed()).unwrap();
        l.writer.flag_source_ranges(&ranges.ids()).unwrap();
    };
    let run_xdp = |l: &mut Loaded, input: &[u8]| run_node_program(node_program(l), input, None);
    program(&mut l, vec![(Ipv4Addr::from(EXTERNAL), 32)]);
    for (what, input) in [
        ("SYN", frame(EXTERNAL, 51000, LB, 80, &SYN, &[])),
        ("data", frame(EXTERNAL, 51000, LB, 80, &DATA, &[])),
    ] {
        let (v, out) = run_xdp(&mut l, &input);
        assert_eq!(
            (v, inspect(&out).dst),
            (XDP_PASS, BE1),
            "{what} inside the ranges"
        );
    }
    program(&mut l, vec![(Ipv4Addr::new(198, 18, 9, 0), 24)]);
    let (v, _) = run_xdp(&mut l, &frame(EXTERNAL, 51000, LB, 80, &DATA, &[]));
    assert_eq!(
        v, XDP_DROP,
        "an established flow from outside narrowed ranges"
    );
    assert_eq!(stat(&l, Stat::SourceRangeDropped), 1);
    program(&mut l, Vec::new());
    let (v, out) = run_xdp(&mut l, &frame(EXTERNAL, 51000, LB, 80, &DATA, &[]));
    assert_eq!((v, inspect(&out).dst), (XDP_PASS, BE1), "the ranges gone");
    assert_eq!(
        stat(&l, Stat::NodeNewLocal),
        1,
        "followed, not balanced afresh"
    );
}

/// A network namespace for the node program's FIB lookups: interface `fx0` (198.18.0.2/24,
/// forwarding on) with static neighbours for node 1 (198.18.0.1, which routes the pods'
/// 198.18.64.0/24) and the external client (198.18.0.100). Removed on drop.
struct FibNs {
    name: String,
}

const FIB_NODE1_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x11];
const FIB_CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x64];

impl FibNs {
    fn create() -> Self {
        let name = format!("vipx-fx-{}", std::process::id());
        let ip = |args: &[&str]| {
            let st = std::process::Command::new("ip")
                .args(args)
                .status()
                .expect("running ip");
            assert!(st.success(), "ip {args:?}");
        };
        // One left by a crashed run of this very process id.
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(std::process::Stdio::null())
            .status();
        ip(&["netns", "add", &name]);
        let ns = Self { name };
        let n = ns.name.as_str();
        ip(&[
            "-n", n, "link", "add", "fx0", "type", "veth", "peer", "name", "fx1",
        ]);
        ip(&["-n", n, "link", "set", "fx0", "up"]);
        ip(&["-n", n, "link", "set", "fx1", "up"]);
        ip(&["-n", n, "addr", "add", "198.18.0.2/24", "dev", "fx0"]);
        ip(&[
            "-n",
            n,
            "route",
            "add",
            "198.18.64.0/24",
            "via",
            "198.18.0.1",
            "dev",
            "fx0",
        ]);
        for (addr, mac) in [
            ("198.18.0.1", FIB_NODE1_MAC),
            ("198.18.0.100", FIB_CLIENT_MAC),
        ] {
            let mac: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
            ip(&[
                "-n",
                n,
                "neigh",
                "add",
                addr,
                "lladdr",
                &mac.join(":"),
                "dev",
                "fx0",
                "nud",
                "permanent",
            ]);
        }
        ns.run(|| std::fs::write("/proc/sys/net/ipv4/conf/all/forwarding", "1"))
            .expect("forwarding on");
        ns
    }

    /// `f` on a thread inside the namespace.
    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let file = std::fs::File::open(&path).expect("opening the namespace");
                // SAFETY: setns on this thread only, with a namespace file we hold open.
                let rc = unsafe {
                    libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET)
                };
                assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .expect("the namespace thread")
        })
    }

    fn ifindex(&self, name: &str) -> u32 {
        let name = std::ffi::CString::new(name).unwrap();
        // SAFETY: NUL-terminated name we own.
        self.run(|| unsafe { libc::if_nametoindex(name.as_ptr()) })
    }
}

impl Drop for FibNs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// The node program for an external client whose backend runs on another node: DNAT and SNAT
/// to this node's address and a port of the SNAT range, MACs from the FIB, sent back out
/// (XDP_TX); the backend's answer translated back to the client from the frontend and sent out
/// the same way. Checksums recomputed independently, TCP and UDP (a zero UDP checksum stays
/// zero), as a node sees them (a NIC hands XDP finished checksums).
#[test]
fn node_program_dnats_and_snats_flows_to_other_nodes_and_back() {
    if !privileged() {
        return;
    }
    const NODE: [u8; 4] = [198, 18, 0, 2];
    // The IPv4 TTL's offset in a frame.
    const IP_TTL: usize = 14 + 8;
    let ns = FibNs::create();
    let ifindex = ns.ifindex("fx0");
    assert_ne!(ifindex, 0);
    // BE1 runs on another node (the map writer's default: no BACKEND_F_LOCAL).
    let mut l = load(&[BE1]);
    node_program(&mut l)
        .load()
        .expect("verifying the node program");
    // The FIB it asks is the namespace of the interface the packet "came in on".
    let run_xdp = |l: &mut Loaded, input: &[u8]| {
        let prog = node_program(l);
        ns.run(|| run_node_program(prog, input, Some(ifindex)))
    };
    let macs = |frame: &[u8]| -> ([u8; 6], [u8; 6]) {
        let (eth, _) = Ethernet2Header::from_slice(frame).unwrap();
        (eth.destination, eth.source)
    };
    const UDP0: L4 = L4::Udp {
        zero_csum: true,
        payload: b"q",
    };
    for (what, proto, dport, bport, l4, csum) in [
        ("TCP", IPPROTO_TCP, 80u16, 5000u16, &SYN, Some(true)),
        ("UDP, zero checksum", IPPROTO_UDP, 53, 5353, &UDP0, None),
    ] {
        let (v, out) = run_xdp(&mut l, &frame(EXTERNAL, 50000, VIP, dport, l4, &[]));
        assert_eq!(v, XDP_TX, "{what}: sent back out");
        let seen = inspect(&out);
        assert_eq!(
            (seen.src, seen.dst, seen.dport),
            (NODE, BE1, bport),
            "{what}"
        );
        // Forwarded as a router would: one off the TTL (64), the header sum checked by inspect.
        assert_eq!(out[IP_TTL], 63, "{what}: TTL");
        assert!(
            (proxy_common::SNAT_PORT_MIN..=proxy_common::SNAT_PORT_MAX).contains(&seen.sport),
            "{what}: SNAT port {}",
            seen.sport
        );
        assert_eq!(seen.l4_csum_ok, csum, "{what}: L4 checksum");
        assert_eq!(
            macs(&out).0,
            FIB_NODE1_MAC,
            "{what}: to node 1, the next hop"
        );
        // The answer, to the SNAT port.
        let answer = if proto == IPPROTO_TCP { SYNACK } else { UDP0 };
        let (v, out) = run_xdp(&mut l, &frame(BE1, bport, NODE, seen.sport, &answer, &[]));
        assert_eq!(v, XDP_TX, "{what}: answer sent back out");
        assert_eq!(
            inspect(&out),
            Seen {
                src: VIP,
                sport: dport,
                dst: EXTERNAL,
                dport: 50000,
                l4_csum_ok: csum,
            },
            "{what}: answer restored"
        );
        assert_eq!(macs(&out).0, FIB_CLIENT_MAC, "{what}: to the client");
        assert_eq!(out[IP_TTL], 63, "{what}: answer's TTL");
    }
    assert_eq!(stat(&l, Stat::NodeNewRemote), 2);
    assert_eq!(stat(&l, Stat::NodeTranslated), 2);
    // A packet that would leave with a TTL of 0 is dropped, as a router drops it.
    let mut spent = frame(EXTERNAL, 50001, VIP, 80, &SYN, &[]);
    spent[IP_TTL] = 1;
    let (v, _) = run_xdp(&mut l, &spent);
    assert_eq!(v, XDP_DROP, "TTL 1");
    assert_eq!(stat(&l, Stat::NodeTtlExceeded), 1);
}

/// The node program at TC ingress (where native XDP cannot attach): the same DNAT to a local
/// backend, its L4 checksum updated through the kernel's helper (checked independently here,
/// for the whole sums a test run carries), TCP and UDP, a zero UDP checksum kept zero, and the
/// packet handed on to the stack.
#[test]
fn node_program_at_tc_ingress_dnats_external_flows_to_local_backends() {
    if !privileged() {
        return;
    }
    let mut l = load(&[BE1]);
    mark_local(&l, BE1);
    let tc: &mut SchedClassifier = l
        .ebpf
        .program_mut(prog_names::NODE_TC)
        .unwrap()
        .try_into()
        .unwrap();
    tc.load().expect("verifying the node program at TC");
    const UDP: L4 = L4::Udp {
        zero_csum: false,
        payload: b"q",
    };
    const UDP0: L4 = L4::Udp {
        zero_csum: true,
        payload: b"q",
    };
    for (what, input, sport, bport, csum) in [
        (
            "SYN",
            frame(EXTERNAL, 50000, VIP, 80, &SYN, &[]),
            50000,
            5000,
            Some(true),
        ),
        (
            "data",
            frame(EXTERNAL, 50000, VIP, 80, &DATA, &[]),
            50000,
            5000,
            Some(true),
        ),
        (
            "UDP",
            frame(EXTERNAL, 50001, VIP, 53, &UDP, &[]),
            50001,
            5353,
            Some(true),
        ),
        (
            "UDP, zero checksum",
            frame(EXTERNAL, 50002, VIP, 53, &UDP0, &[]),
            50002,
            5353,
            None,
        ),
    ] {
        let (v, out) = run_on(&mut l, prog_names::NODE_TC, &input);
        assert_eq!(v, NEXT, "{what}: on to the stack");
        assert_eq!(
            inspect(&out),
            Seen {
                src: EXTERNAL,
                sport,
                dst: BE1,
                dport: bport,
                l4_csum_ok: csum,
            },
            "{what}"
        );
    }
    assert_eq!(stat(&l, Stat::NodeNewLocal), 3);
    assert_eq!(stat(&l, Stat::NodeTranslated), 1);
}

/// Backend `addr` runs on this node: what the map writer sets from the endpoint's nodeName.
fn mark_local(l: &Loaded, addr: [u8; 4]) {
    let mut backends: Array<MapData, Backend4> = Array::try_from(aya::maps::Map::Array(
        MapData::from_pin(l.pin_dir.join(map_names::BACKEND4)).unwrap(),
    ))
    .unwrap();
    for id in 1..16u32 {
        let mut b = backends.get(&id, 0).unwrap();
        if b.addr == addr {
            b.flags |= proxy_common::BACKEND_F_LOCAL;
            backends.set(id, b, 0).unwrap();
        }
    }
}

/// Run `f` on CPU `cpu` alone (a test run executes on the calling CPU): the flow cache is per
/// CPU. The thread's CPU set is restored after.
fn on_cpu<T>(cpu: usize, f: impl FnOnce() -> T) -> T {
    // SAFETY: plain affinity syscalls on the calling thread (pid 0) with a zeroed, then filled,
    // cpu_set_t.
    unsafe {
        let mut was: libc::cpu_set_t = std::mem::zeroed();
        assert_eq!(
            libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut was),
            0
        );
        let mut one: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut one);
        assert_eq!(
            libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &one),
            0,
            "CPU {cpu}: {}",
            std::io::Error::last_os_error()
        );
        let r = f();
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &was);
        r
    }
}

/// `f` within one conntrack tick (a flow cache copy lives for one): tried again when a tick
/// boundary fell inside it, a few times. Returns what the try within one tick returned.
fn within_a_tick<T>(mut f: impl FnMut(u32) -> T) -> T {
    for attempt in 0..5u32 {
        let before = ct_now();
        let r = f(attempt);
        if ct_now() == before {
            return r;
        }
    }
    panic!("five tries each crossed a conntrack tick");
}

/// The fixture's target with `VIP_EMPTY:80` served by the same backend as `VIP:80`, and the
/// DNS frontend's backend `dns` (BE1 or BE2), `VIP_EMPTY:53` served by the other.
fn twin_target(dns: [u8; 4]) -> Target {
    let mut t = Target::default();
    let web = addr(BE1, 5000, IPPROTO_TCP);
    let (dns1, dns2) = (addr(BE1, 5353, IPPROTO_UDP), addr(BE2, 5353, IPPROTO_UDP));
    for b in [web, dns1, dns2] {
        t.backends.insert(b, BACKEND_F_ACTIVE);
    }
    let (here, other) = if dns == BE1 {
        (dns1, dns2)
    } else {
        (dns2, dns1)
    };
    for (vip, port, name, proto, slot) in [
        (VIP, 80, "web", Protocol::Tcp, web),
        (VIP_EMPTY, 80, "web-twin", Protocol::Tcp, web),
        (VIP, 53, "dns", Protocol::Udp, here),
        (VIP_EMPTY, 53, "dns-other", Protocol::Udp, other),
    ] {
        let p = if proto == Protocol::Tcp {
            IPPROTO_TCP
        } else {
            IPPROTO_UDP
        };
        t.frontends
            .insert(addr(vip, port, p), frontend(name, proto, vec![slot]));
    }
    t
}

/// Maps a load created hold zeros only: a start skips reading them back, and starts from what
/// reading them gives.
#[test]
fn maps_a_load_created_read_back_as_empty() {
    use vipx::maps::MapStore as _;
    if !privileged() {
        return;
    }
    let pin_dir = fresh_pin_dir();
    let _pins = PinDir(pin_dir.clone());
    assert!(loader::service_maps_absent(&pin_dir));
    let (mut ebpf, _) = loader::load_object(
        &pin_dir,
        fixture_sizes(4096),
        loader::ebpf_object().unwrap(),
    )
    .unwrap();
    assert!(
        !loader::service_maps_absent(&pin_dir),
        "the load pinned them"
    );
    let maps = loader::service_maps(&mut ebpf).unwrap();
    let read = maps.read_back().unwrap();
    assert_eq!(read.backend_gens.len(), 1024);
    maps.created.set(true);
    assert_eq!(maps.read_back().unwrap(), read);
    assert!(!maps.created.get(), "taken by the read");
}

/// The generation of the flow cache slot of conntrack key `key`.
fn flow_generation(l: &Loaded, key: &CtKey4) -> u64 {
    let (w0, w1) = proxy_common::ct_key_words(key);
    let gens: Array<&MapData, u64> = Array::try_from(
        l.ebpf
            .map(map_names::FLOWGEN)
            .expect("the flow cache generations"),
    )
    .unwrap();
    gens.get(&proxy_common::flow_slot(w0, w1), 0).unwrap()
}

/// A UDP query to `VIP:53` answered from this CPU's copy of its entry, the entry itself deleted
/// behind the cache's back (no generation bump) after the copy was made, `between` run after
/// the delete: whether the next query was served by a copy (`true`) or made a new flow.
fn served_by_a_copy(
    l: &mut Loaded,
    ct: &mut HashMap<MapData, CtKey4, CtValue>,
    sport: u16,
    between: impl FnOnce(&mut Loaded),
) -> bool {
    const UDP: L4 = L4::Udp {
        zero_csum: false,
        payload: b"q",
    };
    let key = ct_key(CLIENT, sport, VIP, 53, IPPROTO_UDP);
    on_cpu(0, || {
        let q = frame(CLIENT, sport, VIP, 53, &UDP, &[]);
        run(l, &q);
        run(l, &q);
        ct.remove(&key).unwrap();
        between(l);
        let created = stat(l, Stat::CtCreated);
        let (v, out) = run(l, &q);
        assert_eq!((v, inspect(&out).dst), (NEXT, BE1));
        let copy = ct.get(&key, 0).is_err() && stat(l, Stat::CtCreated) == created;
        let fresh = ct.get(&key, 0).is_ok() && stat(l, Stat::CtCreated) == created + 1;
        assert!(copy != fresh, "either a copy served or a new flow was made");
        copy
    })
}

/// Review finding: every SYN a pod sent to anything but a frontend removed the reply entry of
/// the reverse tuple and bumped its flow cache slot, voiding every CPU's copies there, though
/// only a backend's address and port can have a reply entry. A SYN elsewhere now bumps nothing;
/// one to a backend's address and port still clears what was left on its tuple.
#[test]
fn a_syn_to_no_backend_leaves_the_flow_cache_alone() {
    if !privileged() {
        return;
    }
    let mut l = load(&[BE1]);
    let elsewhere = [198, 18, 99, 9];
    let syn = frame(CLIENT, 41000, elsewhere, 5000, &SYN, &[]);
    let reply = ct_key(elsewhere, 5000, CLIENT, 41000, IPPROTO_TCP);
    let before = flow_generation(&l, &reply);
    let (v, out) = run(&mut l, &syn);
    assert_eq!((v, &out), (NEXT, &syn));
    assert_eq!(flow_generation(&l, &reply), before, "a SYN to no backend");

    let syn = frame(CLIENT, 41001, BE1, 5000, &SYN, &[]);
    let reply = ct_key(BE1, 5000, CLIENT, 41001, IPPROTO_TCP);
    let before = flow_generation(&l, &reply);
    run(&mut l, &syn);
    assert_eq!(
        flow_generation(&l, &reply),
        before + 1,
        "a SYN to a backend's address and port"
    );
}

/// Review findings: the cache is off where the CPU does not order the programs' generation
/// bump and read (`CONFIG_FLOW_CACHE_OFF`), and a start voids every copy once its programs are
/// in (`void_flow_copies`: an older build's programs and the conntrack carry-over write without
/// bumps).
#[test]
fn flow_copies_are_off_where_unordered_and_voided_at_start() {
    if !privileged() {
        return;
    }
    let mut l = load(&[BE1]);
    let mut ct = loader::conntrack_map(&mut l.ebpf).unwrap();
    assert!(within_a_tick(|a| served_by_a_copy(
        &mut l,
        &mut ct,
        46200 + a as u16,
        |_| {}
    )));
    assert!(
        !within_a_tick(
            |a| served_by_a_copy(&mut l, &mut ct, 46210 + a as u16, |l| {
                loader::void_flow_copies(&l.pin_dir)
            })
        ),
        "voided at start"
    );

    loader::write_config(&mut l.ebpf, None).unwrap();
    let mut config: Array<&mut MapData, u32> =
        Array::try_from(l.ebpf.map_mut(map_names::CONFIG).unwrap()).unwrap();
    // On where the CPU orders the bump and the read (x86).
    assert_eq!(
        config.get(&proxy_common::CONFIG_FLOW_CACHE_OFF, 0).unwrap(),
        u32::from(!loader::FLOW_CACHE_ORDERED)
    );
    config
        .set(proxy_common::CONFIG_FLOW_CACHE_OFF, 1, 0)
        .unwrap();
    assert!(
        !within_a_tick(|a| served_by_a_copy(&mut l, &mut ct, 46220 + a as u16, |_| {})),
        "switched off"
    );
}

/// The flow cache (per CPU, in front of conntrack) never outlives a change of the entry it
/// copies, by a program on another CPU or by userspace, and steps aside for a packet that adds
/// state or comes in a later tick. The first case shows a copy serving (a flow whose entry went
/// behind the cache's back is still translated in the same tick, and no entry is made), so that
/// the others' outcomes are the generation's doing. Each case runs within one conntrack tick,
/// tried again when a tick boundary fell inside it.
#[test]
fn a_flow_cache_copy_dies_with_its_conntrack_entry() {
    use vipx::conntrack::{self, Timeouts};
    if !privileged() {
        return;
    }
    const UDP: L4 = L4::Udp {
        zero_csum: false,
        payload: b"q",
    };
    let mut l = load(&[BE1]);
    l.writer.apply(&twin_target(BE1)).unwrap();
    let mut ct = loader::conntrack_map(&mut l.ebpf).unwrap();

    // Behind the cache's back (a raw delete, no generation bump): the copy serves.
    within_a_tick(|attempt| {
        let sport = 46100 + attempt as u16;
        let key = ct_key(CLIENT, sport, VIP, 53, IPPROTO_UDP);
        on_cpu(0, || {
            let q = frame(CLIENT, sport, VIP, 53, &UDP, &[]);
            run(&mut l, &q);
            run(&mut l, &q);
            ct.remove(&key).unwrap();
            let created = stat(&l, Stat::CtCreated);
            let (v, out) = run(&mut l, &q);
            assert_eq!((v, inspect(&out).dst), (NEXT, BE1));
            assert!(
                ct.get(&key, 0).is_err() && stat(&l, Stat::CtCreated) == created,
                "served by the copy, not by a new flow"
            );
        })
    });

    // A program's write on another CPU, over the entry (the same client port through another
    // frontend of the same backend rewrites the reply entry in place) or after it was gone.
    for gone_first in [false, true] {
        within_a_tick(|attempt| {
            let sport = 40300 + attempt as u16 * 2 + u16::from(gone_first);
            let synack = frame(BE1, 5000, CLIENT, sport, &SYNACK, &[]);
            on_cpu(0, || {
                run(&mut l, &frame(CLIENT, sport, VIP, 80, &SYN, &[]));
                run_on(&mut l, EGRESS, &synack);
                let (_, out) = run_on(&mut l, EGRESS, &synack);
                assert_eq!(inspect(&out).src, VIP);
            });
            if gone_first {
                ct.remove(&ct_key(BE1, 5000, CLIENT, sport, IPPROTO_TCP))
                    .unwrap();
            }
            on_cpu(1, || {
                run(&mut l, &frame(CLIENT, sport, VIP_EMPTY, 80, &SYN, &[]))
            });
            on_cpu(0, || {
                let (_, out) = run_on(&mut l, EGRESS, &synack);
                assert_eq!(
                    inspect(&out).src,
                    VIP_EMPTY,
                    "the reply entry rewritten on another CPU (gone first: {gone_first})"
                );
            })
        });
    }

    // A program's removal on another CPU: a direct SYN from the client's port of a VIP flow
    // clears that flow's reply entry. The backend's next packet on the first CPU is no reply.
    // Also when the entry was evicted first (a raw delete here: the LRU bumps nothing).
    for evicted_first in [false, true] {
        within_a_tick(|attempt| {
            let sport = 40200 + attempt as u16 * 2 + u16::from(evicted_first);
            let synack = frame(BE1, 5000, CLIENT, sport, &SYNACK, &[]);
            on_cpu(0, || {
                run(&mut l, &frame(CLIENT, sport, VIP, 80, &SYN, &[]));
                run_on(&mut l, EGRESS, &synack);
                run_on(&mut l, EGRESS, &synack);
            });
            if evicted_first {
                ct.remove(&ct_key(BE1, 5000, CLIENT, sport, IPPROTO_TCP))
                    .unwrap();
            }
            on_cpu(1, || {
                run(&mut l, &frame(CLIENT, sport, BE1, 5000, &SYN, &[]))
            });
            on_cpu(0, || {
                let (v, out) = run_on(&mut l, EGRESS, &synack);
                assert_eq!(
                    (v, &out),
                    (NEXT, &synack),
                    "no reply once its entry went (evicted first: {evicted_first})"
                );
            })
        });
    }

    // A FIN adds state the copy lacks: conntrack records it.
    within_a_tick(|attempt| {
        let sport = 40400 + attempt as u16;
        on_cpu(0, || {
            run(&mut l, &frame(CLIENT, sport, VIP, 80, &SYN, &[]));
            run(&mut l, &frame(CLIENT, sport, VIP, 80, &DATA, &[]));
            run(&mut l, &frame(CLIENT, sport, VIP, 80, &DATA, &[]));
            run(&mut l, &tcp_closing(CLIENT, sport, VIP, 80, true, false));
        });
        let fwd = ct
            .get(&ct_key(CLIENT, sport, VIP, 80, IPPROTO_TCP), 0)
            .unwrap();
        assert_eq!(fwd.flags & CT_F_FIN, CT_F_FIN, "the FIN reached conntrack");
    });

    // A copy from an earlier tick is not used: the entry is touched in the new one.
    let sport = 40500;
    let data = frame(CLIENT, sport, VIP, 80, &DATA, &[]);
    let key = ct_key(CLIENT, sport, VIP, 80, IPPROTO_TCP);
    on_cpu(0, || {
        run(&mut l, &frame(CLIENT, sport, VIP, 80, &SYN, &[]));
        run(&mut l, &data);
    });
    let then = ct.get(&key, 0).unwrap().seen;
    // Userspace's clock and the programs' agree to a tick: two ticks on, the programs' is on too.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while ct_now() <= then + 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "no conntrack tick in 5 s"
        );
        std::thread::yield_now();
    }
    on_cpu(0, || run(&mut l, &data));
    assert!(
        ct.get(&key, 0).unwrap().seen > then,
        "touched in the new tick"
    );

    // Userspace's removal: a UDP backend leaves its frontend but backs another one, so its
    // flows through the first are purged while the frontend, the backend and their generations
    // stay (a copy would still validate). A fresh load per try (the frontend changes).
    within_a_tick(|_| {
        let mut l = load(&[BE1]);
        l.writer.apply(&twin_target(BE1)).unwrap();
        let q = frame(CLIENT, 46300, VIP, 53, &UDP, &[]);
        on_cpu(0, || {
            run(&mut l, &q);
            let (_, out) = run(&mut l, &q);
            assert_eq!(inspect(&out).dst, BE1);
        });
        l.writer.apply(&twin_target(BE2)).unwrap();
        let purges = l.writer.take_udp_purges().into_iter().collect();
        let tables = loader::conntrack_tables(&l.pin_dir).unwrap();
        assert!(tables.flowgen.is_some(), "the generations are mapped");
        let st = conntrack::pass(&tables, &Timeouts::default(), &purges).unwrap();
        assert!(st.purged >= 2, "{st:?}");
        on_cpu(0, || {
            let (v, out) = run(&mut l, &q);
            assert_eq!(
                (v, inspect(&out).dst),
                (NEXT, BE2),
                "a purged flow selects afresh"
            );
        })
    });
}

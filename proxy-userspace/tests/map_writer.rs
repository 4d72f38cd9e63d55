//! The map writer against real kernel maps sized tiny, so that "full" is reached with a handful of
//! services: a Service that does not fit fails alone, deleting another one lets it in, and freed
//! ids keep their generation across a restart. Needs root (BPF maps, bpffs pins).

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
};

use aya::Ebpf;
use proxy_common::{BACKEND_F_ACTIVE, IPPROTO_TCP, REVNAT_F_ACTIVE, SVC_F_CLUSTER_IP};
use vipx::{
    desired::{Protocol, ServicePortName},
    loader::{self, MapSizes},
    maps::{ApplyStats, L4Addr, MapWriter, Target, TargetFrontend},
};

/// Whether this test can run. Without privileges it fails, unless the developer asked to skip
/// privileged tests (never in CI): a test that cannot run must not look like one that passed.
fn privileged(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    let skip = std::env::var("VIPX_SKIP_PRIVILEGED").is_ok_and(|v| v == "1");
    if skip && std::env::var_os("CI").is_none() {
        eprintln!("SKIPPED {test}: needs root to create BPF maps (VIPX_SKIP_PRIVILEGED=1)");
        return false;
    }
    panic!(
        "{test} needs root to create BPF maps; run it as root, or set VIPX_SKIP_PRIVILEGED=1 \
         (outside CI) to skip it"
    );
}

/// A pin directory of its own, removed on drop (also when the test fails).
struct PinDir(PathBuf);

impl PinDir {
    fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        Self(PathBuf::from(loader::BPFFS).join(format!(
            "vipx-map-writer-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        )))
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn load(pins: &PinDir, sizes: MapSizes) -> (Ebpf, MapWriter) {
    let mut ebpf = loader::load(&pins.0, sizes).expect("load eBPF object");
    let maps = loader::service_maps(&mut ebpf).expect("service maps");
    let mut writer = MapWriter::new(maps).expect("map writer");
    // About fitting: freed backends go at once.
    writer.set_endpoint_grace(std::time::Duration::ZERO);
    (ebpf, writer)
}

fn sizes(services: u32, backends: u32) -> MapSizes {
    MapSizes {
        services,
        backends,
        revnat: 16,
        conntrack: 64,
        maglev_table_size: proxy_common::defaults::MAGLEV_TABLE_SIZE,
        maglev_tables: 64,
    }
}

fn be(n: u8) -> L4Addr {
    L4Addr {
        addr: Ipv4Addr::new(198, 18, 0, n),
        port: 5000,
        proto: IPPROTO_TCP,
    }
}

fn vip(n: u8) -> L4Addr {
    L4Addr {
        addr: Ipv4Addr::new(198, 19, 0, n),
        port: 80,
        proto: IPPROTO_TCP,
    }
}

/// Services `vip(n)` -> backends.
fn target(services: &[(u8, &[u8])]) -> Target {
    let mut t = Target::default();
    for (n, backends) in services {
        for b in *backends {
            t.backends.insert(be(*b), BACKEND_F_ACTIVE);
        }
        t.frontends.insert(
            vip(*n),
            TargetFrontend {
                service: ServicePortName {
                    namespace: "default".into(),
                    name: format!("svc{n}"),
                    port_name: String::new(),
                    protocol: Protocol::Tcp,
                },
                flags: SVC_F_CLUSTER_IP,
                affinity_timeout_s: 0,
                slots: backends.iter().map(|b| be(*b)).collect(),
                lb_algorithm: None,
                source_ranges: Vec::new(),
            },
        );
    }
    t
}

fn failed(st: &ApplyStats) -> Vec<String> {
    st.failed
        .iter()
        .map(|f| f.service.as_ref().map_or("?".into(), ToString::to_string))
        .collect()
}

/// What the pinned maps say equals what the writer believes, and every frontend is usable.
fn assert_consistent(pins: &PinDir, w: &MapWriter) {
    let maps = loader::open_pinned(&pins.0).expect("open pins");
    let p = maps.read().expect("read");
    assert_eq!(&p, w.programmed());
    for (fe, entry) in &p.frontends {
        assert!(
            p.revnat.contains_key(&entry.rev_nat_id),
            "{fe}: reverse-NAT"
        );
        for id in &entry.slots {
            assert!(p.backends.contains_key(id), "{fe}: slot names backend {id}");
        }
    }
}

#[test]
fn a_service_that_does_not_fit_fails_alone_and_gets_in_when_another_goes() {
    if !privileged("a_service_that_does_not_fit_fails_alone_and_gets_in_when_another_goes") {
        return;
    }
    let pins = PinDir::new();
    // Backend ids 1..=4 (id 0 is "none"): room for two services of two backends.
    let (_ebpf, mut w) = load(&pins, sizes(64, 5));
    let all = target(&[(1, &[1, 2]), (2, &[3, 4]), (3, &[5, 6])]);
    let st = w.apply(&all).expect("apply");
    assert_eq!(failed(&st), ["default/svc3/TCP"]);
    assert_eq!(st.frontends_added, 2);
    assert!(!w.programmed().frontends.contains_key(&vip(3)));
    assert_consistent(&pins, &w);

    // svc1 is deleted; only its keys are passed, svc3 is retried by itself.
    let without_1 = target(&[(2, &[3, 4]), (3, &[5, 6])]);
    let st = w
        .apply_keys(
            &without_1,
            &BTreeSet::from([vip(1)]),
            &BTreeSet::from([be(1), be(2)]),
        )
        .expect("apply");
    assert!(st.failed.is_empty(), "{:?}", st.failed);
    assert_eq!((st.frontends_removed, st.frontends_added), (1, 1));
    assert!(w.programmed().frontends.contains_key(&vip(3)));
    assert_consistent(&pins, &w);
    // svc3 took the ids svc1 freed: their generation went up.
    for id in &w.programmed().frontends[&vip(3)].slots {
        assert_eq!(w.backend_generation(*id), 2, "backend id {id}");
    }
}

#[test]
fn a_full_service_map_fails_only_the_service_that_does_not_fit() {
    if !privileged("a_full_service_map_fails_only_the_service_that_does_not_fit") {
        return;
    }
    let pins = PinDir::new();
    // Three entries per service (slot 0 and two slots): the third finds one left.
    let (_ebpf, mut w) = load(&pins, sizes(7, 64));
    let st = w
        .apply(&target(&[(1, &[1, 2]), (2, &[3, 4]), (3, &[5, 6])]))
        .expect("apply");
    assert_eq!(failed(&st), ["default/svc3/TCP"]);
    assert_consistent(&pins, &w);
    let maps = loader::open_pinned(&pins.0).expect("open pins");
    assert_eq!(
        maps.svc.keys().count(),
        6,
        "the slot svc3 wrote was removed"
    );
    let active = maps
        .backend
        .iter()
        .filter(|b| b.as_ref().is_ok_and(|b| b.is_active()))
        .count();
    assert_eq!(active, 4, "svc3's backends were freed again");

    // Removing svc2 makes room.
    let st = w
        .apply(&target(&[(1, &[1, 2]), (3, &[5, 6])]))
        .expect("apply");
    assert!(st.failed.is_empty(), "{:?}", st.failed);
    assert_consistent(&pins, &w);
}

#[test]
fn freed_ids_keep_their_generation_across_a_restart() {
    if !privileged("freed_ids_keep_their_generation_across_a_restart") {
        return;
    }
    let pins = PinDir::new();
    let (ebpf, mut w) = load(&pins, sizes(64, 8));
    w.apply(&target(&[(1, &[1, 2])])).expect("apply");
    let freed_rn = w.programmed().frontends[&vip(1)].rev_nat_id;
    w.apply(&Target::default()).expect("apply");
    let maps = loader::open_pinned(&pins.0).expect("open pins");
    let b = maps.backend.get(&1, 0).expect("backend 1");
    assert!(!b.is_active());
    assert_eq!(b.generation, 1, "a freed backend keeps its generation");
    let r = maps.revnat.get(&freed_rn, 0).expect("reverse-NAT");
    assert_eq!((r.flags & REVNAT_F_ACTIVE, r.generation), (0, 1));
    drop((w, ebpf, maps));

    // A restarted vipx (same pins) hands out ids after the freed ones.
    let (_ebpf, mut w) = load(&pins, sizes(64, 8));
    w.apply(&target(&[(2, &[3])])).expect("apply");
    let entry = &w.programmed().frontends[&vip(2)];
    assert_eq!(
        entry.slots,
        [3],
        "backend ids 1 and 2 were used before the restart"
    );
    assert_ne!(entry.rev_nat_id, freed_rn);
    assert_eq!(w.backend_generation(3), 1);
    assert_consistent(&pins, &w);
}

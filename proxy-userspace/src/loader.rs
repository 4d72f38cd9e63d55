//! Loads the embedded eBPF object with its maps pinned under one directory per vipx instance,
//! sized from config, and attaches the pod program to interfaces.

use std::{
    collections::BTreeMap,
    ffi::CString,
    fs,
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf, EbpfLoader, TestRunOptions,
    maps::{Array, HashMap, Map, MapData, PerCpuArray},
    programs::{
        LinkOrder, Program, ProgramError, SchedClassifier, TcAttachType, TestRun as _, Xdp,
        links::{FdLink, PinnedLink},
        tc::{NlOptions, SchedClassifierLink, SchedClassifierLinkId, TcAttachOptions},
    },
};
use proxy_common::{STATS_LEN, Stat, defaults, map_names, prog_names};

use crate::{conntrack::bpf_call, maps::ServiceMaps};

/// The compiled eBPF object (empty when built with AYA_BUILD_SKIP=1), as built: its
/// `ip_summed` placeholders are unpatched, so it loads only through [`ebpf_object`].
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/vipx"));

/// How the TC programs update L4 checksums on this kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChecksumPath {
    /// In the program, after reading `ip_summed` from the byte at this offset of `sk_buff`,
    /// reached through the kfunc `bpf_cast_to_kern_ctx` (this BTF id).
    InProgram {
        cast_kfunc: u32,
        ip_summed_byte: u16,
    },
    /// Through the kernel's helpers (two calls a packet), for this reason.
    Helpers(String),
}

/// [`EBPF_OBJECT`], aligned, with its `ip_summed` placeholders (`proxy_common::skb_csum`)
/// patched, and how its programs will update checksums.
pub struct Object {
    words: Vec<u64>,
    len: usize,
    pub checksums: ChecksumPath,
}

impl Object {
    /// Patched for the running kernel: the in-program path where its BTF has what the pair
    /// needs and its verifier accepts the pair (a kernel without a JIT, or a process without
    /// CAP_PERFMON, refuses it), else the helpers.
    pub fn for_kernel() -> Result<Self> {
        let path = match crate::kernel_btf::Btf::from_vmlinux() {
            Ok(btf) => match checksum_path(&btf) {
                ChecksumPath::InProgram {
                    cast_kfunc,
                    ip_summed_byte,
                } => match probe_skb_csum(cast_kfunc, ip_summed_byte) {
                    Ok(()) => ChecksumPath::InProgram {
                        cast_kfunc,
                        ip_summed_byte,
                    },
                    Err(why) => ChecksumPath::Helpers(format!(
                        "the kernel refuses the program's read of ip_summed: {why}"
                    )),
                },
                helpers => helpers,
            },
            Err(e) => ChecksumPath::Helpers(format!("{e:#}")),
        };
        Self::with(path)
    }

    /// Patched for `checksums` (tests reach the helpers' path this way).
    pub fn with(checksums: ChecksumPath) -> Result<Self> {
        if EBPF_OBJECT.is_empty() {
            bail!("this vipx was built with AYA_BUILD_SKIP=1 and carries no eBPF object");
        }
        let mut words = vec![0u64; EBPF_OBJECT.len().div_ceil(8)];
        let bytes = &mut bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..EBPF_OBJECT.len()];
        bytes.copy_from_slice(EBPF_OBJECT);
        if patch_skb_csum(bytes, &checksums) == 0 {
            bail!("the eBPF object carries no ip_summed placeholder: a build mismatch");
        }
        Ok(Self {
            words,
            len: EBPF_OBJECT.len(),
            checksums,
        })
    }

    pub fn bytes(&self) -> &[u8] {
        &bytemuck::cast_slice::<u64, u8>(&self.words)[..self.len]
    }
}

/// [`Object::for_kernel`], once per process (and said once in the log).
pub fn ebpf_object() -> Result<&'static Object> {
    static OBJECT: std::sync::OnceLock<Result<Object, String>> = std::sync::OnceLock::new();
    let object = OBJECT.get_or_init(|| {
        let object = Object::for_kernel().map_err(|e| format!("{e:#}"))?;
        match &object.checksums {
            ChecksumPath::InProgram { ip_summed_byte, .. } => tracing::info!(
                ip_summed_byte,
                "L4 checksums updated in the programs (ip_summed read through bpf_cast_to_kern_ctx)"
            ),
            ChecksumPath::Helpers(why) => tracing::warn!(
                "L4 checksums through the kernel's helpers (two calls a packet): {why}"
            ),
        }
        Ok(object)
    });
    object.as_ref().map_err(|e| anyhow::anyhow!("{e}"))
}

/// Load, and unload at once, a TC program of the placeholder pair as patched: the verifier's
/// verdict on it is the verdict on the programs' reads of `ip_summed`.
fn probe_skb_csum(cast_kfunc: u32, ip_summed_byte: u16) -> Result<(), String> {
    use proxy_common::skb_csum::{CALL_INSN, LOAD_INSN};
    /// The head of `union bpf_attr` for `BPF_PROG_LOAD`; the rest zero.
    #[repr(C)]
    struct ProgLoad {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
        prog_name: [u8; 16],
        rest: [u8; 64],
    }
    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
    let insns: [u64; 4] = [
        (u64::from(cast_kfunc) << 32) | (CALL_INSN & 0xffff_ffff),
        (u64::from(ip_summed_byte) << 16) | (LOAD_INSN & 0xffff),
        // r0 = 0; exit
        0x00b7,
        0x0095,
    ];
    let license = c"GPL";
    let mut log = vec![0u8; 8192];
    let mut attr = ProgLoad {
        prog_type: BPF_PROG_TYPE_SCHED_CLS,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        kern_version: 0,
        prog_flags: 0,
        prog_name: *b"vipx_csum_probe\0",
        rest: [0; 64],
    };
    match crate::conntrack::bpf_call(BPF_PROG_LOAD, &mut attr) {
        Ok(fd) => {
            // SAFETY: the descriptor the kernel just returned, owned here alone.
            drop(unsafe { OwnedFd::from_raw_fd(fd as i32) });
            Ok(())
        }
        Err(e) => {
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            let log = String::from_utf8_lossy(&log[..end]);
            let last = log
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("");
            Err(format!("{e} ({last})"))
        }
    }
}

/// Where the kernel keeps `ip_summed`, if it has what the programs need to read it: the kfunc
/// `bpf_cast_to_kern_ctx` (6.2+) and the 2-bit field at the place the programs expect in its byte.
pub fn checksum_path(btf: &crate::kernel_btf::Btf) -> ChecksumPath {
    use proxy_common::skb_csum::IP_SUMMED_SHIFT;
    let Some(cast_kfunc) = btf.func_id("bpf_cast_to_kern_ctx") else {
        return ChecksumPath::Helpers("the kernel has no kfunc bpf_cast_to_kern_ctx".into());
    };
    match btf.field("sk_buff", "ip_summed") {
        Some(f) if f.bitfield_size == 2 && f.bit_offset % 8 == IP_SUMMED_SHIFT => {
            match u16::try_from(f.bit_offset / 8) {
                Ok(b) if b < 0x7fff => ChecksumPath::InProgram {
                    cast_kfunc,
                    ip_summed_byte: b,
                },
                _ => ChecksumPath::Helpers(format!("sk_buff.ip_summed at bit {}", f.bit_offset)),
            }
        }
        Some(f) => ChecksumPath::Helpers(format!(
            "sk_buff.ip_summed at bit {} ({} bits), not where the programs read it",
            f.bit_offset, f.bitfield_size
        )),
        None => ChecksumPath::Helpers("no sk_buff.ip_summed in the kernel's BTF".into()),
    }
}

/// Patch every `ip_summed` placeholder pair in `object` (see `proxy_common::skb_csum`): with the
/// kfunc's id and the field's byte, or with the fallback that makes the programs use the
/// helpers. Returns how many pairs it patched.
pub fn patch_skb_csum(object: &mut [u8], path: &ChecksumPath) -> usize {
    use proxy_common::skb_csum::{CALL_FALLBACK, CALL_INSN, LOAD_FALLBACK, LOAD_INSN};
    let (call, load) = match *path {
        ChecksumPath::InProgram {
            cast_kfunc,
            ip_summed_byte,
        } => (
            (u64::from(cast_kfunc) << 32) | (CALL_INSN & 0xffff_ffff),
            (u64::from(ip_summed_byte) << 16) | (LOAD_INSN & 0xffff),
        ),
        ChecksumPath::Helpers(_) => (CALL_FALLBACK, LOAD_FALLBACK),
    };
    let mut pattern = [0u8; 16];
    pattern[..8].copy_from_slice(&CALL_INSN.to_le_bytes());
    pattern[8..].copy_from_slice(&LOAD_INSN.to_le_bytes());
    let mut sites = 0;
    let mut at = 0;
    // Instructions are 8-byte aligned within their section, and sections within the file.
    while at + 16 <= object.len() {
        if object[at..at + 16] == pattern {
            object[at..at + 8].copy_from_slice(&call.to_le_bytes());
            object[at + 8..at + 16].copy_from_slice(&load.to_le_bytes());
            sites += 1;
            at += 16;
        } else {
            at += 8;
        }
    }
    sites
}

/// Where bpffs lives; vipx mounts it there when it is missing.
pub const BPFFS: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Map sizes (entries).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSizes {
    pub services: u32,
    pub backends: u32,
    pub revnat: u32,
    pub conntrack: u32,
    /// Maglev table size M (prime).
    pub maglev_table_size: u32,
    /// Maglev tables (0: Maglev off, every frontend hashes over its slots).
    pub maglev_tables: u32,
}

impl MapSizes {
    /// Entries of the Maglev map: the size in entry 0, then the tables.
    pub fn maglev_entries(&self) -> Result<u32> {
        self.maglev_table_size
            .checked_mul(self.maglev_tables)
            .and_then(|n| n.checked_add(1))
            .with_context(|| {
                format!(
                    "--maglev-table-size {} x --max-maglev-tables {} is too large",
                    self.maglev_table_size, self.maglev_tables
                )
            })
    }
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            services: defaults::SVC4_ENTRIES,
            backends: defaults::BACKEND4_ENTRIES,
            revnat: defaults::REVNAT4_ENTRIES,
            conntrack: defaults::CT4_ENTRIES,
            maglev_table_size: defaults::MAGLEV_TABLE_SIZE,
            maglev_tables: defaults::MAGLEV_TABLES,
        }
    }
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct we own; the path is NUL-terminated.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}

/// Mount bpffs at /sys/fs/bpf unless it already is there.
pub fn ensure_bpffs() -> Result<()> {
    let p = Path::new(BPFFS);
    if is_bpffs(p) {
        return Ok(());
    }
    // A bpffs mounted here lives as long as this mount namespace: in a container without the
    // host's /sys/fs/bpf (a hostPath with mount propagation), pins die with the container and
    // nothing survives a restart.
    tracing::warn!(
        "no bpffs at {BPFFS}: mounting one; pins (maps, links) outlive vipx only if this mount is \
         the host's"
    );
    let src = CString::new("bpf")?;
    let dst = CString::new(BPFFS)?;
    // SAFETY: plain mount(2) with NUL-terminated strings we own.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            src.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        bail!(
            "mounting bpffs at {BPFFS}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Load the object with maps pinned in `pin_dir` (reusing pins that exist).
pub fn load(pin_dir: &Path, sizes: MapSizes) -> Result<Ebpf> {
    load_moving_legacy(pin_dir, sizes).map(|(ebpf, _)| ebpf)
}

/// [`load`], also saying whether it moved a conntrack map of the previous layout aside (the
/// caller puts it back with [`LegacyConntrackGuard`] if it stops before the new programs are
/// attached). A failed load puts it back itself: the old build's programs still serve from it.
pub fn load_moving_legacy(pin_dir: &Path, sizes: MapSizes) -> Result<(Ebpf, bool)> {
    load_object(pin_dir, sizes, ebpf_object()?)
}

/// [`load_moving_legacy`] of `object`.
pub fn load_object(pin_dir: &Path, sizes: MapSizes, object: &Object) -> Result<(Ebpf, bool)> {
    crate::maglev::check_table_size(sizes.maglev_table_size).map_err(anyhow::Error::msg)?;
    let maglev_entries = sizes.maglev_entries()?;
    prepare_pin_dir(pin_dir)?;
    let moved = set_aside_legacy_conntrack(pin_dir)?;
    match load_pinned(pin_dir, sizes, maglev_entries, object) {
        Ok(ebpf) => Ok((ebpf, moved)),
        Err(e) => {
            if moved && let Err(back) = put_back_legacy_conntrack(pin_dir) {
                return Err(e.context(format!(
                    "and the conntrack map of the previous layout could not be put back: {back:#}"
                )));
            }
            Err(e)
        }
    }
}

fn load_pinned(
    pin_dir: &Path,
    sizes: MapSizes,
    maglev_entries: u32,
    object: &Object,
) -> Result<Ebpf> {
    check_pins(pin_dir, sizes)?;
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(pin_dir)
        .map_max_entries(map_names::SVC4, sizes.services)
        .map_max_entries(map_names::BACKEND4, sizes.backends)
        .map_max_entries(map_names::REVNAT4, sizes.revnat)
        .map_max_entries(map_names::VIP4, sizes.revnat)
        .map_max_entries(map_names::CT4, sizes.conntrack)
        .map_max_entries(map_names::SNAT4, sizes.conntrack)
        .map_max_entries(map_names::MAGLEV4, maglev_entries)
        .map_max_entries(map_names::AFFMATCH4, sizes.services)
        .load(object.bytes())
        .with_context(|| {
            format!(
                "loading the eBPF object (pins in {}; a pin left by a build with other map \
                 sizes or layouts must be removed first)",
                pin_dir.display()
            )
        })?;
    // The table size, where the kernel and a restarted vipx read it (a pin already has it:
    // `check_pins` made sure it is the same).
    let mut maglev: Array<&mut MapData, u32> = Array::try_from(
        ebpf.map_mut(map_names::MAGLEV4)
            .context("map VIPX_MAGLEV4 missing from the object")?,
    )?;
    if maglev.get(&0, 0)? != sizes.maglev_table_size {
        maglev.set(0, sizes.maglev_table_size, 0)?;
    }
    // The backend filter's first layout, left by an earlier build: its programs hold it by
    // descriptor while they run; the pin alone would outlive them. (The new filter starts empty
    // and is seeded from conntrack before the new programs go in.)
    for old in [map_names::BACKBITS_V1, map_names::FLOWGEN_V0] {
        let path = pin_dir.join(old);
        if path.exists()
            && let Err(e) = fs::remove_file(&path)
        {
            tracing::warn!("removing {}: {e}", path.display());
        }
    }
    Ok(ebpf)
}

/// The conntrack value of the build before entries carried `seen` (20 bytes: ids, generations,
/// flags). Its flows are carried over, not lost, on upgrade.
const LEGACY_CT_VALUE_SIZE: u32 = 20;
/// Where a legacy conntrack map waits while the new one is created and the programs swapped.
const LEGACY_CT_PIN: &str = "VIPX_CT4_v1";

/// A conntrack pin of the previous layout moves aside so the loader creates (and pins) the new
/// map; [`copy_legacy_conntrack`] and [`migrate_legacy_conntrack`] copy its flows around the
/// program swap. Returns whether it moved one.
fn set_aside_legacy_conntrack(pin_dir: &Path) -> Result<bool> {
    let path = pin_dir.join(map_names::CT4);
    if !is_legacy_conntrack(&path)? {
        return Ok(false);
    }
    let aside = pin_dir.join(LEGACY_CT_PIN);
    if aside.exists() {
        // A crash after a copy began: the older one is what the old programs filled.
        bail!(
            "both {} and {} hold conntrack maps of the previous layout; remove one",
            path.display(),
            aside.display()
        );
    }
    fs::rename(&path, &aside)
        .with_context(|| format!("moving {} aside for migration", path.display()))?;
    tracing::info!(
        "conntrack map of the previous layout moved to {}; its flows are copied before and \
         after the new programs are attached",
        aside.display()
    );
    Ok(true)
}

/// Whether `path` pins a conntrack map of the previous layout (false: absent, or this one).
fn is_legacy_conntrack(path: &Path) -> Result<bool> {
    if !path.exists() {
        return Ok(false);
    }
    let info = MapData::from_pin(path)
        .and_then(|m| m.info())
        .with_context(|| format!("reading pinned map {}", path.display()))?;
    Ok(info.value_size() == LEGACY_CT_VALUE_SIZE)
}

/// Undo [`set_aside_legacy_conntrack`] when the new programs never got attached: the old ones
/// still serve from the map set aside, and the old build, started again, must find it under its
/// name. The new map pinned in its place (unused: no program of this build ran) goes.
pub fn put_back_legacy_conntrack(pin_dir: &Path) -> Result<()> {
    let path = pin_dir.join(map_names::CT4);
    let aside = pin_dir.join(LEGACY_CT_PIN);
    if !aside.exists() {
        return Ok(());
    }
    if path.exists() {
        if is_legacy_conntrack(&path)? {
            bail!(
                "both {} and {} hold conntrack maps of the previous layout; remove one",
                path.display(),
                aside.display()
            );
        }
        fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    }
    fs::rename(&aside, &path).with_context(|| format!("putting {} back", path.display()))?;
    tracing::info!(
        "conntrack map of the previous layout put back at {}",
        path.display()
    );
    Ok(())
}

/// Puts a conntrack map of the previous layout moved aside by this process back when dropped
/// before [`Self::disarm`], i.e. when vipx stops (an error) before its programs replaced the
/// old ones.
pub struct LegacyConntrackGuard {
    pin_dir: Option<PathBuf>,
}

impl LegacyConntrackGuard {
    /// `moved`: what [`load_moving_legacy`] said.
    pub fn new(pin_dir: &Path, moved: bool) -> Self {
        Self {
            pin_dir: moved.then(|| pin_dir.to_owned()),
        }
    }

    /// The new programs are attached: the old map is theirs to migrate from, not to put back.
    pub fn disarm(&mut self) {
        self.pin_dir = None;
    }
}

impl Drop for LegacyConntrackGuard {
    fn drop(&mut self) {
        if let Some(dir) = self.pin_dir.take()
            && let Err(e) = put_back_legacy_conntrack(&dir)
        {
            tracing::error!("{e:#}");
        }
    }
}

/// Copy the flows of a conntrack map of the previous layout (see
/// [`set_aside_legacy_conntrack`]) into the new one, stamped as seen now, keeping the old map.
/// Run before the new programs replace the old ones: the new map is then complete the moment
/// they start using it, and flows that see a packet during the swap keep their entries. A tuple
/// the new map holds already (a migration interrupted after the swap) keeps its entry. Returns
/// how many were copied.
pub fn copy_legacy_conntrack(pin_dir: &Path) -> Result<u64> {
    copy_legacy(pin_dir)
}

/// After the new programs replaced the old ones: copy what the old programs added to the old
/// map since [`copy_legacy_conntrack`] (only tuples the new map lacks: the new programs' own
/// entries are newer), then remove the old map's pin. Returns how many were copied.
pub fn migrate_legacy_conntrack(pin_dir: &Path) -> Result<u64> {
    let aside = pin_dir.join(LEGACY_CT_PIN);
    let copied = copy_legacy(pin_dir)?;
    if aside.exists() {
        fs::remove_file(&aside).with_context(|| format!("removing {}", aside.display()))?;
    }
    Ok(copied)
}

fn copy_legacy(pin_dir: &Path) -> Result<u64> {
    use proxy_common::{CtKey4, CtValue};
    let aside = pin_dir.join(LEGACY_CT_PIN);
    if !aside.exists() {
        return Ok(0);
    }
    let old: HashMap<MapData, CtKey4, [u8; LEGACY_CT_VALUE_SIZE as usize]> =
        from_pin(pin_dir, LEGACY_CT_PIN)?;
    let mut new: HashMap<MapData, CtKey4, CtValue> = from_pin(pin_dir, map_names::CT4)?;
    let seen = crate::conntrack::now_seen();
    let mut copied = 0u64;
    let mut write = Ok(());
    // In batches: the old programs may still be changing the map, and a batch walk visits each
    // bucket once however it changes.
    crate::conntrack::walk(&old, |keys, values| {
        for (k, v) in keys.iter().zip(values) {
            let mut value: CtValue = bytemuck::Zeroable::zeroed();
            bytemuck::bytes_of_mut(&mut value)[..v.len()].copy_from_slice(v);
            value.seen = seen;
            // The old build kept no state: take a carried-over flow as answered, so the
            // collector gives it the established timeouts, not the never-answered ones.
            if value.flags & proxy_common::CT_F_REPLY != 0 {
                value.flags |= proxy_common::CT_F_REPLIED;
            }
            // BPF_NOEXIST: a tuple the new programs tracked already keeps its newer entry.
            match new.insert(k, value, 1) {
                Ok(()) => copied += 1,
                Err(aya::maps::MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => {
                    if write.is_ok() {
                        write = Err(e);
                    }
                }
            }
        }
    })
    .with_context(|| format!("reading {}", aside.display()))?;
    write.context("copying a conntrack entry of the previous layout")?;
    Ok(copied)
}

/// Refuse pins this build cannot use, with a message that says what to do. aya reopens a pin by
/// name whatever its layout: a pin left by a build with another map layout would otherwise fail
/// later, at the verifier, with no hint, and a changed `--max-*` would be silently ignored.
fn check_pins(pin_dir: &Path, sizes: MapSizes) -> Result<()> {
    use proxy_common::{
        AffinityKey4, AffinityValue, Backend4, CtKey4, CtValue, RevNat4, SvcKey4, SvcValue, Vip4,
        VipKey4,
    };
    let size = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    let expected = [
        (
            map_names::SVC4,
            size(size_of::<SvcKey4>()),
            size(size_of::<SvcValue>()),
            sizes.services,
            "--max-service-entries",
        ),
        (
            map_names::BACKEND4,
            4,
            size(size_of::<Backend4>()),
            sizes.backends,
            "--max-backends",
        ),
        (
            map_names::REVNAT4,
            4,
            size(size_of::<RevNat4>()),
            sizes.revnat,
            "--max-frontends",
        ),
        (
            map_names::VIP4,
            size(size_of::<VipKey4>()),
            size(size_of::<Vip4>()),
            sizes.revnat,
            "--max-frontends",
        ),
        (
            map_names::CT4,
            size(size_of::<CtKey4>()),
            size(size_of::<CtValue>()),
            sizes.conntrack,
            "--max-conntrack",
        ),
        (
            map_names::AFFINITY4,
            size(size_of::<AffinityKey4>()),
            size(size_of::<AffinityValue>()),
            defaults::AFFINITY4_ENTRIES,
            "(a fixed size)",
        ),
        (
            map_names::MAGLEV4,
            4,
            4,
            sizes.maglev_entries()?,
            "--maglev-table-size x --max-maglev-tables (+1)",
        ),
        (
            map_names::AFFMATCH4,
            size(size_of::<proxy_common::AffinityMatchKey4>()),
            4,
            sizes.services,
            "--max-service-entries",
        ),
        (
            map_names::SNAT4,
            size(size_of::<CtKey4>()),
            size(size_of::<proxy_common::SnatValue4>()),
            sizes.conntrack,
            "--max-conntrack",
        ),
        (
            map_names::SRCRANGE4,
            12,
            1,
            defaults::SRCRANGE4_ENTRIES,
            "(a fixed size)",
        ),
        (
            map_names::PORTS,
            4,
            8,
            proxy_common::PORTS_WORDS,
            "(a fixed size)",
        ),
        (
            map_names::VIPBITS,
            4,
            8,
            proxy_common::VIPBITS_WORDS,
            "(a fixed size)",
        ),
        (
            map_names::BACKBITS,
            4,
            8,
            proxy_common::BACKBITS_WORDS,
            "(a fixed size)",
        ),
        (
            map_names::FLOWGEN,
            4,
            8,
            proxy_common::FLOW_SLOTS,
            "(a fixed size)",
        ),
        (
            map_names::SOCKREV4,
            size(size_of::<proxy_common::SockRevKey4>()),
            size(size_of::<proxy_common::SockRevValue4>()),
            defaults::SOCKREV4_ENTRIES,
            "(a fixed size)",
        ),
    ];
    for (name, key, value, entries, flag) in expected {
        let path = pin_dir.join(name);
        if !path.exists() {
            continue;
        }
        let info = MapData::from_pin(&path)
            .and_then(|m| m.info())
            .with_context(|| format!("reading pinned map {}", path.display()))?;
        if (info.key_size(), info.value_size()) != (key, value) {
            bail!(
                "pinned map {} has key/value sizes {}/{} but this vipx uses {key}/{value}: it was \
                 left by a build with another map layout. Remove {} to start afresh (the \
                 connections it tracks are lost), or run the build that made it",
                path.display(),
                info.key_size(),
                info.value_size(),
                pin_dir.display()
            );
        }
        if info.max_entries() != entries {
            bail!(
                "pinned map {} holds {} entries but {flag} asks for {entries}: a pinned map \
                 cannot be resized. Run with {flag} {} or remove {} to start afresh (the \
                 connections it tracks are lost)",
                path.display(),
                info.max_entries(),
                info.max_entries(),
                pin_dir.display()
            );
        }
    }
    // Same entries with another table size (say 1021 x 4096 tables pinned, 4093 x ... asked):
    // the tables would be read with the wrong stride.
    let path = pin_dir.join(map_names::MAGLEV4);
    if path.exists() {
        let pinned: Array<MapData, u32> = from_pin(pin_dir, map_names::MAGLEV4)?;
        let m = pinned.get(&0, 0)?;
        if m != 0 && m != sizes.maglev_table_size {
            bail!(
                "pinned map {} holds Maglev tables of size {m} but --maglev-table-size asks for \
                 {}: run with --maglev-table-size {m} or remove {} to start afresh (the \
                 connections it tracks are lost)",
                path.display(),
                sizes.maglev_table_size,
                pin_dir.display()
            );
        }
    }
    Ok(())
}

fn take<T: TryFrom<Map>>(ebpf: &mut Ebpf, name: &str) -> Result<T>
where
    T::Error: std::error::Error + Send + Sync + 'static,
{
    let map = ebpf
        .take_map(name)
        .with_context(|| format!("map {name} missing from the object"))?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

/// Take the service maps out of a loaded object (the programs keep using them).
pub fn service_maps(ebpf: &mut Ebpf) -> Result<ServiceMaps> {
    Ok(ServiceMaps {
        svc: take(ebpf, map_names::SVC4)?,
        vip: take(ebpf, map_names::VIP4)?,
        backend: take(ebpf, map_names::BACKEND4)?,
        revnat: take(ebpf, map_names::REVNAT4)?,
        maglev_mem: None,
        maglev: take(ebpf, map_names::MAGLEV4)?,
        affmatch: Some(take(ebpf, map_names::AFFMATCH4)?),
        ports: Some(take(ebpf, map_names::PORTS)?),
        vipbits: Some(take(ebpf, map_names::VIPBITS)?),
        backbits: Some(take(ebpf, map_names::BACKBITS)?),
        created: std::cell::Cell::new(false),
    }
    .with_maglev_mem())
}

/// Whether none of the service maps is pinned in `pin_dir` (before a load, which then creates
/// them all: see [`ServiceMaps::created`]).
pub fn service_maps_absent(pin_dir: &Path) -> bool {
    [
        map_names::SVC4,
        map_names::VIP4,
        map_names::BACKEND4,
        map_names::REVNAT4,
        map_names::MAGLEV4,
        map_names::AFFMATCH4,
        map_names::PORTS,
        map_names::VIPBITS,
        map_names::BACKBITS,
    ]
    .iter()
    .all(|name| !pin_dir.join(name).exists())
}

fn from_pin<T: TryFrom<Map>>(pin_dir: &Path, name: &str) -> Result<T>
where
    T::Error: std::error::Error + Send + Sync + 'static,
{
    let path = pin_dir.join(name);
    let data = MapData::from_pin(&path).with_context(|| {
        format!(
            "opening pinned map {} (is vipx running with this --pin-dir?)",
            path.display()
        )
    })?;
    let map = Map::from_map_data(data)?;
    T::try_from(map).with_context(|| format!("pinned map {name} has an unexpected type"))
}

/// Open the service maps pinned by a running (or stopped) vipx.
pub fn open_pinned(pin_dir: &Path) -> Result<ServiceMaps> {
    Ok(ServiceMaps {
        svc: from_pin::<HashMap<MapData, _, _>>(pin_dir, map_names::SVC4)?,
        vip: from_pin::<HashMap<MapData, _, _>>(pin_dir, map_names::VIP4)?,
        backend: from_pin::<Array<MapData, _>>(pin_dir, map_names::BACKEND4)?,
        revnat: from_pin::<Array<MapData, _>>(pin_dir, map_names::REVNAT4)?,
        maglev: from_pin::<Array<MapData, _>>(pin_dir, map_names::MAGLEV4)?,
        maglev_mem: None,
        // Absent in pins of a build before it: `vipx services` still reads the rest.
        affmatch: from_pin::<HashMap<MapData, _, _>>(pin_dir, map_names::AFFMATCH4).ok(),
        ports: from_pin::<Array<MapData, _>>(pin_dir, map_names::PORTS).ok(),
        vipbits: from_pin::<Array<MapData, _>>(pin_dir, map_names::VIPBITS).ok(),
        backbits: from_pin::<Array<MapData, _>>(pin_dir, map_names::BACKBITS).ok(),
        created: std::cell::Cell::new(false),
    }
    .with_maglev_mem())
}

/// Per-CPU counters summed over CPUs.
/// Tell the loaded programs their settings (`CONFIG`, not pinned: written after every load,
/// before the programs are attached). `hairpin`: the hairpin SNAT address, `None` disables it.
pub fn write_config(ebpf: &mut Ebpf, hairpin: Option<std::net::Ipv4Addr>) -> Result<()> {
    let mut config: Array<&mut MapData, u32> = Array::try_from(
        ebpf.map_mut(map_names::CONFIG)
            .context("the CONFIG map is missing from the object")?,
    )?;
    let addr = hairpin.map_or(0, |a| u32::from_ne_bytes(a.octets()));
    config
        .set(proxy_common::CONFIG_HAIRPIN_ADDR, addr, 0)
        .context("writing the hairpin address")?;
    config
        .set(
            proxy_common::CONFIG_FLOW_CACHE_OFF,
            u32::from(!FLOW_CACHE_ORDERED),
            0,
        )
        .context("writing the flow cache switch")?;
    Ok(())
}

/// Whether the programs' flow cache is ordered on this CPU (see
/// `proxy_common::CONFIG_FLOW_CACHE_OFF`): x86's total store order. Elsewhere the programs
/// look every packet's entry up.
pub const FLOW_CACHE_ORDERED: bool = cfg!(any(target_arch = "x86_64", target_arch = "x86"));

/// Voids every per-CPU copy of a conntrack entry (one bump of each flow cache slot): once the
/// programs are swapped in and the previous build's flows carried over. Until then a program of
/// a build without the cache (still attached to some interfaces during an upgrade) or the
/// carry-over changed entries without a bump.
pub fn void_flow_copies(pin_dir: &Path) {
    if let Some(g) = flow_generations(pin_dir) {
        for slot in 0..proxy_common::FLOW_SLOTS as usize {
            g.bump(slot);
        }
    }
}

/// Point the programs' conntrack clock at jiffies (see `CONFIG_CLOCK_MULT`): the tick from the
/// coarse clock's resolution, the offset from one run of `vipx_clock` beside a read of the
/// coarse clock, so entries keep the units and origin of [`crate::conntrack::now_seen`] (and of
/// what an earlier build left in pinned entries). Before the programs are attached; a kernel
/// whose tick cannot be read keeps the coarse clock in the programs.
pub fn write_clock(ebpf: &mut Ebpf) -> Result<()> {
    let mut res = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_getres writes the timespec it is given.
    unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC_COARSE, &mut res) };
    let tick_ns = u64::try_from(res.tv_sec).unwrap_or(0) * 1_000_000_000
        + u64::try_from(res.tv_nsec).unwrap_or(0);
    let Some(mult) = proxy_common::clock_mult(tick_ns) else {
        tracing::warn!(
            tick_ns,
            "the kernel tick is not 1-10 ms: the programs read the slower coarse clock"
        );
        return Ok(());
    };
    let prog: &mut Xdp = ebpf
        .program_mut(prog_names::CLOCK)
        .context("the clock program is missing from the object")?
        .try_into()?;
    prog.load().context("loading the clock program")?;
    let pkt = [0u8; 64];
    let ran = prog.test_run(TestRunOptions {
        data_in: Some(&pkt),
        repeat: 1,
        ..TestRunOptions::default()
    });
    let now_ns = crate::conntrack::coarse_ns();
    let unloaded = prog.unload();
    ran.context("running the clock program")?;
    unloaded.context("unloading the clock program")?;
    let mut config: Array<&mut MapData, u32> = Array::try_from(
        ebpf.map_mut(map_names::CONFIG)
            .context("the CONFIG map is missing from the object")?,
    )?;
    let lo = config.get(&proxy_common::CONFIG_JIFFIES_LO, 0)?;
    let hi = config.get(&proxy_common::CONFIG_JIFFIES_HI, 0)?;
    let jiffies = u64::from(hi) << 32 | u64::from(lo);
    // Jiffies and the coarse clock advance together, a tick at a time: this base makes the
    // programs' clock agree with the coarse one to a tick.
    let base = proxy_common::clock_base(jiffies, mult, now_ns);
    // The base first: the programs switch clocks when MULT becomes non-zero.
    config
        .set(proxy_common::CONFIG_CLOCK_BASE_LO, base as u32, 0)
        .context("writing the clock offset")?;
    config
        .set(proxy_common::CONFIG_CLOCK_BASE_HI, (base >> 32) as u32, 0)
        .context("writing the clock offset")?;
    config
        .set(proxy_common::CONFIG_CLOCK_MULT, mult, 0)
        .context("writing the clock scale")?;
    Ok(())
}

/// Set the flood guard: new tracked flows one source address may start per second (0: no
/// guard). Like the hairpin address, it belongs to this load of the programs.
pub fn write_flood_limit(ebpf: &mut Ebpf, limit: u32) -> Result<()> {
    let mut config: Array<&mut MapData, u32> = Array::try_from(
        ebpf.map_mut(map_names::CONFIG)
            .context("the CONFIG map is missing from the object")?,
    )?;
    config
        .set(proxy_common::CONFIG_FLOOD_LIMIT, limit, 0)
        .context("writing the flood guard's limit")?;
    Ok(())
}

/// The flood guard's default: the rate at which one source, its flows never answered (a SYN
/// flood: entries live until the SYN timeout passes and a collection runs), would hold a
/// quarter of a table of `entries` (two entries per flow), so it can never push out everyone
/// else's (728 a second for 524,288 entries). The guard engages only once the table is half
/// full, so a busy client on a table with room is not held to it. Never below 64 a second,
/// for tables too small for the formula to leave a client anything.
pub fn default_flood_limit(entries: u32, syn_timeout: Duration, gc_interval: Duration) -> u32 {
    let life = (syn_timeout + gc_interval).as_secs().max(1);
    let limit = u64::from(entries) / 4 / 2 / life;
    u32::try_from(limit).unwrap_or(u32::MAX).max(64)
}

/// The conntrack size when `--max-conntrack` is not given: the pinned table's, when there is
/// one (a restart, an upgrade or a rollback asking for another size would have its pin refused
/// and stop serving changes), else scaled to memory (see [`conntrack_entries_for_memory`]).
pub fn default_conntrack_entries(pin_dir: &Path) -> u32 {
    MapData::from_pin(pin_dir.join(map_names::CT4))
        .ok()
        .and_then(|m| m.info().ok())
        .map(|i| i.max_entries())
        .or_else(conntrack_entries_for_memory)
        .unwrap_or(defaults::CT4_ENTRIES)
}

/// The default conntrack size, scaled to the node's memory as Cilium's
/// `bpf-map-dynamic-size-ratio` does: 0.25% of it at ~128 bytes an entry (key, value and the
/// kernel's LRU element), rounded up to a power of two, between 131,072 and 16,777,216 entries
/// (262,144 at 8 GiB, 524,288 at 16 GiB). `None`: memory unknown.
pub fn conntrack_entries_for_memory() -> Option<u32> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(conntrack_entries_for(kib.saturating_mul(1024)))
}

fn conntrack_entries_for(mem_bytes: u64) -> u32 {
    let entries = (mem_bytes / 400 / 128).next_power_of_two();
    entries.clamp(1 << 17, 1 << 24) as u32
}

/// Take the settings map out of a loaded object (the flood guard switches it at run time);
/// [`write_config`] and [`write_flood_limit`] no longer reach it afterwards.
pub fn take_config(ebpf: &mut Ebpf) -> Result<Array<MapData, u32>> {
    take(ebpf, map_names::CONFIG)
}

/// Take the `loadBalancerSourceRanges` map out of a loaded object ([`crate::ranges`] keeps it).
pub fn take_source_ranges(
    ebpf: &mut Ebpf,
) -> Result<aya::maps::lpm_trie::LpmTrie<MapData, [u8; 8], u8>> {
    take(ebpf, map_names::SRCRANGE4)
}

/// Take the per-CPU counters out of a loaded object (metrics and conntrack collection share it).
pub fn take_stats(ebpf: &mut Ebpf) -> Result<PerCpuArray<MapData, u64>> {
    take(ebpf, map_names::STATS)
}

pub fn read_stats(ebpf: &Ebpf) -> Result<Vec<(Stat, u64)>> {
    let map = ebpf
        .map(map_names::STATS)
        .context("stats map missing from the object")?;
    let stats: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map)?;
    let mut out = Vec::new();
    for s in Stat::ALL {
        debug_assert!((s as u32) < STATS_LEN);
        let v = stats.get(&(s as u32), 0)?;
        out.push((s, v.iter().sum()));
    }
    Ok(out)
}

/// The pod programs attached to a set of interfaces: ingress on the host side of a pod veth sees
/// what the pod sends (DNAT), egress what it receives (reverse NAT).
///
/// On tcx (kernels >= 6.6) every link is pinned under `<pin dir>/links`, named
/// `<interface>@<ifindex>-<direction>`, so the data path outlives the process: a stop, a crash
/// or an upgrade leaves the programs attached and the maps in place, and the next vipx swaps its
/// programs into the same links atomically (`bpf_link_update`), with no moment without
/// translation. Only `vipx cleanup` (or the interface going away) detaches them. Older kernels
/// get netlink filters, detached at stop.
pub struct Attachments {
    /// Interface name -> its index when attached.
    attached: BTreeMap<String, u32>,
    /// Netlink filters (kernels without tcx), by interface.
    netlink: BTreeMap<String, [SchedClassifierLinkId; 2]>,
    tcx: bool,
    link_dir: PathBuf,
}

/// Each program and the direction it is attached in.
const POD_PROGRAMS: [(&str, TcAttachType, &str); 2] = [
    (prog_names::POD_INGRESS, TcAttachType::Ingress, "ingress"),
    (prog_names::POD_EGRESS, TcAttachType::Egress, "egress"),
];

/// The directory holding a node's pinned links.
pub fn link_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join("links")
}

impl Attachments {
    /// Load (verify) the pod programs so they can be attached; links are pinned in
    /// [`link_dir`]`(pin_dir)`.
    pub fn new(ebpf: &mut Ebpf, pin_dir: &Path) -> Result<Self> {
        for (name, _, _) in POD_PROGRAMS {
            load_once(prog(ebpf, name)?.load()).with_context(|| format!("verifying {name}"))?;
        }
        let tcx = aya::util::KernelVersion::current()
            .is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0));
        let link_dir = link_dir(pin_dir);
        if tcx {
            fs::create_dir_all(&link_dir)
                .with_context(|| format!("creating {}", link_dir.display()))?;
        }
        Ok(Self {
            attached: BTreeMap::new(),
            netlink: BTreeMap::new(),
            tcx,
            link_dir,
        })
    }

    pub fn is_attached(&self, iface: &str) -> bool {
        self.attached.contains_key(iface)
    }

    /// Attached interfaces with the index each had when attached.
    pub fn interfaces(&self) -> impl Iterator<Item = (&str, u32)> {
        self.attached
            .iter()
            .map(|(name, index)| (name.as_str(), *index))
    }

    fn pin_path(&self, iface: &str, ifindex: u32, dir: &str) -> PathBuf {
        self.link_dir.join(link_pin_name(iface, ifindex, dir))
    }

    /// Attach both programs first in their tcx chains: a program that ends the chain
    /// (`TC_ACT_OK`, what most CNI programs return) would otherwise keep vipx from ever running.
    /// vipx passes every packet it does not drop on ("next"), so programs after it still run;
    /// they see `client -> backend` leaving the pod and `frontend -> client` entering it (behind
    /// kube-proxy a tc program sees `client -> frontend` both ways, since netfilter translates
    /// after tc ingress and before tc egress).
    ///
    /// Links pinned by an earlier vipx for this interface (same name and index) are adopted:
    /// this build's programs replace the old ones atomically, in place in the chain.
    pub fn attach(&mut self, ebpf: &mut Ebpf, iface: &str, ifindex: u32) -> Result<()> {
        if !self.tcx {
            return self.attach_netlink(ebpf, iface, ifindex);
        }
        let mut adopted = 0;
        for (name, _, dir) in POD_PROGRAMS {
            let path = self.pin_path(iface, ifindex, dir);
            if !path.exists() {
                continue;
            }
            match replace_program(ebpf, name, &path) {
                Ok(()) => adopted += 1,
                // The link's interface is gone (deleted, or re-created under this name): the
                // link is defunct, start afresh.
                Err(e) if has_errno(&e, libc::ENOLINK) => {
                    tracing::info!(interface = %iface, "pinned {dir} link is defunct: {e:#}");
                    fs::remove_file(&path)
                        .with_context(|| format!("removing {}", path.display()))?;
                }
                // Anything else: the old program keeps serving through its pin; retried.
                Err(e) => return Err(e.context(format!("adopting the pinned {dir} link"))),
            }
        }
        if adopted == POD_PROGRAMS.len() {
            self.attached.insert(iface.to_owned(), ifindex);
            return Ok(());
        }
        let mut created = Vec::new();
        for (name, attach_type, dir) in POD_PROGRAMS {
            let path = self.pin_path(iface, ifindex, dir);
            if path.exists() {
                continue;
            }
            if let Err(e) = attach_pinned(ebpf, name, iface, attach_type, &path) {
                // Never leave one direction without the other: DNAT without reverse NAT resets
                // every connection.
                for path in created {
                    let _ = fs::remove_file(path);
                }
                return Err(e).with_context(|| format!("attaching {name} to {iface} {dir}"));
            }
            created.push(path);
        }
        self.attached.insert(iface.to_owned(), ifindex);
        Ok(())
    }

    fn attach_netlink(&mut self, ebpf: &mut Ebpf, iface: &str, ifindex: u32) -> Result<()> {
        // Kernels before tcx need the clsact qdisc; it is harmless when it already exists.
        let _ = aya::programs::tc::qdisc_add_clsact(iface);
        let mut ids = Vec::with_capacity(2);
        for (name, attach_type, _) in POD_PROGRAMS {
            let options = TcAttachOptions::Netlink(NlOptions::default());
            match prog(ebpf, name)?.attach_with_options(iface, attach_type, options) {
                Ok(id) => ids.push((name, id)),
                Err(e) => {
                    // Never leave one direction without the other.
                    for (name, id) in ids {
                        let _ = prog(ebpf, name)?.detach(id);
                    }
                    return Err(e).with_context(|| format!("attaching {name} to {iface}"));
                }
            }
        }
        let mut ids = ids.into_iter().map(|(_, id)| id);
        let (Some(ingress), Some(egress)) = (ids.next(), ids.next()) else {
            bail!("attaching to {iface}: expected two links");
        };
        self.netlink.insert(iface.to_owned(), [ingress, egress]);
        self.attached.insert(iface.to_owned(), ifindex);
        Ok(())
    }

    /// Forget an interface that disappeared (its links went with it): its pins go too.
    pub fn forget(&mut self, ebpf: &mut Ebpf, iface: &str) -> Result<()> {
        if let Some(ifindex) = self.attached.remove(iface) {
            for (_, _, dir) in POD_PROGRAMS {
                let path = self.pin_path(iface, ifindex, dir);
                match fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        return Err(e).with_context(|| format!("removing {}", path.display()));
                    }
                }
            }
        }
        if let Some(ids) = self.netlink.remove(iface) {
            for ((name, _, _), id) in POD_PROGRAMS.into_iter().zip(ids) {
                let _ = prog(ebpf, name)?.detach(id);
            }
        }
        Ok(())
    }

    /// Remove pinned links of interfaces that are not in `keep` (gone while vipx was down, or no
    /// longer matching `--pod-interfaces`): unpinned, such a link is detached. `listed` is every
    /// interface the scan saw: a pin of an interface it did not see is removed only once the
    /// kernel confirms the interface is gone, so an incomplete listing detaches nothing.
    pub fn prune(
        &self,
        keep: &[(String, u32)],
        listed: &[(String, u32)],
        index_of: impl Fn(&str) -> u32,
    ) -> Vec<anyhow::Error> {
        let Ok(entries) = fs::read_dir(&self.link_dir) else {
            return Vec::new();
        };
        let wanted: std::collections::HashSet<String> = keep
            .iter()
            .flat_map(|(name, index)| {
                POD_PROGRAMS
                    .iter()
                    .map(move |(_, _, dir)| link_pin_name(name, *index, dir))
            })
            .collect();
        let mut errors = Vec::new();
        for entry in entries.flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            let seen = listed.iter().any(|(name, index)| {
                POD_PROGRAMS
                    .iter()
                    .any(|(_, _, dir)| file == link_pin_name(name, *index, dir))
            });
            let gone =
                parse_link_pin_name(&file).is_none_or(|(name, index)| index_of(&name) != index);
            if !wanted.contains(&file) && (seen || gone) {
                if let Err(e) = fs::remove_file(entry.path()) {
                    errors.push(anyhow::Error::new(e).context(format!("removing {file}")));
                } else {
                    tracing::info!(link = %file, "removed a pinned link of an interface not served");
                }
            }
        }
        errors
    }

    /// At stop: netlink filters are detached (they cannot be handed over); pinned tcx links stay.
    pub fn detach_netlink(&mut self, ebpf: &mut Ebpf) -> Vec<anyhow::Error> {
        let names: Vec<String> = self.netlink.keys().cloned().collect();
        names
            .iter()
            .filter_map(|n| self.forget(ebpf, n).err())
            .collect()
    }
}

/// The pin name of an interface's link: `<interface>@<ifindex>-<direction>`. bpffs refuses names
/// with a dot (reserved), which interface names may have (VLANs: `eth0.100`); a colon, which
/// interface names may not have, stands in for it.
fn link_pin_name(iface: &str, ifindex: u32, dir: &str) -> String {
    format!("{}@{ifindex}-{dir}", iface.replace('.', ":"))
}

/// The interface and index a pin name names (see [`link_pin_name`]).
fn parse_link_pin_name(file: &str) -> Option<(String, u32)> {
    let (name, rest) = file.rsplit_once('@')?;
    let (index, _dir) = rest.split_once('-')?;
    Some((name.replace(':', "."), index.parse().ok()?))
}

/// Attach `name` in tcx, first in the chain, and pin the link at `path`.
pub(crate) fn attach_pinned(
    ebpf: &mut Ebpf,
    name: &str,
    iface: &str,
    attach_type: TcAttachType,
    path: &Path,
) -> Result<()> {
    let p = prog(ebpf, name)?;
    let id = p.attach_with_options(
        iface,
        attach_type,
        TcAttachOptions::TcxOrder(LinkOrder::first()),
    )?;
    let link = FdLink::try_from(p.take_link(id)?).context("not a tcx link")?;
    // Pinned, the link outlives this process; the handle here can go.
    link.pin(path)
        .with_context(|| format!("pinning the link at {}", path.display()))?;
    Ok(())
}

/// Whether an error, or any error it wraps, is the OS error `errno`.
pub(crate) fn has_errno(e: &anyhow::Error, errno: i32) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.raw_os_error() == Some(errno))
    })
}

/// Swap `name` into the tcx link pinned at `path`.
pub(crate) fn replace_program(ebpf: &mut Ebpf, name: &str, path: &Path) -> Result<()> {
    let link = PinnedLink::from_pin(path).context("opening the pinned link")?;
    let link = SchedClassifierLink::try_from(FdLink::from(link))
        .context("the pinned link is not a tcx link")?;
    let p = prog(ebpf, name)?;
    let id = p
        .attach_to_link(link)
        .context("replacing the program of the pinned link")?;
    // The pin keeps the link; this handle can go without detaching anything.
    drop(p.take_link(id)?);
    Ok(())
}

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_UPDATE: libc::c_long = 29;

/// `bpf_attr` of `BPF_OBJ_GET` (`struct { pathname, bpf_fd, file_flags }`).
#[repr(C)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// `bpf_attr` of `BPF_LINK_UPDATE` (`struct { link_fd, new_prog_fd, flags, old_prog_fd }`).
#[repr(C)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// Swap `prog` into the link pinned at `path` (any link type: cgroup, XDP), atomically.
pub(crate) fn update_link(path: &Path, prog: BorrowedFd<'_>) -> Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    let mut get = ObjGetAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    let fd = bpf_call(BPF_OBJ_GET, &mut get).context("opening the pinned link")?;
    let fd = i32::try_from(fd).context("link descriptor out of range")?;
    // SAFETY: BPF_OBJ_GET returned a new descriptor that we now own.
    let link = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut update = LinkUpdateAttr {
        link_fd: u32::try_from(link.as_raw_fd()).unwrap_or(u32::MAX),
        new_prog_fd: u32::try_from(prog.as_raw_fd()).unwrap_or(u32::MAX),
        flags: 0,
        old_prog_fd: 0,
    };
    bpf_call(BPF_LINK_UPDATE, &mut update).context("replacing the link's program")?;
    Ok(())
}

/// Uninstall a node's vipx: unpin its links (which detaches the programs, once no process holds
/// them), its maps and its state. Refused while a vipx process holds the pin directory; only
/// what vipx itself pins or writes is removed, so a wrong `--pin-dir` cannot wipe other pins.
pub fn cleanup(pin_dir: &Path, state_dir: &Path) -> Result<()> {
    if pin_dir.exists() {
        let dir =
            fs::File::open(pin_dir).with_context(|| format!("opening {}", pin_dir.display()))?;
        if !flock(&dir, true).context("locking the pin directory")? {
            bail!(
                "a vipx process runs on {}: stop it first (a stopped vipx leaves its programs \
                 attached on purpose)",
                pin_dir.display()
            );
        }
        let links = link_dir(pin_dir);
        if let Ok(entries) = fs::read_dir(&links) {
            for entry in entries.flatten() {
                remove_known(&entry.path())?;
            }
            remove_known_dir(&links)?;
        }
        crate::socklb::detach(pin_dir)?;
        let node_links = crate::nodeif::link_dir(pin_dir);
        if let Ok(entries) = fs::read_dir(&node_links) {
            for entry in entries.flatten() {
                remove_known(&entry.path())?;
            }
            remove_known_dir(&node_links)?;
        }
        for name in [
            map_names::SVC4,
            map_names::VIP4,
            map_names::BACKEND4,
            map_names::REVNAT4,
            map_names::CT4,
            LEGACY_CT_PIN,
            map_names::AFFINITY4,
            map_names::MAGLEV4,
            map_names::AFFMATCH4,
            map_names::SOCKREV4,
            map_names::SNAT4,
            map_names::SRCRANGE4,
            map_names::PORTS,
            map_names::VIPBITS,
            map_names::BACKBITS,
            map_names::BACKBITS_V1,
            map_names::FLOWGEN,
            map_names::FLOWGEN_V0,
        ] {
            remove_known(&pin_dir.join(name))?;
        }
        remove_known_dir(pin_dir)?;
    }
    remove_known(&state_dir.join(crate::run::STATE_FILE))?;
    remove_known_dir(state_dir)?;
    Ok(())
}

fn remove_known(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
    }
}

/// Remove a directory vipx made, if nothing else is left in it (say so otherwise).
fn remove_known_dir(path: &Path) -> Result<()> {
    match fs::remove_dir(path) {
        Ok(()) => {
            tracing::info!(dir = %path.display(), "removed");
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| {
            format!(
                "removing {} (files vipx does not know are left in it)",
                path.display()
            )
        }),
    }
}

/// The programs a node runs whatever its options: verified by [`verify_programs`] at start.
pub const NODE_PROGRAMS: [&str; 4] = [
    prog_names::POD_INGRESS,
    prog_names::POD_EGRESS,
    prog_names::NODE_XDP,
    prog_names::NODE_TC,
];

/// Loads (verifies) the programs of `ebpf` named in `names` side by side, a thread each: the
/// verifier runs in the loading thread and takes tens of milliseconds a program, so a start
/// pays about the slowest one on a machine with a core per program instead of their sum.
/// Programs already loaded are left as they are; whoever attaches one loads it again with
/// [`load_once`], which takes it as it is.
pub fn verify_programs(ebpf: &mut Ebpf, names: &[&str]) -> Result<()> {
    std::thread::scope(|s| {
        let runs: Vec<_> = ebpf
            .programs_mut()
            .filter(|(name, _)| names.contains(name))
            .map(|(name, p)| (name, s.spawn(move || load_any(p))))
            .collect();
        // Each thread is joined before an error is returned.
        let done: Vec<_> = runs.into_iter().map(|(n, h)| (n, h.join())).collect();
        for (name, r) in done {
            match r {
                Ok(r) => r.with_context(|| format!("verifying {name}"))?,
                Err(_) => bail!("verifying {name}: the loading thread panicked"),
            }
        }
        Ok(())
    })
}

fn load_any(p: &mut Program) -> Result<(), ProgramError> {
    load_once(match p {
        Program::SchedClassifier(p) => p.load(),
        Program::Xdp(p) => p.load(),
        Program::CgroupSockAddr(p) => p.load(),
        // Loaded by whoever attaches it.
        _ => Ok(()),
    })
}

/// A program's load, where one loaded already (by [`verify_programs`]) is as good.
pub fn load_once(r: Result<(), ProgramError>) -> Result<(), ProgramError> {
    match r {
        Err(ProgramError::AlreadyLoaded) => Ok(()),
        r => r,
    }
}

fn prog<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut SchedClassifier> {
    let p = ebpf
        .program_mut(name)
        .with_context(|| format!("program {name} missing from the object"))?;
    Ok(p.try_into()?)
}

/// Default pin directory of a node. bpffs refuses names with a dot, which node names often have
/// (`ip-10-0-0-1.ec2.internal`); a colon, which node names cannot have, stands in for it.
pub fn default_pin_dir(node_name: &str) -> PathBuf {
    Path::new(BPFFS)
        .join("vipx")
        .join(node_name.replace('.', ":"))
}

/// One vipx process per pin directory: held for the process's life (`flock` on the directory),
/// so a second one (a surge rollout, a mistake) waits instead of writing the same maps with an
/// id allocator of its own, and `vipx cleanup` refuses while it is held.
pub struct PinLock {
    _dir: fs::File,
}

/// The pin directory exists, on bpffs (mounted first when missing).
fn prepare_pin_dir(pin_dir: &Path) -> Result<()> {
    ensure_bpffs()?;
    fs::create_dir_all(pin_dir)
        .with_context(|| format!("creating pin directory {}", pin_dir.display()))?;
    if !is_bpffs(pin_dir) {
        bail!("pin directory {} is not on bpffs", pin_dir.display());
    }
    Ok(())
}

fn open_pin_dir(pin_dir: &Path) -> Result<fs::File> {
    prepare_pin_dir(pin_dir)?;
    fs::File::open(pin_dir).with_context(|| format!("opening {}", pin_dir.display()))
}

fn flock(dir: &fs::File, nonblocking: bool) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd as _;
    let op = libc::LOCK_EX | if nonblocking { libc::LOCK_NB } else { 0 };
    loop {
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(dir.as_raw_fd(), op) } == 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EWOULDBLOCK) => return Ok(false),
            Some(libc::EINTR) => continue,
            _ => return Err(e),
        }
    }
}

/// Take the pin directory, waiting (and saying so) while another vipx holds it.
pub fn lock_pin_dir(pin_dir: &Path) -> Result<PinLock> {
    let dir = open_pin_dir(pin_dir)?;
    if !flock(&dir, true).context("locking the pin directory")? {
        tracing::warn!(
            pin_dir = %pin_dir.display(),
            "another vipx process holds this pin directory; waiting for it to exit (its \
             programs keep serving meanwhile)"
        );
        flock(&dir, false).context("locking the pin directory")?;
    }
    Ok(PinLock { _dir: dir })
}

/// Take the conntrack map out of a loaded object.
pub fn conntrack_map(
    ebpf: &mut Ebpf,
) -> Result<HashMap<MapData, proxy_common::CtKey4, proxy_common::CtValue>> {
    take(ebpf, map_names::CT4)
}

/// The maps conntrack collection reads and writes, opened by pin so the collector has handles
/// of its own.
pub fn conntrack_tables(pin_dir: &Path) -> Result<crate::conntrack::Tables> {
    Ok(crate::conntrack::Tables {
        ct: from_pin(pin_dir, map_names::CT4)?,
        backends: from_pin(pin_dir, map_names::BACKEND4)?,
        revnat: from_pin(pin_dir, map_names::REVNAT4)?,
        hairpin: None,
        snat: from_pin(pin_dir, map_names::SNAT4).ok(),
        flowgen: flow_generations(pin_dir),
    })
}

/// The flow cache's generations, mapped for userspace's bumps; `None` with a warning when the
/// pin is there but cannot be mapped (collection would then delete entries that copies may still
/// stand for, for the rest of their tick), silently for pins of a build without the cache.
fn flow_generations(pin_dir: &Path) -> Option<crate::maps::MmapArray> {
    let path = pin_dir.join(map_names::FLOWGEN);
    if !path.exists() {
        return None;
    }
    let mapped = from_pin::<Array<MapData, u64>>(pin_dir, map_names::FLOWGEN)
        .and_then(|a| crate::maps::MmapArray::map(&a).context("not mmapable"));
    match mapped {
        Ok(m) => Some(m),
        Err(e) => {
            tracing::warn!(
                "the flow cache's generations ({}) cannot be mapped ({e:#}): conntrack entries \
                 collected may be served from per-CPU copies for the rest of their tick (about a \
                 second)",
                path.display()
            );
            None
        }
    }
}

/// Open the conntrack map pinned by a running (or stopped) vipx.
pub fn open_pinned_conntrack(
    pin_dir: &Path,
) -> Result<HashMap<MapData, proxy_common::CtKey4, proxy_common::CtValue>> {
    from_pin(pin_dir, map_names::CT4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conntrack_defaults_scale_with_memory_and_the_flood_limit_with_the_table() {
        const GIB: u64 = 1 << 30;
        assert_eq!(conntrack_entries_for(GIB), 1 << 17, "floor");
        assert_eq!(conntrack_entries_for(8 * GIB), 262_144);
        assert_eq!(conntrack_entries_for(16 * GIB), 524_288);
        assert_eq!(conntrack_entries_for(64 * GIB), 2_097_152);
        assert_eq!(conntrack_entries_for(u64::MAX), 1 << 24, "ceiling");
        assert!(
            conntrack_entries_for_memory().is_some(),
            "/proc/meminfo is read"
        );
        let (syn, gc) = (Duration::from_secs(60), Duration::from_secs(30));
        // A source at the limit for the SYN lifetime holds a quarter of the table.
        let limit = default_flood_limit(4_194_304, syn, gc);
        assert_eq!(limit, 4_194_304 / 8 / 90);
        assert!(u64::from(limit) * 90 * 2 <= 4_194_304 / 4);
        assert_eq!(default_flood_limit(524_288, syn, gc), 728);
        // Review finding: a floor of 1024 let one source hold 184k entries, more than a
        // quarter of every table below 737k entries.
        assert!(u64::from(default_flood_limit(131_072, syn, gc)) * 90 * 2 <= 131_072 / 4);
        assert_eq!(default_flood_limit(64, syn, gc), 64, "floor");
        assert_eq!(
            default_flood_limit(u32::MAX, Duration::ZERO, Duration::ZERO),
            u32::MAX / 8
        );
    }

    #[test]
    fn pin_names_survive_bpffs_and_read_back() {
        let name = link_pin_name("eth0.100", 42, "ingress");
        assert!(!name.contains('.'), "bpffs refuses dots: {name}");
        assert_eq!(
            parse_link_pin_name(&name),
            Some(("eth0.100".to_owned(), 42))
        );
        assert_eq!(parse_link_pin_name("junk"), None);
        let dir = default_pin_dir("ip-10-0-0-1.ec2.internal");
        assert!(!dir.file_name().unwrap().to_string_lossy().contains('.'));
    }

    /// Every placeholder pair is patched, for the kernel's path and for the helpers', and the
    /// rest of the object is left as built.
    #[test]
    fn every_ip_summed_placeholder_is_patched() {
        use proxy_common::skb_csum::{CALL_FALLBACK, CALL_INSN, LOAD_FALLBACK, LOAD_INSN};
        if EBPF_OBJECT.is_empty() {
            return;
        }
        // Where the pairs are in the object as built (the same instructions may also occur
        // naturally elsewhere, e.g. a one-byte load at offset 128: only the pairs' places count).
        let word =
            |bytes: &[u8], at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap());
        let sites: Vec<usize> = (0..EBPF_OBJECT.len().saturating_sub(15))
            .step_by(8)
            .filter(|&at| {
                word(EBPF_OBJECT, at) == CALL_INSN && word(EBPF_OBJECT, at + 8) == LOAD_INSN
            })
            .collect();
        assert!(
            sites.len() >= 2,
            "the pod programs' rewrites carry the pair"
        );
        let path = ChecksumPath::InProgram {
            cast_kfunc: 1234,
            ip_summed_byte: 128,
        };
        let patched = Object::with(path).unwrap();
        let patched = patched.bytes();
        let pairs_left = (0..patched.len().saturating_sub(15))
            .step_by(8)
            .filter(|&at| word(patched, at) == CALL_INSN && word(patched, at + 8) == LOAD_INSN)
            .count();
        assert_eq!(pairs_left, 0);
        for &at in &sites {
            assert_eq!(word(patched, at), 1234 << 32 | (CALL_INSN & 0xffff_ffff));
            assert_eq!(word(patched, at + 8), 128 << 16 | 0x71);
        }
        let changed = EBPF_OBJECT
            .iter()
            .zip(patched)
            .filter(|(a, b)| a != b)
            .count();
        assert!(
            changed <= sites.len() * 6,
            "only the pairs' immediates and offsets change"
        );
        let helpers = Object::with(ChecksumPath::Helpers("test".into())).unwrap();
        for &at in &sites {
            assert_eq!(word(helpers.bytes(), at), CALL_FALLBACK);
            assert_eq!(word(helpers.bytes(), at + 8), LOAD_FALLBACK);
        }
    }
}

//! Builds the eBPF object (proxy-ebpf, for bpfel-unknown-none with nightly + bpf-linker) and
//! places it in OUT_DIR, where `loader` embeds it.
use std::{env, fs, path::PathBuf};

fn main() -> anyhow::Result<()> {
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let obj = out_dir.join("vipx");
    // AYA_BUILD_SKIP lets pure-userspace work (translation tests) build without the eBPF
    // toolchain; the loader then reports that the object is missing instead of loading it.
    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        if !obj.exists() {
            fs::write(&obj, b"")?;
        }
        println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
        return Ok(());
    }
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("../proxy-ebpf");
    let root = root.canonicalize()?;
    let root = root
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("non-UTF-8 path"))?;
    let toolchain = env::var("VIPX_EBPF_TOOLCHAIN").unwrap_or_else(|_| "nightly".into());
    println!("cargo:rerun-if-env-changed=VIPX_EBPF_TOOLCHAIN");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "proxy-ebpf",
            root_dir: root,
            features: &["build-ebpf"],
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain),
    )
}

//! Where cluster objects come from: a manifests directory ([`manifests`]) or the Kubernetes API
//! server ([`kube`]). Both feed the same [`crate::sync::ChangeTracker`], translation and map
//! writer; [`cluster`] holds the object types they share.

pub mod cluster;
pub mod kube;
pub mod manifests;

use std::path::PathBuf;

pub use cluster::{ClusterObjects, Problem};
pub use manifests::{DirCache, is_manifest_file, load_dir, load_str};

/// Which source `vipx run` reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceConfig {
    /// A manifests directory, re-read on change (inotify) and at every full resync.
    Manifests(PathBuf),
    /// The API server named by a kubeconfig file, or the in-cluster service account (`None`).
    Kube { kubeconfig: Option<PathBuf> },
}

impl std::fmt::Display for SourceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SourceConfig::Manifests(dir) => write!(f, "manifests directory {}", dir.display()),
            SourceConfig::Kube {
                kubeconfig: Some(path),
            } => write!(f, "API server of kubeconfig {}", path.display()),
            SourceConfig::Kube { kubeconfig: None } => f.write_str("in-cluster API server"),
        }
    }
}

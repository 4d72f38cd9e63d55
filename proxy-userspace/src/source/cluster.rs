//! The cluster objects every source produces (a manifests directory, the API server), and the
//! problems met reading them.

use std::{fmt, path::PathBuf};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};

/// Services, EndpointSlices and Nodes as a source holds them, plus what could not be used.
#[derive(Clone, Debug, Default)]
pub struct ClusterObjects {
    pub services: Vec<Service>,
    pub slices: Vec<EndpointSlice>,
    pub nodes: Vec<Node>,
    pub problems: Vec<Problem>,
}

impl ClusterObjects {
    /// Appends `other`, keeping the order (files are read in name order, so the result is
    /// deterministic).
    pub fn extend(&mut self, other: ClusterObjects) {
        self.services.extend(other.services);
        self.slices.extend(other.slices);
        self.nodes.extend(other.nodes);
        self.problems.extend(other.problems);
    }
}

/// A file or an object in it that was skipped, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.file.display(), self.reason)
    }
}

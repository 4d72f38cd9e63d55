//! Reads cluster objects from a manifests directory.

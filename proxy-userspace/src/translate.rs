//! Translation of cluster objects into the desired state (kube-proxy semantics).

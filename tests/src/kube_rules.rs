//! kube-proxy iptables / nftables rule sets for side-by-side baselines.

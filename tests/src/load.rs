//! Load generation for the end-to-end bench.

//! Cluster certificates (rcgen) and rustls configurations for mutual TLS.
//!
//! Empty until the secure-mesh issue lands; the crate exists so the workspace has its
//! final shape from the start.

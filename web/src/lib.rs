//! The Yew/WASM console.
//!
//! Empty until the console issue lands; the crate exists so the workspace has its final
//! shape from the start.

//! The HTTP/JSON gateway: translates DESIGN.md section 4 into mesh calls.
//!
//! Empty until the gateway issue lands; the crate exists so the workspace has its final
//! shape from the start.

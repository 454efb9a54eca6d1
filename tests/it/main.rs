//! Integration tests of the `syncmesh` binary: real processes, real disks.

mod bench_cli;
mod cache;
mod console;
mod contention;
mod gateway;
mod mesh;
mod queue;
mod regressions;
mod security;
mod support;

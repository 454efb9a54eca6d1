//! Integration tests of the `syncmesh` binary: real processes, real disks.

mod bench_cli;
mod browser;
mod cache;
mod console;
mod contention;
mod gateway;
mod mesh;
mod queue;
mod regressions;
mod security;
mod support;

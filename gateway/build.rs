//! Builds the console (the `web` crate) for the browser and leaves `index.html`,
//! `web.js` and `web_bg.wasm` in `$OUT_DIR/console`, where `src/console.rs` embeds
//! them in the binary.
//!
//! Two steps, no downloads: a nested `cargo build -p web --target
//! wasm32-unknown-unknown --profile wasm-release`, then wasm-bindgen's own library
//! (`wasm-bindgen-cli-support`, pinned to the same version as the `wasm-bindgen` crate
//! in Cargo.lock, which is what the schema check needs) to write the JS glue.
//!
//! The nested cargo gets a target dir of its own (`target/console`): sharing the outer
//! one would wait forever on the lock the outer build holds. It is incremental, so a
//! build that changed nothing in `web/` costs a second.
//!
//! `SYNCMESH_SKIP_CONSOLE=1` skips both steps (for a quick `cargo check` while
//! working on something else): the gateway then answers `/` with 503 and says why.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let root = manifest
        .parent()
        .expect("the gateway lives in the workspace")
        .to_path_buf();
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("console");
    println!("cargo:rerun-if-changed={}", root.join("web/src").display());
    println!(
        "cargo:rerun-if-changed={}",
        root.join("web/index.html").display()
    );
    println!(
        "cargo:rerun-if-changed={}",
        root.join("web/Cargo.toml").display()
    );
    println!(
        "cargo:rerun-if-changed={}",
        root.join("Cargo.lock").display()
    );
    println!("cargo:rerun-if-env-changed=SYNCMESH_SKIP_CONSOLE");
    println!("cargo:rustc-check-cfg=cfg(console_skipped)");
    if let Err(e) = fs::create_dir_all(&out) {
        panic!("cannot create {}: {e}", out.display());
    }
    if env::var_os("SYNCMESH_SKIP_CONSOLE").is_some_and(|v| v != "0" && !v.is_empty()) {
        println!(
            "cargo:warning=SYNCMESH_SKIP_CONSOLE is set: the console is not built; / answers 503"
        );
        println!("cargo:rustc-cfg=console_skipped");
        return;
    }
    check_wasm_target();
    let wasm = build_wasm(&root);
    bindgen(&wasm, &out);
    if let Err(e) = fs::copy(root.join("web/index.html"), out.join("index.html")) {
        panic!("cannot copy web/index.html: {e}");
    }
}

/// Stop with the command that fixes it when the toolchain lacks the wasm32 target.
fn check_wasm_target() {
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".to_owned());
    let sysroot = Command::new(&rustc)
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| PathBuf::from(s.trim()));
    let has_target = sysroot
        .as_ref()
        .is_some_and(|s| s.join("lib/rustlib/wasm32-unknown-unknown/lib").is_dir());
    if !has_target {
        panic!(
            "\n\nThe console is built for the browser and this toolchain has no wasm32 target.\n\
             Install it with:\n\n    rustup target add wasm32-unknown-unknown\n\n\
             (or build without the console: SYNCMESH_SKIP_CONSOLE=1)\n"
        );
    }
}

/// The nested build of the `web` crate; returns the `.wasm` it made.
fn build_wasm(root: &Path) -> PathBuf {
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let target_dir = env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| root.join("target"), PathBuf::from)
        .join("console");
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root)
        .args(["build", "-p", "web", "--target", "wasm32-unknown-unknown"])
        .args(["--profile", "wasm-release", "--target-dir"])
        .arg(&target_dir);
    if env::var_os("CARGO_NET_OFFLINE").is_some() {
        cmd.arg("--offline");
    }
    // What the outer build set for itself must not reach the inner one: another target
    // dir (the lock), host flags, clippy as the compiler, coverage instrumentation. The
    // jobserver (CARGO_MAKEFLAGS) stays, so both builds share the same cores.
    for var in [
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_BUILD_RUSTFLAGS",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_PRIMARY_PACKAGE",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run cargo for the console: {e}"));
    if !status.success() {
        panic!("building the console (cargo build -p web --target wasm32-unknown-unknown) failed: {status}");
    }
    target_dir.join("wasm32-unknown-unknown/wasm-release/web.wasm")
}

/// The JS glue and the final `.wasm`, as `wasm-bindgen --target web` writes them.
fn bindgen(wasm: &Path, out: &Path) {
    let result = wasm_bindgen_cli_support::Bindgen::new()
        .input_path(wasm)
        .web(true)
        .and_then(|b| b.typescript(false).out_name("web").generate(out));
    if let Err(e) = result {
        panic!("wasm-bindgen on {}: {e:#}", wasm.display());
    }
}

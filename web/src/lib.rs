//! The syncmesh console: a Yew app compiled to `wasm32-unknown-unknown`, served by the
//! gateway at `/`.
//!
//! [`model`] builds everywhere: the view types the gateway sends and the console's
//! reducer. The app ([`app`], browser only) subscribes to `GET /api/events`, feeds
//! every snapshot to the reducer and renders the result; its forms call the same HTTP
//! API a user would.

pub mod model;

#[cfg(target_arch = "wasm32")]
mod app;

/// Start the console in the page's `<main id="console">`.
#[cfg(target_arch = "wasm32")]
#[wasm_bindgen::prelude::wasm_bindgen(start)]
pub fn start() {
    app::start();
}

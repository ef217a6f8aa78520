//! Test harness for black-box tests and the benchmark: spawns the real
//! `wasmhook` binary on a random port with a fresh SQLite file
//! ([`TestGateway`]), and runs real HTTP receivers on 127.0.0.1
//! ([`Receiver`]) that record what they get and answer as scripted, and
//! sets up two tenants side by side ([`neighbour`]).

mod gateway;
pub mod neighbour;
mod proxy;
mod receiver;

pub use gateway::{
    GatewayBuilder, TEST_POSTGRES_URL, TestGateway, Workspace, gateway_binary, spawn_app,
};
pub use proxy::TcpProxy;
pub use receiver::{Received, Receiver, Reply};

/// A plugin component built by `scripts/test` for wasm32-wasip2: one of
/// `plugins/` (`slack`, `redact`, …) or the hostile one of the tests.
pub fn plugin_wasm(name: &str) -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/guest/wasm32-wasip2/release")
        .join(format!("wasmhook_plugin_{name}.wasm"));
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; scripts/test builds the plugins for wasm32-wasip2",
            path.display()
        )
    })
}

/// The Python interpreter of the virtual environment `scripts/test` makes
/// (`target/python`, with `tests/python/requirements.txt` installed), or
/// `WASMHOOK_TEST_PYTHON`.
pub fn python() -> std::path::PathBuf {
    if let Some(path) = std::env::var_os("WASMHOOK_TEST_PYTHON") {
        return path.into();
    }
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/python/bin/python");
    assert!(
        path.exists(),
        "{}: missing; scripts/test creates it with the Python packages the tests use",
        path.display()
    );
    path
}

/// A script of `tests/python/`.
pub fn python_script(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("python")
        .join(name)
}

/// A plugin built for `wasm32-unknown-unknown` (a core module carrying
/// its WIT type), turned into a component with `wit-component`: no WASI
/// imports at all, only the plugin log.
pub fn plugin_component_from_core(name: &str) -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/guest/wasm32-unknown-unknown/release")
        .join(format!("wasmhook_plugin_{name}.wasm"));
    let core = std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; scripts/test builds it for wasm32-unknown-unknown",
            path.display()
        )
    });
    wit_component::ComponentEncoder::default()
        .module(&core)
        .and_then(|encoder| encoder.validate(true).encode())
        .unwrap_or_else(|e| panic!("{name} does not componentize: {e:#}"))
}

/// Checks a delivery with the `standardwebhooks` crate, an implementation
/// of the spec not written here.
pub fn verify_signature(secret: &str, received: &Received) -> Result<(), String> {
    let verifier =
        standardwebhooks::Webhook::new(secret).map_err(|e| format!("bad secret: {e}"))?;
    verifier
        .verify(&received.body, &received.headers)
        .map_err(|e| format!("signature does not verify: {e}"))
}

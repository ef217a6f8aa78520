//! The WebAssembly plugin host.
//!
//! Plugins are components of the `wasmhook:plugin` world (`sdk/wit/`).
//! [`PluginHost::compile_quick`] checks one at upload and makes it ready
//! with a fast baseline compiler; [`PluginHost::compile`] produces the
//! optimised code in the background;
//! [`PluginHost::run`] runs it for one delivery in a fresh, sandboxed
//! instance: no network, no files, no environment, a deadline, a memory
//! cap, a stack cap, and bounded output and logs, within its webhook's
//! fair share of the plugin slots. Compiled components stay
//! ready in a bounded cache keyed by content hash, and their precompiled
//! machine code is kept in the store so a restart does not compile again.

mod host;
mod runtime;
mod sandbox;
mod share;

pub use host::{Compiled, PluginHost, Ready};
pub use runtime::Plugins;
pub use sandbox::{LogLine, PluginLimits};

use std::time::Duration;

use crate::domain::PluginFailure;

/// Generated from the one contract between host and guest.
mod bindings {
    wasmtime::component::bindgen!({
        path: "../sdk/wit",
        world: "transform",
        // Called from the async runtime; the guest yields at every epoch
        // tick, so a busy plugin never holds a runtime thread for long.
        exports: { default: async },
    });
}

pub use bindings::wasmhook::plugin::types::{Event as PluginEvent, Outcome as WitOutcome};

/// Why an upload was refused.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("the body is not WebAssembly: {0}")]
    NotWasm(String),
    #[error(
        "this is a core WebAssembly module, not a component; build for wasm32-wasip2 or run `wasm-tools component new`"
    )]
    CoreModule,
    #[error("the component does not implement the wasmhook:plugin/transform world: {0}")]
    WrongWorld(String),
    #[error("the component imports what plugins may not use: {0}")]
    ForbiddenImports(String),
    #[error("the component failed to compile: {0}")]
    Compile(String),
}

/// Why a plugin invocation failed. Every variant fails the attempt and
/// sends nothing.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PluginError {
    #[error("the plugin ran past its {0:?} deadline")]
    Timeout(Duration),
    #[error("the plugin tried to use more than its {0} bytes of memory")]
    MemoryLimit(usize),
    #[error("the plugin overflowed its stack")]
    StackOverflow,
    #[error("the plugin trapped: {0}")]
    Trap(String),
    #[error("the plugin's output was refused: {0}")]
    InvalidOutput(String),
    #[error("the plugin returned an error: {0}")]
    Returned(String),
    #[error("the plugin could not be loaded: {0}")]
    Unavailable(String),
}

impl PluginError {
    /// The class recorded on the attempt.
    pub fn kind(&self) -> PluginFailure {
        match self {
            Self::Timeout(_) => PluginFailure::Timeout,
            Self::MemoryLimit(_) => PluginFailure::MemoryLimit,
            Self::StackOverflow => PluginFailure::StackOverflow,
            Self::Trap(_) => PluginFailure::Trap,
            Self::InvalidOutput(_) => PluginFailure::InvalidOutput,
            Self::Returned(_) => PluginFailure::Returned,
            Self::Unavailable(_) => PluginFailure::Unavailable,
        }
    }
}

/// What a plugin decided, checked and ready to sign and send.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Deliver(Delivered),
    Skip(String),
}

/// The request a plugin made of a delivery, replacing the default body.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivered {
    pub body: Vec<u8>,
    pub content_type: String,
    pub headers: Vec<(String, String)>,
}

/// One invocation's result with its log.
#[derive(Debug)]
pub struct Invocation {
    pub result: Result<Decision, PluginError>,
    pub logs: Vec<LogLine>,
    pub duration: Duration,
}

//! Guest SDK for wasmhook transform plugins.
//!
//! Placeholder: the WebAssembly plugin contract (`wit/`) and the helpers a
//! plugin author uses arrive with the plugin issue.

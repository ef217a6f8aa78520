//! The state of one sandboxed invocation: a WASI context with nothing in
//! it, a memory limiter that remembers a breach, and the plugin's log.

use std::time::Duration;

use serde::Serialize;
use wasmtime::ResourceLimiter;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::bindings::wasmhook::plugin::{log, types};

/// Per-invocation limits.
#[derive(Debug, Clone)]
pub struct PluginLimits {
    /// Wall-clock deadline (counted in epoch ticks), instantiation included.
    pub deadline: Duration,
    pub max_memory_bytes: usize,
    pub max_stack_bytes: usize,
    pub max_output_bytes: usize,
    pub max_log_lines: usize,
    pub max_log_bytes: usize,
    /// Frames of a trap's backtrace kept in the error message.
    pub max_backtrace_frames: usize,
}

impl Default for PluginLimits {
    fn default() -> Self {
        Self {
            deadline: Duration::from_millis(100),
            max_memory_bytes: 32 * 1024 * 1024,
            max_stack_bytes: 512 * 1024,
            max_output_bytes: 1024 * 1024,
            max_log_lines: 100,
            max_log_bytes: 16 * 1024,
            max_backtrace_frames: 8,
        }
    }
}

/// One line a plugin logged.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct LogLine {
    pub level: &'static str,
    pub message: String,
}

/// Store data of one invocation.
pub struct Sandbox {
    wasi: WasiCtx,
    table: ResourceTable,
    pub limiter: MemoryLimiter,
    pub log: PluginLog,
    stdout: MemoryOutputPipe,
    stderr: MemoryOutputPipe,
}

impl Sandbox {
    /// WASI with no preopened directories, no environment, no arguments,
    /// and no sockets or name lookups: only what `wasm32-wasip2` std needs
    /// to start. stdout and stderr are captured into the plugin log.
    pub fn new(limits: &PluginLimits) -> Self {
        let stdout = MemoryOutputPipe::new(limits.max_log_bytes);
        let stderr = MemoryOutputPipe::new(limits.max_log_bytes);
        let wasi = WasiCtxBuilder::new()
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        Self {
            wasi,
            table: ResourceTable::new(),
            limiter: MemoryLimiter {
                max_bytes: limits.max_memory_bytes,
                exceeded: false,
            },
            log: PluginLog {
                lines: Vec::new(),
                bytes: 0,
                max_lines: limits.max_log_lines,
                max_bytes: limits.max_log_bytes,
                dropped: 0,
            },
            stdout,
            stderr,
        }
    }

    /// The log, with what the plugin printed appended.
    pub fn into_log(mut self) -> Vec<LogLine> {
        for (level, pipe) in [("stdout", &self.stdout), ("stderr", &self.stderr)] {
            let text = String::from_utf8_lossy(&pipe.contents()).into_owned();
            for line in text.lines().filter(|l| !l.is_empty()) {
                self.log.push(level, line.to_owned());
            }
        }
        if self.log.dropped > 0 {
            let note = format!(
                "{} more log lines dropped (limit reached)",
                self.log.dropped
            );
            self.log.lines.push(LogLine {
                level: "warn",
                message: note,
            });
        }
        self.log.lines
    }

    /// The last error-level line: where the SDK puts a panic message.
    pub fn last_error(&self) -> Option<&str> {
        self.log
            .lines
            .iter()
            .rev()
            .find(|l| l.level == "error")
            .map(|l| l.message.as_str())
    }
}

impl WasiView for Sandbox {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// The types interface has no functions; the trait marks the link.
impl types::Host for Sandbox {}

impl log::Host for Sandbox {
    fn log(&mut self, level: log::Level, message: String) {
        let level = match level {
            log::Level::Trace => "trace",
            log::Level::Debug => "debug",
            log::Level::Info => "info",
            log::Level::Warn => "warn",
            log::Level::Error => "error",
        };
        self.log.push(level, message);
    }
}

/// The plugin log of one invocation, bounded in lines and bytes.
pub struct PluginLog {
    lines: Vec<LogLine>,
    bytes: usize,
    max_lines: usize,
    max_bytes: usize,
    dropped: usize,
}

impl PluginLog {
    fn push(&mut self, level: &'static str, mut message: String) {
        if self.lines.len() >= self.max_lines || self.bytes >= self.max_bytes {
            self.dropped += 1;
            return;
        }
        let room = self.max_bytes - self.bytes;
        if message.len() > room {
            let mut cut = room;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        self.bytes += message.len();
        self.lines.push(LogLine { level, message });
    }
}

/// Caps linear memory and remembers a refused growth, so the trap that
/// usually follows is reported as a memory-limit error.
pub struct MemoryLimiter {
    max_bytes: usize,
    pub exceeded: bool,
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max_bytes {
            self.exceeded = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

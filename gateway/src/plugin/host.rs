//! The engines, the compiled-component cache, and invocation.
//!
//! Two tiers: an upload is checked and made ready with Winch (a baseline
//! compiler, about 4x faster to compile than Cranelift), so it is usable at
//! once; Cranelift then compiles it in the background into the optimised
//! code that replaces it in the cache and is stored as the artifact.

use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::header::{HeaderName, HeaderValue};
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{
    Config, Enabled, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, Strategy,
    Trap, UpdateDeadline, WasmBacktrace,
};

use super::bindings::{Transform, TransformPre};
use super::sandbox::{PluginLimits, Sandbox};
use super::share::Shares;
use super::{Decision, Delivered, Invocation, PluginError, PluginEvent, UploadError, WitOutcome};
use crate::domain::{MAX_FOREIGN_TEXT, bounded, is_reserved_header, quoted};

/// How often the epoch advances: a runaway plugin is stopped within its
/// deadline plus one tick.
const TICK: Duration = Duration::from_millis(5);
/// Compiled components kept ready in memory.
const CACHE_CAPACITY: usize = 256;
const MAX_HEADERS: usize = 32;
/// Names and values of a plugin's headers together.
const MAX_HEADER_BYTES: usize = 8 * 1024;
const MAX_CONTENT_TYPE: usize = 256;
const MAX_SKIP_REASON: usize = 1024;
/// Linear memory and table bytes kept mapped between pooled instances.
/// With PAGEMAP_SCAN (Linux 6.7+) only the pages an instance dirtied are
/// reset, so no `madvise` (and no cross-core TLB shootdown) per instance;
/// a Rust guest dirties its stack and heap around the first 2 MiB.
const KEEP_RESIDENT: usize = 4 * 1024 * 1024;
/// Fiber stack bytes kept mapped between invocations.
const ASYNC_STACK_KEEP_RESIDENT: usize = 2 * 1024 * 1024;

/// A compiled plugin, ready to instantiate on the engine that compiled it.
#[derive(Clone)]
pub struct Ready {
    pre: Arc<TransformPre<Sandbox>>,
    engine: Engine,
    optimized: bool,
}

impl Ready {
    /// Whether this is Cranelift's code (else the quick Winch tier).
    pub fn is_optimized(&self) -> bool {
        self.optimized
    }
}

/// One compiler's engine and the imports it links plugins against.
struct Tier {
    engine: Engine,
    linker: Linker<Sandbox>,
}

impl Tier {
    fn new(config: &Config) -> wasmtime::Result<Self> {
        let engine = Engine::new(config)?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        Transform::add_to_linker::<_, HasSelf<_>>(&mut linker, |sandbox| sandbox)?;
        Ok(Self { engine, linker })
    }
}

/// The result of compiling an upload.
pub struct Compiled {
    pub ready: Ready,
    /// Precompiled machine code, loadable by hosts with the same key.
    pub artifact: Vec<u8>,
    pub artifact_key: String,
}

#[derive(Clone)]
pub struct PluginHost {
    inner: Arc<Inner>,
}

struct Inner {
    /// Cranelift, pooled instances: what deliveries run on.
    optimized: Tier,
    /// Winch, instances allocated on demand: only until Cranelift is done.
    quick: Tier,
    limits: PluginLimits,
    cache: Mutex<Cache>,
    slots: Shares,
    engine_key: String,
    ticking: Arc<AtomicBool>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.ticking.store(false, Ordering::Relaxed);
    }
}

impl PluginHost {
    /// Builds the engine (pooling allocator sized for `concurrency`
    /// simultaneous invocations, epoch interruption) and starts its ticker.
    pub fn new(limits: PluginLimits, concurrency: usize) -> Result<Self, PluginError> {
        let unavailable = |e: wasmtime::Error| PluginError::Unavailable(e.to_string());
        let optimized = Tier::new(&engine_config(&limits, concurrency)).map_err(unavailable)?;
        let quick = Tier::new(&quick_engine_config(&limits)).map_err(unavailable)?;
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        optimized
            .engine
            .precompile_compatibility_hash()
            .hash(&mut hasher);
        // The hash covers the wasmtime version and every setting that
        // affects compiled code.
        let engine_key = format!("engine-{:016x}", hasher.finish());
        let ticking = Arc::new(AtomicBool::new(true));
        start_ticker(
            vec![optimized.engine.clone(), quick.engine.clone()],
            ticking.clone(),
        );
        Ok(Self {
            inner: Arc::new(Inner {
                optimized,
                quick,
                limits,
                cache: Mutex::new(Cache::default()),
                slots: Shares::new(concurrency),
                engine_key,
                ticking,
            }),
        })
    }

    /// The key an artifact of the plugin with this hash must carry to be
    /// loaded by this host: same wasmtime, same engine settings.
    pub fn artifact_key(&self, sha256: &str) -> String {
        format!("{sha256}/{}", self.inner.engine_key)
    }

    /// Checks an upload and makes it ready with the quick tier, unless it
    /// is in the cache already (CPU-heavy: call off the async path). Follow
    /// with [`PluginHost::compile`] for the optimised code and artifact.
    pub fn compile_quick(&self, wasm: &[u8], sha256: &str) -> Result<Ready, UploadError> {
        if let Some(ready) = self.cached(sha256) {
            return Ok(ready);
        }
        check_header(wasm)?;
        let quick = &self.inner.quick;
        let component = Component::new(&quick.engine, wasm)
            .map_err(|e| UploadError::Compile(format!("{e:#}")))?;
        let ready = prepare(quick, &component, false)?;
        self.remember(sha256, ready.clone());
        Ok(ready)
    }

    /// Checks and compiles an upload with Cranelift (CPU-heavy: call off
    /// the async path); the result replaces any quick-tier code.
    pub fn compile(&self, wasm: &[u8], sha256: &str) -> Result<Compiled, UploadError> {
        check_header(wasm)?;
        let optimized = &self.inner.optimized;
        let component = Component::new(&optimized.engine, wasm)
            .map_err(|e| UploadError::Compile(format!("{e:#}")))?;
        let ready = prepare(optimized, &component, true)?;
        let artifact = component
            .serialize()
            .map_err(|e| UploadError::Compile(format!("cannot serialize: {e}")))?;
        self.remember(sha256, ready.clone());
        Ok(Compiled {
            ready,
            artifact,
            artifact_key: self.artifact_key(sha256),
        })
    }

    /// A plugin already in memory.
    pub fn cached(&self, sha256: &str) -> Option<Ready> {
        self.inner
            .cache
            .lock()
            .expect("plugin cache poisoned")
            .get(sha256)
    }

    /// Makes a stored plugin ready: from its artifact when this host made
    /// it, else by compiling (the new artifact is returned for storing).
    pub fn load(
        &self,
        sha256: &str,
        wasm: &[u8],
        artifact: Option<(&[u8], &str)>,
    ) -> Result<(Ready, Option<Compiled>), PluginError> {
        if let Some((bytes, key)) = artifact
            && key == self.artifact_key(sha256)
        {
            // SAFETY: artifacts are only written by `compile` of a host with
            // this very key (wasmtime version and engine settings), into our
            // own database; wasmtime also checks compatibility itself.
            let optimized = &self.inner.optimized;
            let component = unsafe { Component::deserialize(&optimized.engine, bytes) };
            if let Ok(component) = component {
                let ready = prepare(optimized, &component, true)
                    .map_err(|e| PluginError::Unavailable(e.to_string()))?;
                self.remember(sha256, ready.clone());
                return Ok((ready, None));
            }
        }
        let compiled = self
            .compile(wasm, sha256)
            .map_err(|e| PluginError::Unavailable(e.to_string()))?;
        Ok((compiled.ready.clone(), Some(compiled)))
    }

    fn remember(&self, sha256: &str, ready: Ready) {
        self.inner
            .cache
            .lock()
            .expect("plugin cache poisoned")
            .insert(sha256, ready);
    }

    /// Runs one invocation for `tenant` (a webhook, or the playground),
    /// at most `concurrency` at a time (the size of the instance pool),
    /// within the tenant's fair share of them.
    pub async fn run(
        &self,
        ready: &Ready,
        event: PluginEvent,
        config: String,
        tenant: &str,
    ) -> Invocation {
        let Ok(slot) = self.inner.slots.acquire(tenant).await else {
            return Invocation {
                result: Err(PluginError::Unavailable(
                    "the plugin host is shutting down".into(),
                )),
                logs: Vec::new(),
                duration: Duration::ZERO,
            };
        };
        let invocation = self.invoke(ready, &event, &config).await;
        let hit_a_limit = matches!(
            invocation.result,
            Err(PluginError::Timeout(_) | PluginError::MemoryLimit(_) | PluginError::StackOverflow)
        );
        slot.ended(hit_a_limit, invocation.duration);
        invocation
    }

    /// A fresh instance, the deadline armed before instantiation (which
    /// runs guest code too), one call, and the instance gone. The guest
    /// yields to the runtime at every epoch tick and is interrupted once
    /// its deadline has passed. Only [`PluginHost::run`] calls it: the
    /// pool has room for `concurrency` instances, no more.
    async fn invoke(&self, ready: &Ready, event: &PluginEvent, config: &str) -> Invocation {
        let limits = &self.inner.limits;
        let started = Instant::now();
        let mut store = Store::new(&ready.engine, Sandbox::new(limits));
        store.limiter(|sandbox| &mut sandbox.limiter);
        let max_ticks = deadline_ticks(limits.deadline);
        let mut ticks = 0;
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(move |_| {
            ticks += 1;
            Ok(if ticks >= max_ticks {
                UpdateDeadline::Interrupt
            } else {
                UpdateDeadline::Yield(1)
            })
        });
        let called = match ready.pre.instantiate_async(&mut store).await {
            Ok(instance) => instance.call_transform(&mut store, event, config).await,
            Err(error) => Err(error),
        };
        let result = match called {
            Ok(Ok(outcome)) => check_output(outcome, limits),
            Ok(Err(message)) => Err(PluginError::Returned(bounded(message, MAX_FOREIGN_TEXT))),
            Err(error) => Err(classify(&error, store.data(), limits)),
        };
        let duration = started.elapsed();
        Invocation {
            result,
            logs: store.into_data().into_log(),
            duration,
        }
    }
}

fn engine_config(limits: &PluginLimits, concurrency: usize) -> Config {
    let instances = u32::try_from(concurrency.max(1)).unwrap_or(u32::MAX);
    let mut pool = PoolingAllocationConfig::default();
    pool.total_component_instances(instances)
        .total_core_instances(instances.saturating_mul(8))
        .total_memories(instances.saturating_mul(2))
        .total_tables(instances.saturating_mul(4))
        .max_memory_size(limits.max_memory_bytes)
        .total_stacks(instances)
        .async_stack_keep_resident(ASYNC_STACK_KEEP_RESIDENT)
        .linear_memory_keep_resident(KEEP_RESIDENT)
        .table_keep_resident(KEEP_RESIDENT)
        .pagemap_scan(Enabled::Auto);
    let mut config = Config::new();
    config
        .wasm_component_model(true)
        .epoch_interruption(true)
        .max_wasm_stack(limits.max_stack_bytes)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    // Names plugin code in `perf` profiles (/tmp/perf-<pid>.map).
    if std::env::var_os("WASMHOOK_PLUGIN_PERFMAP").is_some() {
        config.profiler(wasmtime::ProfilingStrategy::PerfMap);
    }
    config
}

/// Winch compiles fast and runs slower; its code serves only until the
/// optimised code is ready, so its instances are not pooled.
fn quick_engine_config(limits: &PluginLimits) -> Config {
    let mut config = Config::new();
    config
        .strategy(Strategy::Winch)
        .wasm_component_model(true)
        .epoch_interruption(true)
        .max_wasm_stack(limits.max_stack_bytes);
    config
}

fn prepare(tier: &Tier, component: &Component, optimized: bool) -> Result<Ready, UploadError> {
    check_imports(component, &tier.engine)?;
    let pre = tier
        .linker
        .instantiate_pre(component)
        .map_err(|e| UploadError::ForbiddenImports(format!("{e:#}")))?;
    let pre = TransformPre::new(pre).map_err(|e| UploadError::WrongWorld(format!("{e:#}")))?;
    Ok(Ready {
        pre: Arc::new(pre),
        engine: tier.engine.clone(),
        optimized,
    })
}

fn start_ticker(engines: Vec<Engine>, ticking: Arc<AtomicBool>) {
    std::thread::Builder::new()
        .name("wasmhook-plugin-epoch".into())
        .spawn(move || {
            while ticking.load(Ordering::Relaxed) {
                std::thread::sleep(TICK);
                for engine in &engines {
                    engine.increment_epoch();
                }
            }
        })
        .expect("spawn the plugin epoch ticker");
}

fn deadline_ticks(deadline: Duration) -> u64 {
    (deadline.as_micros().div_ceil(TICK.as_micros())).max(1) as u64
}

/// What a plugin may import: the WASI interfaces `wasm32-wasip2` std
/// links against (denied at run time where they would reach out: no
/// preopens, no sockets), and the plugin log.
const ALLOWED_IMPORTS: &[&str] = &[
    "wasi:cli/",
    "wasi:io/",
    "wasi:clocks/",
    "wasi:random/",
    "wasi:filesystem/",
    "wasi:sockets/",
    "wasmhook:plugin/",
];

fn check_imports(component: &Component, engine: &Engine) -> Result<(), UploadError> {
    let forbidden: Vec<String> = component
        .component_type()
        .imports(engine)
        .map(|(name, _)| name.to_owned())
        .filter(|name| {
            !ALLOWED_IMPORTS
                .iter()
                .any(|prefix| name.starts_with(prefix))
        })
        .collect();
    if forbidden.is_empty() {
        return Ok(());
    }
    Err(UploadError::ForbiddenImports(forbidden.join(", ")))
}

/// Tells a component from a core module before compiling.
fn check_header(wasm: &[u8]) -> Result<(), UploadError> {
    if wasm.len() < 8 || &wasm[..4] != b"\0asm" {
        return Err(UploadError::NotWasm(
            "it does not start with the \\0asm magic".into(),
        ));
    }
    match wasm[4..8] {
        [1, 0, 0, 0] => Err(UploadError::CoreModule),
        [_, _, 1, 0] => Ok(()),
        _ => Err(UploadError::NotWasm(
            "unknown WebAssembly version or layer".into(),
        )),
    }
}

fn classify(error: &wasmtime::Error, sandbox: &Sandbox, limits: &PluginLimits) -> PluginError {
    match error.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => PluginError::Timeout(limits.deadline),
        Some(Trap::StackOverflow) => PluginError::StackOverflow,
        _ if sandbox.limiter.exceeded => PluginError::MemoryLimit(limits.max_memory_bytes),
        trap => {
            let mut message = match trap {
                Some(trap) => trap.to_string(),
                None => format!("{error:#}"),
            };
            if let Some(panic) = sandbox.last_error() {
                message = format!("{message}; {panic}");
            }
            if let Some(backtrace) = error.downcast_ref::<WasmBacktrace>() {
                // Release plugins are usually stripped: list named frames only.
                let frames: Vec<&str> = backtrace
                    .frames()
                    .iter()
                    .filter_map(|f| f.func_name())
                    .take(limits.max_backtrace_frames)
                    .collect();
                if !frames.is_empty() {
                    message = format!("{message} (in {})", frames.join(" < "));
                }
            }
            PluginError::Trap(bounded(message, MAX_FOREIGN_TEXT))
        }
    }
}

/// Checks what a plugin returned: size, content type, and headers it may
/// set. Anything refused is named in a bounded message: a plugin's own
/// text never reaches the wire or the store unchecked or whole.
fn check_output(outcome: WitOutcome, limits: &PluginLimits) -> Result<Decision, PluginError> {
    let delivery = match outcome {
        WitOutcome::Skip(reason) => return Ok(Decision::Skip(bounded(reason, MAX_SKIP_REASON))),
        WitOutcome::Deliver(delivery) => delivery,
    };
    if delivery.body.len() > limits.max_output_bytes {
        return Err(invalid(format!(
            "the body of {} bytes is over the {} byte limit",
            delivery.body.len(),
            limits.max_output_bytes
        )));
    }
    let content_type = delivery
        .content_type
        .unwrap_or_else(|| "application/json".into());
    check_content_type(&content_type)?;
    check_headers(&delivery.headers)?;
    Ok(Decision::Deliver(Delivered {
        body: delivery.body,
        content_type,
        headers: delivery.headers,
    }))
}

fn invalid(message: String) -> PluginError {
    PluginError::InvalidOutput(message)
}

fn check_content_type(content_type: &str) -> Result<(), PluginError> {
    if content_type.len() > MAX_CONTENT_TYPE {
        return Err(invalid(format!(
            "the content type is {} bytes; at most {MAX_CONTENT_TYPE}",
            content_type.len()
        )));
    }
    if HeaderValue::from_str(content_type).is_err() {
        return Err(invalid(format!(
            "content type `{}` is not a valid header value",
            quoted(content_type)
        )));
    }
    Ok(())
}

/// Valid HTTP names and values only (a CR or LF anywhere is refused, so a
/// plugin cannot add a header of its own making), none the gateway sets,
/// and few and small enough to be worth sending.
fn check_headers(headers: &[(String, String)]) -> Result<(), PluginError> {
    if headers.len() > MAX_HEADERS {
        return Err(invalid(format!(
            "{} headers; at most {MAX_HEADERS}",
            headers.len()
        )));
    }
    let bytes: usize = headers.iter().map(|(n, v)| n.len() + v.len()).sum();
    if bytes > MAX_HEADER_BYTES {
        return Err(invalid(format!(
            "the headers are {bytes} bytes; at most {MAX_HEADER_BYTES}"
        )));
    }
    for (name, value) in headers {
        if HeaderName::from_bytes(name.as_bytes()).is_err() {
            return Err(invalid(format!(
                "`{}` is not a valid header name",
                quoted(name)
            )));
        }
        if HeaderValue::from_str(value).is_err() {
            return Err(invalid(format!(
                "the value of `{}` is not a valid header value",
                quoted(name)
            )));
        }
        if is_reserved_header(name) {
            return Err(invalid(format!(
                "header `{}` is set by the gateway; plugins may not set it",
                quoted(name)
            )));
        }
    }
    Ok(())
}

/// Compiled components by content hash, the oldest dropped when full.
#[derive(Default)]
struct Cache {
    ready: HashMap<String, Ready>,
    order: VecDeque<String>,
}

impl Cache {
    fn get(&self, sha256: &str) -> Option<Ready> {
        self.ready.get(sha256).cloned()
    }

    fn insert(&mut self, sha256: &str, ready: Ready) {
        if self.ready.insert(sha256.to_owned(), ready).is_some() {
            return;
        }
        self.order.push_back(sha256.to_owned());
        while self.order.len() > CACHE_CAPACITY {
            if let Some(oldest) = self.order.pop_front() {
                self.ready.remove(&oldest);
            }
        }
    }
}

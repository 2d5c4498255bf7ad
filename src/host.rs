//! The proxy-wasm adapter: the only module that speaks the proxy-wasm ABI (0.2.1).
//!
//! It implements the ABI directly instead of through the `proxy-wasm` SDK's dispatcher, which
//! panics (trapping the VM) on a callout token or context it does not know and keeps a map
//! entry for every abandoned callout. Here every host status maps to "absent" or "failed", no
//! per-context object is made, and the buffers the host hands back during a callback are carved
//! from a per-callback arena, so a cache hit allocates nothing.

use crate::config::Config;
use crate::filter::Router;
use crate::metrics::Counter;
use crate::port::HeaderBlock;
use crate::port::{ContextId, Host, Level, SetStatus, Verdict};
use crate::whoami::MAX_BODY;
use std::alloc::{alloc, dealloc, Layout};
use std::cell::{Cell, RefCell, UnsafeCell};
use std::ptr::null_mut;

const STATUS_OK: u32 = 0;
const STATUS_CAS_MISMATCH: u32 = 8;
const MAP_REQUEST_HEADERS: u32 = 0;
const MAP_CALL_RESPONSE_HEADERS: u32 = 6;
const BUFFER_CALL_RESPONSE_BODY: u32 = 4;
const BUFFER_PLUGIN_CONFIGURATION: u32 = 7;
const STREAM_HTTP_REQUEST: u32 = 0;
const METRIC_COUNTER: u32 = 0;

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_log(level: u32, message_data: *const u8, message_size: usize) -> u32;
    fn proxy_get_current_time_nanoseconds(return_time: *mut u64) -> u32;
    fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
    fn proxy_get_buffer_bytes(
        buffer_type: u32,
        start: usize,
        max_size: usize,
        return_buffer_data: *mut *mut u8,
        return_buffer_size: *mut usize,
    ) -> u32;
    fn proxy_get_header_map_pairs(
        map_type: u32,
        return_map_data: *mut *mut u8,
        return_map_size: *mut usize,
    ) -> u32;
    fn proxy_get_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_replace_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_remove_header_map_value(map_type: u32, key_data: *const u8, key_size: usize) -> u32;
    fn proxy_get_property(
        path_data: *const u8,
        path_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_set_property(
        path_data: *const u8,
        path_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_get_shared_data(
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
        return_cas: *mut u32,
    ) -> u32;
    fn proxy_set_shared_data(
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
        cas: u32,
    ) -> u32;
    fn proxy_continue_stream(stream_type: u32) -> u32;
    fn proxy_set_effective_context(context_id: u32) -> u32;
    #[allow(clippy::too_many_arguments)]
    fn proxy_send_local_response(
        status_code: u32,
        status_code_details_data: *const u8,
        status_code_details_size: usize,
        body_data: *const u8,
        body_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> u32;
    #[allow(clippy::too_many_arguments)]
    fn proxy_http_call(
        upstream_data: *const u8,
        upstream_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        body_data: *const u8,
        body_size: usize,
        trailers_data: *const u8,
        trailers_size: usize,
        timeout: u32,
        return_token: *mut u32,
    ) -> u32;
    fn proxy_define_metric(
        metric_type: u32,
        name_data: *const u8,
        name_size: usize,
        return_id: *mut u32,
    ) -> u32;
    fn proxy_increment_metric(metric_id: u32, offset: i64) -> u32;
    fn proxy_call_foreign_function(
        name_data: *const u8,
        name_size: usize,
        args_data: *const u8,
        args_size: usize,
        return_results_data: *mut *mut u8,
        return_results_size: *mut usize,
    ) -> u32;
}

// ---- memory the host writes into -------------------------------------------------------------

const ARENA_SIZE: usize = 16 * 1024;

/// Scratch memory for the buffers the host returns during one callback. Reset when the outermost
/// callback starts; anything that does not fit goes to the heap.
struct Arena {
    buf: UnsafeCell<[u8; ARENA_SIZE]>,
    used: Cell<usize>,
    depth: Cell<u32>,
}

// SAFETY: a wasm32 VM runs one thread; the arena is never touched concurrently.
unsafe impl Sync for Arena {}

static ARENA: Arena = Arena {
    buf: UnsafeCell::new([0; ARENA_SIZE]),
    used: Cell::new(0),
    depth: Cell::new(0),
};

impl Arena {
    fn base(&self) -> *mut u8 {
        self.buf.get().cast::<u8>()
    }

    fn contains(&self, ptr: *const u8) -> bool {
        let base = self.base() as usize;
        (base..base + ARENA_SIZE).contains(&(ptr as usize))
    }
}

/// Runs one callback: arena slices live until the outermost callback returns.
fn callback<R>(f: impl FnOnce() -> R) -> R {
    let depth = ARENA.depth.get();
    if depth == 0 {
        ARENA.used.set(0);
    }
    ARENA.depth.set(depth + 1);
    let r = f();
    ARENA.depth.set(depth);
    r
}

#[no_mangle]
pub extern "C" fn proxy_on_memory_allocate(size: usize) -> *mut u8 {
    let used = ARENA.used.get();
    let aligned = size.div_ceil(8) * 8;
    if ARENA.depth.get() > 0 && aligned <= ARENA_SIZE - used {
        ARENA.used.set(used + aligned);
        // SAFETY: `used + aligned <= ARENA_SIZE`, so the pointer stays inside the buffer.
        return unsafe { ARENA.base().add(used) };
    }
    match Layout::array::<u8>(size.max(1)) {
        // SAFETY: the layout has a non-zero size.
        Ok(layout) => unsafe { alloc(layout) },
        Err(_) => null_mut(),
    }
}

/// Bytes the host wrote into memory from `proxy_on_memory_allocate`.
pub struct HostBytes {
    ptr: *mut u8,
    len: usize,
}

impl Default for HostBytes {
    /// No bytes (what a failed read gives).
    fn default() -> HostBytes {
        HostBytes {
            ptr: null_mut(),
            len: 0,
        }
    }
}

impl HostBytes {
    fn take(status: u32, ptr: *mut u8, len: usize) -> Option<HostBytes> {
        (status == STATUS_OK).then_some(HostBytes { ptr, len })
    }
}

impl std::ops::Deref for HostBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        if self.ptr.is_null() || self.len == 0 {
            return &[];
        }
        // SAFETY: the host filled `len` bytes at `ptr`, which it got from
        // `proxy_on_memory_allocate` during this callback.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Drop for HostBytes {
    fn drop(&mut self) {
        if self.ptr.is_null() || ARENA.contains(self.ptr) {
            return;
        }
        if let Ok(layout) = Layout::array::<u8>(self.len.max(1)) {
            // SAFETY: heap pointers come from `alloc` with this layout (the host asks for
            // exactly the size it reports).
            unsafe { dealloc(self.ptr, layout) };
        }
    }
}

fn returned(call: impl FnOnce(*mut *mut u8, *mut usize) -> u32) -> Option<HostBytes> {
    let (mut data, mut size) = (null_mut(), 0);
    let status = call(&mut data, &mut size);
    HostBytes::take(status, data, size)
}

/// Runs `f` with a property path as the ABI wants it (segments joined by NUL): on the stack
/// when it fits (every path the filter sets does), so setting a property allocates nothing.
fn with_property_path<R>(path: &[&str], f: impl FnOnce(&[u8]) -> R) -> R {
    let mut buf = [0u8; 128];
    let len = path
        .iter()
        .map(|p| p.len() + 1)
        .sum::<usize>()
        .saturating_sub(1);
    match buf.get_mut(..len) {
        Some(out) => {
            let bytes = path.iter().enumerate().flat_map(|(i, p)| {
                let sep: &[u8] = if i == 0 { b"" } else { b"\0" };
                sep.iter().chain(p.as_bytes())
            });
            for (slot, b) in out.iter_mut().zip(bytes) {
                *slot = *b;
            }
            f(out)
        }
        None => f(path.join("\0").as_bytes()),
    }
}

// ---- the port ----------------------------------------------------------------------------------

/// Metric ids of one plugin, defined once. `None` where the host refused the definition.
struct Metrics([Option<u32>; Counter::ALL.len()]);

impl Metrics {
    fn define() -> Metrics {
        let mut ids = [None; Counter::ALL.len()];
        for (slot, counter) in ids.iter_mut().zip(Counter::ALL) {
            let name = counter.name();
            let mut id = 0;
            // SAFETY: pointers to a live local and a static string.
            let status =
                unsafe { proxy_define_metric(METRIC_COUNTER, name.as_ptr(), name.len(), &mut id) };
            *slot = (status == STATUS_OK).then_some(id);
        }
        Metrics(ids)
    }
}

/// The `Host` the engine sees: proxy-wasm calls on the current context.
struct HostCalls<'a> {
    metrics: &'a Metrics,
}

impl Host for HostCalls<'_> {
    type Bytes = HostBytes;

    fn request_header(&self, name: &str) -> Option<HostBytes> {
        // SAFETY: out-pointers to live locals; the name outlives the call.
        returned(|data, size| unsafe {
            proxy_get_header_map_value(MAP_REQUEST_HEADERS, name.as_ptr(), name.len(), data, size)
        })
    }

    fn request_headers(&self) -> HeaderBlock<HostBytes> {
        // SAFETY: out-pointers to live locals.
        let bytes = returned(|data, size| unsafe {
            proxy_get_header_map_pairs(MAP_REQUEST_HEADERS, data, size)
        });
        HeaderBlock::from_bytes(bytes.unwrap_or_default())
    }

    fn set_request_header(&self, name: &str, value: &[u8]) {
        // SAFETY: slices outlive the call.
        unsafe {
            proxy_replace_header_map_value(
                MAP_REQUEST_HEADERS,
                name.as_ptr(),
                name.len(),
                value.as_ptr(),
                value.len(),
            )
        };
    }

    fn remove_request_header(&self, name: &str) {
        // SAFETY: the slice outlives the call.
        unsafe { proxy_remove_header_map_value(MAP_REQUEST_HEADERS, name.as_ptr(), name.len()) };
    }

    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        with_property_path(path, |path| {
            // SAFETY: out-pointers to live locals; the path outlives the call.
            returned(|data, size| unsafe {
                proxy_get_property(path.as_ptr(), path.len(), data, size)
            })
            .map(|b| b.to_vec())
        })
    }

    fn set_property(&self, path: &[&str], value: &[u8]) -> bool {
        with_property_path(path, |path| {
            // SAFETY: slices outlive the call.
            let status = unsafe {
                proxy_set_property(path.as_ptr(), path.len(), value.as_ptr(), value.len())
            };
            status == STATUS_OK
        })
    }

    fn shared_get(&self, key: &str) -> (Option<Vec<u8>>, u32) {
        let mut cas = 0;
        // SAFETY: out-pointers to live locals; the key outlives the call.
        let value = returned(|data, size| unsafe {
            proxy_get_shared_data(key.as_ptr(), key.len(), data, size, &mut cas)
        });
        match value {
            Some(v) => (Some(v.to_vec()), cas),
            None => (None, 0),
        }
    }

    fn shared_set(&self, key: &str, value: &[u8], cas: u32) -> SetStatus {
        // SAFETY: slices outlive the call.
        let status = unsafe {
            proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas)
        };
        match status {
            STATUS_OK => SetStatus::Ok,
            STATUS_CAS_MISMATCH => SetStatus::CasMismatch,
            _ => SetStatus::Failed,
        }
    }

    fn now_ms(&self) -> u64 {
        let mut ns = 0u64;
        // SAFETY: pointer to a live local.
        unsafe { proxy_get_current_time_nanoseconds(&mut ns) };
        ns / 1_000_000
    }

    fn random(&self, buf: &mut [u8]) -> bool {
        getrandom::getrandom(buf).is_ok()
    }

    fn dispatch(&self, upstream: &str, headers: &[(&str, &str)], timeout_ms: u32) -> Option<u32> {
        let headers = HeaderBlock::serialize(headers);
        let headers = headers.as_bytes();
        let trailers = HeaderBlock::serialize::<&str>(&[]);
        let trailers = trailers.as_bytes();
        let mut token = 0;
        // SAFETY: slices and the out-pointer outlive the call.
        let status = unsafe {
            proxy_http_call(
                upstream.as_ptr(),
                upstream.len(),
                headers.as_ptr(),
                headers.len(),
                null_mut(),
                0,
                trailers.as_ptr(),
                trailers.len(),
                timeout_ms,
                &mut token,
            )
        };
        (status == STATUS_OK).then_some(token)
    }

    fn send_response(&self, status: u16, headers: &[(&str, &str)], body: &[u8]) {
        let headers = HeaderBlock::serialize(headers);
        let headers = headers.as_bytes();
        // Shown as %RESPONSE_CODE_DETAILS% in Envoy's access log.
        const DETAILS: &str = "matrix_sync_router_rejected_token";
        // SAFETY: slices outlive the call.
        unsafe {
            proxy_send_local_response(
                u32::from(status),
                DETAILS.as_ptr(),
                DETAILS.len(),
                body.as_ptr(),
                body.len(),
                headers.as_ptr(),
                headers.len(),
                -1,
            )
        };
    }

    fn enter(&self, context: ContextId) -> bool {
        // SAFETY: no pointers.
        unsafe { proxy_set_effective_context(context) == STATUS_OK }
    }

    fn resume(&self) {
        // SAFETY: no pointers.
        unsafe { proxy_continue_stream(STREAM_HTTP_REQUEST) };
    }

    fn set_tick_period(&self, ms: u32) {
        // SAFETY: no pointers.
        unsafe { proxy_set_tick_period_milliseconds(ms) };
    }

    fn call_foreign(&self, name: &str) -> bool {
        let (mut data, mut size) = (null_mut(), 0);
        // SAFETY: the name outlives the call; out-pointers to live locals.
        let status = unsafe {
            proxy_call_foreign_function(
                name.as_ptr(),
                name.len(),
                null_mut(),
                0,
                &mut data,
                &mut size,
            )
        };
        // Whatever the host returned is freed with it.
        drop(HostBytes::take(status, data, size));
        status == STATUS_OK
    }

    fn add_to_counter(&self, counter: Counter, delta: u64) {
        if let Some(Some(id)) = self.metrics.0.get(counter as usize) {
            // SAFETY: no pointers.
            unsafe { proxy_increment_metric(*id, i64::try_from(delta).unwrap_or(i64::MAX)) };
        }
    }

    fn log(&self, level: Level, message: &str) {
        log(level, message);
    }
}

fn log(level: Level, message: &str) {
    let message = format!("matrix-sync-router: {message}");
    // SAFETY: the message outlives the call.
    unsafe { proxy_log(level as u32, message.as_ptr(), message.len()) };
}

// ---- contexts ----------------------------------------------------------------------------------

/// One plugin (root context) of this VM.
struct Plugin {
    root: ContextId,
    metrics: Metrics,
    router: Option<Router>,
}

/// Which root each recent request context belongs to, needed only when a VM hosts several
/// plugins (Envoy shares one VM between filters with the same `vm_config`). Direct-mapped by
/// context id: the mapping is read in `on_request_headers`, right after the context is created.
const PARENTS: usize = 256;

struct Vm {
    plugins: RefCell<Vec<Plugin>>,
    parents: [Cell<(ContextId, ContextId)>; PARENTS],
}

/// The VM's state. A plain static rather than `thread_local!`: a wasm32 VM runs one thread,
/// and the thread-local machinery cost ~3 KB of module.
struct VmCell(Vm);

// SAFETY: a wasm32 VM runs one thread; the state is never touched concurrently.
unsafe impl Sync for VmCell {}

static VM: VmCell = VmCell(Vm {
    plugins: RefCell::new(Vec::new()),
    parents: [const { Cell::new((0, 0)) }; PARENTS],
});

impl Vm {
    /// The plugins, held for one callback. The host never re-enters a callback (Envoy defers
    /// a callout failure reported during `proxy_http_call` until the call returns), so they are
    /// always free; if they ever are not, the callback is logged and does nothing.
    fn plugins(&self) -> Option<std::cell::RefMut<'_, Vec<Plugin>>> {
        let plugins = self.plugins.try_borrow_mut().ok();
        if plugins.is_none() {
            log(
                Level::Error,
                "a callback re-entered the filter; it was ignored",
            );
        }
        plugins
    }

    /// Runs `f` with the plugin of `context` (a root, or a request created under one).
    fn with_plugin<R>(&self, context: ContextId, f: impl FnOnce(&mut Plugin) -> R) -> Option<R> {
        let mut plugins = self.plugins()?;
        let root = match plugins.as_slice() {
            [only] => only.root,
            many if many.iter().any(|p| p.root == context) => context,
            _ => {
                let (ctx, root) = self.parents.get(context as usize % PARENTS)?.get();
                if ctx != context {
                    return None;
                }
                root
            }
        };
        plugins.iter_mut().find(|p| p.root == root).map(f)
    }
}

fn with_router<R>(
    context: ContextId,
    f: impl FnOnce(&mut Router, &HostCalls<'_>) -> R,
) -> Option<R> {
    VM.0.with_plugin(context, |plugin| {
        let Plugin {
            metrics, router, ..
        } = plugin;
        Some(f(router.as_mut()?, &HostCalls { metrics }))
    })
    .flatten()
}

#[no_mangle]
pub extern "C" fn proxy_abi_version_0_2_1() {}

#[no_mangle]
pub extern "C" fn proxy_on_context_create(context: ContextId, parent: ContextId) {
    callback(|| {
        let vm = &VM.0;
        if parent == 0 {
            if let Some(mut plugins) = vm.plugins() {
                if !plugins.iter().any(|p| p.root == context) {
                    plugins.push(Plugin {
                        root: context,
                        metrics: Metrics::define(),
                        router: None,
                    });
                }
            }
        } else if let Some(slot) = vm.parents.get(context as usize % PARENTS) {
            slot.set((context, parent));
        }
    })
}

#[no_mangle]
pub extern "C" fn proxy_on_vm_start(_root: ContextId, _size: usize) -> u32 {
    1
}

#[no_mangle]
pub extern "C" fn proxy_on_configure(root: ContextId, size: usize) -> u32 {
    callback(|| {
        let bytes = if size == 0 {
            Vec::new()
        } else {
            // SAFETY: out-pointers to live locals.
            returned(|data, len| unsafe {
                proxy_get_buffer_bytes(BUFFER_PLUGIN_CONFIGURATION, 0, size, data, len)
            })
            .map(|b| b.to_vec())
            .unwrap_or_default()
        };
        {
            let vm = &VM.0;
            let Some(mut plugins) = vm.plugins() else {
                return 0;
            };
            let Some(plugin) = plugins.iter_mut().find(|p| p.root == root) else {
                log(
                    Level::Error,
                    "cannot start: configure on an unknown root context",
                );
                return 0;
            };
            let settings = match Config::parse(&bytes) {
                Ok(s) => s,
                Err(e) => {
                    log(Level::Error, &format!("invalid configuration: {e}"));
                    return 0;
                }
            };
            let host = HostCalls {
                metrics: &plugin.metrics,
            };
            let summary = settings.summary();
            match Router::new(settings, &host) {
                Ok(router) => {
                    log(
                        Level::Info,
                        &format!(
                            "configured: matrix-sync-router {}, {summary}",
                            env!("CARGO_PKG_VERSION")
                        ),
                    );
                    plugin.router = Some(router);
                    1
                }
                Err(e) => {
                    log(Level::Error, &format!("cannot start: {e}"));
                    0
                }
            }
        }
    })
}

#[no_mangle]
pub extern "C" fn proxy_on_tick(root: ContextId) {
    callback(|| with_router(root, |router, host| router.on_tick(host)));
}

#[no_mangle]
pub extern "C" fn proxy_on_request_headers(context: ContextId, _headers: usize, _eos: u32) -> u32 {
    callback(|| {
        let verdict = with_router(context, |router, host| {
            router.on_request_headers(host, context)
        });
        match verdict {
            Some(Verdict::Pause) => 1,
            _ => 0,
        }
    })
}

// ngx_wasm_module calls these for every request without checking that the module exports
// them (a missing one crashed nginx workers with signal 11: `ngx_wavm_instance_call_funcref`
// with a null funcref, seen on 3bed2783). They do nothing: the filter acts on request headers
// and callout answers only. Envoy calls them too, at a small cost per request (`just bench`).

#[no_mangle]
pub extern "C" fn proxy_on_request_body(_context: ContextId, _size: usize, _eos: u32) -> u32 {
    0
}

#[no_mangle]
pub extern "C" fn proxy_on_request_trailers(_context: ContextId, _trailers: usize) -> u32 {
    0
}

#[no_mangle]
pub extern "C" fn proxy_on_response_headers(
    _context: ContextId,
    _headers: usize,
    _eos: u32,
) -> u32 {
    0
}

#[no_mangle]
pub extern "C" fn proxy_on_response_body(_context: ContextId, _size: usize, _eos: u32) -> u32 {
    0
}

#[no_mangle]
pub extern "C" fn proxy_on_response_trailers(_context: ContextId, _trailers: usize) -> u32 {
    0
}

#[no_mangle]
pub extern "C" fn proxy_on_done(_context: ContextId) -> u32 {
    1
}

#[no_mangle]
pub extern "C" fn proxy_on_log(_context: ContextId) {}

#[no_mangle]
pub extern "C" fn proxy_on_delete(_context: ContextId) {}

#[no_mangle]
pub extern "C" fn proxy_on_http_call_response(
    context: ContextId,
    token: u32,
    _headers: usize,
    body_size: usize,
    _trailers: usize,
) {
    callback(|| {
        with_router(context, |router, host| {
            // A failed call has no `:status` (ngx_wasm_module gives `:dispatch_status` instead;
            // Envoy synthesizes 503/504). `num_headers` is not trusted: ngx_wasm_module may
            // count only header lines, so a bare `200` answer can come with 0 headers.
            let status = returned(|data, size| {
                let name = ":status";
                // SAFETY: out-pointers to live locals; the name is static.
                unsafe {
                    proxy_get_header_map_value(
                        MAP_CALL_RESPONSE_HEADERS,
                        name.as_ptr(),
                        name.len(),
                        data,
                        size,
                    )
                }
            });
            let body = if body_size > MAX_BODY {
                None
            } else if body_size == 0 {
                Some(Vec::new())
            } else {
                // SAFETY: out-pointers to live locals.
                returned(|data, size| unsafe {
                    proxy_get_buffer_bytes(BUFFER_CALL_RESPONSE_BODY, 0, body_size, data, size)
                })
                .map(|b| b.to_vec())
            };
            router.on_whoami_response(host, token, status.as_deref(), body.as_deref());
        });
    })
}

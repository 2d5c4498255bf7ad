//! The proxy-wasm adapter: the only module that touches `proxy_wasm`.
//!
//! The SDK's `hostcalls` wrappers panic on any host status they do not expect and `unwrap` UTF-8
//! conversions of header values, and a panic traps the VM. So every host call here goes through
//! the raw ABI import and maps every status to "absent" or "failed". The SDK is used for context
//! dispatch and `dispatch_http_call` (which registers the callout so the answer reaches the
//! right context; it returns, not panics, on the statuses Envoy and ngx_wasm_module use).

use crate::config::Config;
use crate::filter::{Counter, Host, Phase, Router, SetStatus, Verdict};
use crate::request::HeaderBlock;
use crate::whoami::MAX_BODY;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, MapType, MetricType, StreamType};
use std::ptr::null_mut;
use std::rc::Rc;
use std::time::Duration;

const STATUS_OK: u32 = 0;
const STATUS_CAS_MISMATCH: u32 = 8;

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_log(level: u32, message_data: *const u8, message_size: usize) -> u32;
    fn proxy_get_current_time_nanoseconds(return_time: *mut u64) -> u32;
    fn proxy_get_buffer_bytes(
        buffer_type: BufferType,
        start: usize,
        max_size: usize,
        return_buffer_data: *mut *mut u8,
        return_buffer_size: *mut usize,
    ) -> u32;
    fn proxy_get_header_map_pairs(
        map_type: MapType,
        return_map_data: *mut *mut u8,
        return_map_size: *mut usize,
    ) -> u32;
    fn proxy_get_header_map_value(
        map_type: MapType,
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_replace_header_map_value(
        map_type: MapType,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_remove_header_map_value(
        map_type: MapType,
        key_data: *const u8,
        key_size: usize,
    ) -> u32;
    fn proxy_get_property(
        path_data: *const u8,
        path_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
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
    fn proxy_continue_stream(stream_type: StreamType) -> u32;
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
    fn proxy_define_metric(
        metric_type: MetricType,
        name_data: *const u8,
        name_size: usize,
        return_id: *mut u32,
    ) -> u32;
    fn proxy_increment_metric(metric_id: u32, offset: i64) -> u32;
}

/// Takes ownership of a buffer the host allocated through the SDK's `proxy_on_memory_allocate`.
fn owned(status: u32, data: *mut u8, size: usize) -> Option<Vec<u8>> {
    if status != STATUS_OK {
        return None;
    }
    if data.is_null() {
        return Some(Vec::new());
    }
    // SAFETY: the host filled `size` bytes of a buffer it got from `proxy_on_memory_allocate`,
    // which allocates exactly `size` bytes with the global allocator.
    Some(unsafe { Vec::from_raw_parts(data, size, size) })
}

fn map_value(map: MapType, key: &str) -> Option<Vec<u8>> {
    let (mut data, mut size) = (null_mut(), 0);
    // SAFETY: pointers to live locals; the key slice outlives the call.
    let status =
        unsafe { proxy_get_header_map_value(map, key.as_ptr(), key.len(), &mut data, &mut size) };
    owned(status, data, size)
}

fn buffer(kind: BufferType, size: usize) -> Option<Vec<u8>> {
    let (mut data, mut len) = (null_mut(), 0);
    // SAFETY: pointers to live locals.
    let status = unsafe { proxy_get_buffer_bytes(kind, 0, size, &mut data, &mut len) };
    owned(status, data, len)
}

/// Metric ids, defined once per VM. `None` where the host refused the definition.
#[derive(Default)]
struct Metrics([Option<u32>; Counter::ALL.len()]);

impl Metrics {
    fn define() -> Metrics {
        let mut m = Metrics::default();
        for (slot, counter) in m.0.iter_mut().zip(Counter::ALL) {
            let name = counter.name();
            let mut id = 0;
            // SAFETY: pointers to a live local and a static string.
            let status = unsafe {
                proxy_define_metric(MetricType::Counter, name.as_ptr(), name.len(), &mut id)
            };
            *slot = (status == STATUS_OK).then_some(id);
        }
        m
    }
}

/// The `Host` the core sees: proxy-wasm calls on the current context.
struct HostCalls<'a> {
    metrics: &'a Metrics,
}

impl Host for HostCalls<'_> {
    fn request_headers(&self) -> HeaderBlock {
        let (mut data, mut size) = (null_mut(), 0);
        // SAFETY: pointers to live locals.
        let status = unsafe {
            proxy_get_header_map_pairs(MapType::HttpRequestHeaders, &mut data, &mut size)
        };
        HeaderBlock::from_bytes(owned(status, data, size).unwrap_or_default())
    }

    fn set_request_header(&self, name: &str, value: &[u8]) {
        // SAFETY: slices outlive the call.
        unsafe {
            proxy_replace_header_map_value(
                MapType::HttpRequestHeaders,
                name.as_ptr(),
                name.len(),
                value.as_ptr(),
                value.len(),
            )
        };
    }

    fn remove_request_header(&self, name: &str) {
        // SAFETY: the slice outlives the call.
        unsafe {
            proxy_remove_header_map_value(MapType::HttpRequestHeaders, name.as_ptr(), name.len())
        };
    }

    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        let serialized = path.join("\0");
        let (mut data, mut size) = (null_mut(), 0);
        // SAFETY: pointers to live locals; the path outlives the call.
        let status = unsafe {
            proxy_get_property(serialized.as_ptr(), serialized.len(), &mut data, &mut size)
        };
        owned(status, data, size)
    }

    fn shared_get(&self, key: &str) -> (Option<Vec<u8>>, u32) {
        let (mut data, mut size, mut cas) = (null_mut(), 0, 0);
        // SAFETY: pointers to live locals; the key outlives the call.
        let status = unsafe {
            proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut size, &mut cas)
        };
        match owned(status, data, size) {
            Some(v) => (Some(v), cas),
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

    fn dispatch(&self, upstream: &str, headers: &[(&str, &str)], timeout_ms: u32) -> bool {
        proxy_wasm::hostcalls::dispatch_http_call(
            upstream,
            headers.to_vec(),
            None,
            Vec::new(),
            Duration::from_millis(u64::from(timeout_ms)),
        )
        .is_ok()
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

    fn resume(&self) {
        // SAFETY: no pointers.
        unsafe { proxy_continue_stream(StreamType::HttpRequest) };
    }

    fn count(&self, counter: Counter) {
        if let Some(Some(id)) = self.metrics.0.get(counter as usize) {
            // SAFETY: no pointers.
            unsafe { proxy_increment_metric(*id, 1) };
        }
    }
}

/// `log` output goes to the host's log; a failing log call is ignored.
struct HostLogger;

impl log::Log for HostLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        // proxy-wasm log levels: trace 0, debug 1, info 2, warn 3, error 4 (critical 5).
        let level: u32 = match record.level() {
            log::Level::Trace => 0,
            log::Level::Debug => 1,
            log::Level::Info => 2,
            log::Level::Warn => 3,
            log::Level::Error => 4,
        };
        let message = format!("matrix-sync-router: {}", record.args());
        // SAFETY: the message outlives the call.
        unsafe { proxy_log(level, message.as_ptr(), message.len()) };
    }

    fn flush(&self) {}
}

static LOGGER: HostLogger = HostLogger;

proxy_wasm::main! {{
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(log::LevelFilter::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

#[derive(Default)]
struct Root {
    router: Option<Rc<Router>>,
    metrics: Option<Rc<Metrics>>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, size: usize) -> bool {
        let bytes = if size == 0 {
            Vec::new()
        } else {
            buffer(BufferType::PluginConfiguration, size).unwrap_or_default()
        };
        let metrics = self
            .metrics
            .get_or_insert_with(|| Rc::new(Metrics::define()));
        let settings = match Config::parse(&bytes) {
            Ok(s) => s,
            Err(e) => {
                log::error!("invalid configuration: {e}");
                return false;
            }
        };
        match Router::new(settings, &HostCalls { metrics }) {
            Ok(router) => {
                log::info!(
                    "configured: header `{}`, whoami via `{}`",
                    router.settings.config.header_name,
                    router.settings.config.whoami_upstream
                );
                self.router = Some(Rc::new(router));
                true
            }
            Err(e) => {
                log::error!("cannot start: {e}");
                false
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http {
            router: self.router.clone(),
            metrics: self.metrics.clone().unwrap_or_default(),
            phase: Phase::Idle,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Http {
    router: Option<Rc<Router>>,
    metrics: Rc<Metrics>,
    phase: Phase,
}

impl Context for Http {
    fn on_http_call_response(
        &mut self,
        _token_id: u32,
        _num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        let Some(router) = &self.router else {
            return;
        };
        // A failed call has no `:status` (ngx_wasm_module gives `:dispatch_status` instead; Envoy
        // synthesizes 503/504). `num_headers` is not trusted: ngx_wasm_module may count only
        // header lines, so a bare `200` answer can come with `num_headers == 0`.
        let status = map_value(MapType::HttpCallResponseHeaders, ":status");
        let body = if body_size > MAX_BODY {
            None
        } else if body_size == 0 {
            Some(Vec::new())
        } else {
            buffer(BufferType::HttpCallResponseBody, body_size)
        };
        let host = HostCalls {
            metrics: &self.metrics,
        };
        router.on_whoami_response(&host, &mut self.phase, status.as_deref(), body.as_deref());
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let Some(router) = &self.router else {
            return Action::Continue;
        };
        let host = HostCalls {
            metrics: &self.metrics,
        };
        match router.on_request_headers(&host, &mut self.phase) {
            Verdict::Continue => Action::Continue,
            Verdict::Pause => Action::Pause,
        }
    }
}

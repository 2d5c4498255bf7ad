//! One VM (an Envoy worker thread or an nginx worker) running the filter, and the HTTP streams and
//! callouts the test drives through it.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use wasmtime::{
    Instance, Linker, Store, StoreLimits, StoreLimitsBuilder, TypedFunc, WasmParams, WasmResults,
};

use crate::headers::{HeaderMap, NameCase};
use crate::host::{Filter, Host, Process};
use crate::profile::HostKind;
use crate::util::text;
use crate::wasi::{ProcExit, WasiView};
use crate::{abi, Action, HarnessError};

/// The guest callbacks the host invokes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Callback {
    /// `_initialize` / `_start`.
    Initialize,
    /// `proxy_on_context_create`.
    ContextCreate,
    /// `proxy_on_vm_start`.
    VmStart,
    /// `proxy_on_configure`.
    Configure,
    /// `proxy_on_tick`.
    Tick,
    /// `proxy_on_request_headers`.
    RequestHeaders,
    /// `proxy_on_request_body`.
    RequestBody,
    /// `proxy_on_response_headers`.
    ResponseHeaders,
    /// `proxy_on_response_body`.
    ResponseBody,
    /// `proxy_on_http_call_response`.
    HttpCallResponse,
    /// `proxy_on_done`.
    Done,
    /// `proxy_on_log`.
    Log,
    /// `proxy_on_delete`.
    Delete,
}

impl Callback {
    fn export(self) -> &'static str {
        match self {
            Callback::Initialize => "_initialize",
            Callback::ContextCreate => "proxy_on_context_create",
            Callback::VmStart => "proxy_on_vm_start",
            Callback::Configure => "proxy_on_configure",
            Callback::Tick => "proxy_on_tick",
            Callback::RequestHeaders => "proxy_on_request_headers",
            Callback::RequestBody => "proxy_on_request_body",
            Callback::ResponseHeaders => "proxy_on_response_headers",
            Callback::ResponseBody => "proxy_on_response_body",
            Callback::HttpCallResponse => "proxy_on_http_call_response",
            Callback::Done => "proxy_on_done",
            Callback::Log => "proxy_on_log",
            Callback::Delete => "proxy_on_delete",
        }
    }
}

/// A local response the filter sent with `send_http_response`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalResponse {
    /// HTTP status.
    pub status: u32,
    /// Status details (Envoy's response-code details).
    pub details: String,
    /// Headers, in order.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
    /// gRPC status (-1: none).
    pub grpc_status: i32,
}

/// What the host knows about one HTTP stream.
#[derive(Clone, Debug)]
pub struct StreamState {
    /// Context id.
    pub id: u32,
    /// Request headers as the filter left them (what the proxy would route and hash on).
    pub request_headers: HeaderMap,
    /// Request body so far.
    pub request_body: Vec<u8>,
    /// Response headers as the filter left them.
    pub response_headers: HeaderMap,
    /// Response body so far.
    pub response_body: Vec<u8>,
    /// Each callback with the action it returned, in order.
    pub actions: Vec<(Callback, Action)>,
    /// The request is currently held (a callback returned Pause and nothing resumed it yet).
    pub paused: bool,
    /// How many times the filter resumed the request.
    pub resumes: u32,
    /// The local response the filter sent, if any.
    pub local_response: Option<LocalResponse>,
    /// Per-stream properties (e.g. `source.address`), overriding the host's.
    pub properties: BTreeMap<String, Vec<u8>>,
    /// `on_done`/`on_log`/`on_delete` ran.
    pub ended: bool,
    pub(crate) has_request: bool,
    pub(crate) has_response: bool,
}

impl StreamState {
    /// The action returned by the latest callback.
    pub fn last_action(&self) -> Option<Action> {
        self.actions.last().map(|(_, action)| *action)
    }

    /// The request was paused and then resumed, and is not paused now.
    pub fn resumed(&self) -> bool {
        self.resumes > 0 && !self.paused
    }

    /// The request would reach the upstream now: not held, no local response.
    pub fn forwarded(&self) -> bool {
        !self.paused && self.local_response.is_none()
    }

    /// First request header value by name (case-insensitive), as lossy text.
    pub fn header(&self, name: &str) -> Option<String> {
        self.request_headers.get_str(name)
    }

    /// This stream's value of a property path (joined with dots, e.g. `ngx.msr_room`): given by
    /// the test or set by the filter.
    pub fn property(&self, path: &str) -> Option<&[u8]> {
        self.properties.get(path).map(Vec::as_slice)
    }
}

/// How a callout can fail; each profile delivers it in its own form.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallFailure {
    /// Connection refused / reset before any response. Envoy: a synthesized 503 "upstream
    /// connect error or disconnect/reset before headers. reset reason: connection failure";
    /// ngx_wasm_module: no headers and `:dispatch_status: broken connection`.
    Connect,
    /// The callout's timeout elapsed. Envoy: a synthesized 504 "upstream request timeout";
    /// ngx_wasm_module: no headers and `:dispatch_status: timeout`.
    Timeout,
    /// The stream was reset before headers. Envoy: delivered with 0 headers and no body;
    /// ngx_wasm_module: `:dispatch_status: broken connection`.
    Reset,
    /// The upstream name did not resolve. Envoy (no healthy host): 503 "no healthy upstream";
    /// ngx_wasm_module: `:dispatch_status: resolver failure`.
    Resolver,
}

/// What became of a callout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallOutcome {
    /// Not answered yet.
    Pending,
    /// Answered by the test with this status.
    Answered(u16),
    /// Failed by the test.
    Failed(CallFailure),
    /// Dropped because its stream ended first (the host cancels it; no callback).
    Canceled,
}

/// One `dispatch_http_call` the filter made.
#[derive(Clone, Debug)]
pub struct CallRecord {
    /// Token returned to the guest.
    pub token: u32,
    /// Context that dispatched it.
    pub context: u32,
    /// Context the host attached it to, which gets the response: Envoy's root context, or the
    /// ngx request that made it (a call ends with the request it is attached to).
    pub owner: u32,
    /// Upstream (Envoy cluster, or ngx `host:port`).
    pub upstream: String,
    /// Headers in the order the filter gave them (names lower-cased by Envoy).
    pub headers: Vec<(String, String)>,
    /// Request body.
    pub body: Vec<u8>,
    /// Trailers.
    pub trailers: Vec<(String, String)>,
    /// Timeout in milliseconds.
    pub timeout_ms: u32,
    /// Host clock when dispatched (ns since the epoch).
    pub dispatched_at_ns: u64,
    /// What became of it.
    pub outcome: CallOutcome,
}

impl CallRecord {
    /// First header value by name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    /// Every header value by name (case-insensitive).
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
            .collect()
    }
}

pub(crate) struct CallResponse {
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

/// Store data of one VM.
pub(crate) struct VmData {
    pub process: Rc<RefCell<Process>>,
    pub index: usize,
    pub kind: HostKind,
    pub alloc: Option<TypedFunc<u32, u32>>,
    pub limits: StoreLimits,
    pub root_id: u32,
    pub effective: u32,
    pub running: Option<Callback>,
    pub streams: BTreeMap<u32, StreamState>,
    pub pending: BTreeMap<u32, CallRecord>,
    pub calls: Vec<CallRecord>,
    pub next_token: u32,
    pub call_response: Option<CallResponse>,
    pub vm_config: Vec<u8>,
    pub plugin_config: Vec<u8>,
    pub tick_period_ms: u32,
    /// Host clock (ns) of the last tick delivered.
    pub last_tick_ns: u64,
    pub anomalies: Vec<String>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub root_properties: BTreeMap<String, Vec<u8>>,
    pub foreign_calls: Vec<String>,
    pub done_calls: u32,
}

impl VmData {
    pub fn anomaly(&mut self, message: String) {
        self.anomalies.push(message);
    }

    pub fn name_case(&self) -> NameCase {
        match self.kind {
            HostKind::Envoy => NameCase::Lower,
            HostKind::Ngx => NameCase::Preserve,
        }
    }
}

impl WasiView for VmData {
    fn args(&self) -> Vec<Vec<u8>> {
        Vec::new()
    }

    fn env(&self) -> Vec<Vec<u8>> {
        Vec::new()
    }

    fn clock_ns(&mut self, id: u32) -> Option<u64> {
        match id {
            0..=3 => Some(self.process.borrow().now_ns),
            _ => None,
        }
    }

    fn sleep_ns(&mut self, ns: u64) {
        let mut process = self.process.borrow_mut();
        process.now_ns = process.now_ns.saturating_add(ns);
    }

    fn random(&mut self, buf: &mut [u8]) {
        self.process.borrow_mut().rng.fill(buf);
    }

    fn output(&mut self, fd: u32, data: &[u8]) {
        if fd == 1 {
            self.stdout.extend_from_slice(data);
        } else {
            self.stderr.extend_from_slice(data);
        }
    }
}

/// Default fuel per guest call: far above what a filter callback needs, low enough that an
/// endless loop fails within a second or so.
const DEFAULT_FUEL: u64 = 2_000_000_000;

/// One VM running the filter. Every guest entry returns a `Result`; after a trap the VM takes no
/// more calls ([`HarnessError::VmFailed`]).
pub struct Vm {
    host: Host,
    store: Store<VmData>,
    instance: Instance,
    failed: Option<String>,
    fuel: u64,
    fuel_spent: u64,
    next_context: u32,
}

impl Vm {
    pub(crate) fn new(host: Host, filter: &Filter) -> Result<Vm, HarnessError> {
        let engine = filter.module.engine().clone();
        let (index, kind) = {
            let mut process = host.process.borrow_mut();
            process.next_vm += 1;
            (process.next_vm - 1, process.profile.kind)
        };
        let data = VmData {
            process: host.process.clone(),
            index,
            kind,
            alloc: None,
            limits: StoreLimitsBuilder::new()
                .memory_size(512 << 20)
                .instances(4)
                .build(),
            root_id: 1,
            effective: 1,
            running: None,
            streams: BTreeMap::new(),
            pending: BTreeMap::new(),
            calls: Vec::new(),
            next_token: match kind {
                HostKind::Envoy => 1,
                HostKind::Ngx => 0,
            },
            call_response: None,
            vm_config: Vec::new(),
            plugin_config: Vec::new(),
            tick_period_ms: 0,
            last_tick_ns: 0,
            anomalies: Vec::new(),
            stdout: Vec::new(),
            stderr: Vec::new(),
            root_properties: BTreeMap::new(),
            foreign_calls: Vec::new(),
            done_calls: 0,
        };
        let mut store = Store::new(&engine, data);
        store.limiter(|data| &mut data.limits);
        let mut linker: Linker<VmData> = Linker::new(&engine);
        crate::wasi::add_to_linker(&mut linker)
            .and_then(|()| abi::add_to_linker(&mut linker))
            .map_err(|error| HarnessError::Load(format!("cannot build the host: {error}")))?;

        let missing: Vec<String> = filter
            .module
            .imports()
            .filter(|import| linker.get_by_import(&mut store, import).is_none())
            .map(|import| format!("{}.{}", import.module(), import.name()))
            .collect();
        if !missing.is_empty() {
            return Err(HarnessError::Load(format!(
                "{} imports {} that the harness does not provide",
                filter.label,
                missing.join(", ")
            )));
        }
        let exports = filter.exports();
        if !exports
            .iter()
            .any(|name| name == "proxy_abi_version_0_2_1" || name == "proxy_abi_version_0_2_0")
        {
            return Err(HarnessError::Load(format!(
                "{} exports no proxy_abi_version_0_2_1 (not a proxy-wasm 0.2.x filter)",
                filter.label
            )));
        }
        store
            .set_fuel(DEFAULT_FUEL)
            .map_err(|error| HarnessError::Load(format!("cannot set fuel: {error}")))?;
        let instance = linker
            .instantiate(&mut store, &filter.module)
            .map_err(|error| HarnessError::Load(format!("cannot instantiate: {error:#}")))?;
        let alloc = ["proxy_on_memory_allocate", "malloc"]
            .iter()
            .find_map(|name| instance.get_typed_func::<u32, u32>(&mut store, name).ok())
            .ok_or_else(|| {
                HarnessError::Load(format!(
                    "{} exports no proxy_on_memory_allocate(i32) -> i32",
                    filter.label
                ))
            })?;
        store.data_mut().alloc = Some(alloc);
        let mut vm = Vm {
            host,
            store,
            instance,
            failed: None,
            fuel: DEFAULT_FUEL,
            fuel_spent: 0,
            next_context: 2,
        };
        for init in ["_initialize", "_start"] {
            if vm.instance.get_func(&mut vm.store, init).is_some() {
                vm.invoke_export::<(), ()>(Callback::Initialize, init, 1, ())?;
            }
        }
        let root = vm.store.data().root_id;
        vm.invoke::<(u32, u32), ()>(Callback::ContextCreate, root, (root, 0))?;
        Ok(vm)
    }

    /// Index of this VM in its host (0, 1, ...).
    pub fn index(&self) -> usize {
        self.store.data().index
    }

    /// The host this VM belongs to.
    pub fn host(&self) -> &Host {
        &self.host
    }

    /// Root context id.
    pub fn root_id(&self) -> u32 {
        self.store.data().root_id
    }

    /// Fuel (roughly, wasm instructions) each guest call may burn before it traps.
    pub fn set_fuel_per_call(&mut self, fuel: u64) {
        self.fuel = fuel;
    }

    /// Fuel all guest calls of this VM have burnt so far: a deterministic measure of the work
    /// the filter did (about one unit per wasm instruction), for cost bounds that a loaded
    /// machine cannot make flaky.
    pub fn fuel_spent(&self) -> u64 {
        self.fuel_spent
    }

    /// Why the VM failed, if it did.
    pub fn failure(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    fn invoke<P, R>(
        &mut self,
        callback: Callback,
        context: u32,
        params: P,
    ) -> Result<R, HarnessError>
    where
        P: WasmParams,
        R: WasmResults + Default,
    {
        self.invoke_export(callback, callback.export(), context, params)
    }

    fn invoke_export<P, R>(
        &mut self,
        callback: Callback,
        export: &str,
        context: u32,
        params: P,
    ) -> Result<R, HarnessError>
    where
        P: WasmParams,
        R: WasmResults + Default,
    {
        let vm = self.index();
        if let Some(cause) = &self.failed {
            return Err(HarnessError::VmFailed {
                vm,
                cause: cause.clone(),
            });
        }
        if self.instance.get_func(&mut self.store, export).is_none() {
            // A host skips callbacks the module does not export.
            return Ok(R::default());
        }
        let func = self
            .instance
            .get_typed_func::<P, R>(&mut self.store, export)
            .map_err(|error| HarnessError::Load(format!("export {export}: {error}")))?;
        self.store
            .set_fuel(self.fuel)
            .map_err(|error| HarnessError::Usage(format!("cannot set fuel: {error}")))?;
        let stderr_before = self.store.data().stderr.len();
        {
            let data = self.store.data_mut();
            data.running = Some(callback);
            data.effective = context;
        }
        let result = func.call(&mut self.store, params);
        let left = self.store.get_fuel().unwrap_or(0);
        self.fuel_spent = self
            .fuel_spent
            .saturating_add(self.fuel.saturating_sub(left));
        {
            let data = self.store.data_mut();
            data.running = None;
            data.effective = data.root_id;
        }
        match result {
            Ok(value) => Ok(value),
            Err(error) => {
                let mut message = match error.downcast_ref::<ProcExit>() {
                    Some(exit) => exit.to_string(),
                    None => format!("{error:?}"),
                };
                let stderr = &self.store.data().stderr[stderr_before..];
                if !stderr.is_empty() {
                    message.push_str("\nguest stderr: ");
                    message.push_str(text(stderr).trim_end());
                }
                self.failed = Some(format!("{export}: {message}"));
                Err(HarnessError::Trap {
                    vm,
                    callback: export.to_string(),
                    message,
                })
            }
        }
    }

    /// `proxy_on_vm_start` with `vm_config`; the filter's answer.
    pub fn start(&mut self, vm_config: &[u8]) -> Result<bool, HarnessError> {
        self.store.data_mut().vm_config = vm_config.to_vec();
        let root = self.root_id();
        let ok: u32 = self.invoke(Callback::VmStart, root, (root, vm_config.len() as u32))?;
        Ok(ok != 0)
    }

    /// `proxy_on_configure` with `plugin_config`; the filter's answer.
    pub fn configure(&mut self, plugin_config: &[u8]) -> Result<bool, HarnessError> {
        self.store.data_mut().plugin_config = plugin_config.to_vec();
        let root = self.root_id();
        let ok: u32 = self.invoke(
            Callback::Configure,
            root,
            (root, plugin_config.len() as u32),
        )?;
        Ok(ok != 0)
    }

    fn logs_since(&self, from: usize) -> Vec<String> {
        self.host.process.borrow().logs[from..]
            .iter()
            .map(|line| format!("{:?}: {}", line.level, line.message))
            .collect()
    }

    pub(crate) fn start_checked(&mut self, vm_config: &[u8]) -> Result<(), HarnessError> {
        let from = self.host.process.borrow().logs.len();
        if self.start(vm_config)? {
            Ok(())
        } else {
            Err(HarnessError::Rejected {
                vm: self.index(),
                callback: "proxy_on_vm_start".into(),
                logs: self.logs_since(from),
            })
        }
    }

    pub(crate) fn configure_checked(&mut self, config: &[u8]) -> Result<(), HarnessError> {
        let from = self.host.process.borrow().logs.len();
        if self.configure(config)? {
            Ok(())
        } else {
            Err(HarnessError::Rejected {
                vm: self.index(),
                callback: "proxy_on_configure".into(),
                logs: self.logs_since(from),
            })
        }
    }

    /// `proxy_on_tick` on the root context.
    pub fn tick(&mut self) -> Result<(), HarnessError> {
        let root = self.root_id();
        let now = self.host.process.borrow().now_ns;
        self.store.data_mut().last_tick_ns = now;
        self.invoke(Callback::Tick, root, root)
    }

    /// Delivers the tick a real host's timer would have fired by now (one, however late), before
    /// the next event: the filter's clock and counters follow the fake clock as they follow the
    /// real one.
    fn due_tick(&mut self) -> Result<(), HarnessError> {
        let period_ns = u64::from(self.store.data().tick_period_ms) * 1_000_000;
        let now = self.host.process.borrow().now_ns;
        if period_ns > 0 && now >= self.store.data().last_tick_ns.saturating_add(period_ns) {
            self.tick()?;
        }
        Ok(())
    }

    /// The tick period the filter asked for (0: none).
    pub fn tick_period_ms(&self) -> u32 {
        self.store.data().tick_period_ms
    }

    /// A new HTTP context (`proxy_on_context_create`).
    pub fn create_stream(&mut self) -> Result<u32, HarnessError> {
        let id = self.next_context;
        self.next_context += 1;
        let case = self.store.data().name_case();
        self.store.data_mut().streams.insert(
            id,
            StreamState {
                id,
                request_headers: HeaderMap::new(case),
                request_body: Vec::new(),
                response_headers: HeaderMap::new(case),
                response_body: Vec::new(),
                actions: Vec::new(),
                paused: false,
                resumes: 0,
                local_response: None,
                properties: BTreeMap::new(),
                ended: false,
                has_request: false,
                has_response: false,
            },
        );
        let root = self.root_id();
        self.invoke::<(u32, u32), ()>(Callback::ContextCreate, id, (id, root))?;
        Ok(id)
    }

    fn stream_mut(&mut self, id: u32) -> Result<&mut StreamState, HarnessError> {
        match self.store.data_mut().streams.get_mut(&id) {
            Some(stream) if !stream.ended => Ok(stream),
            Some(_) => Err(HarnessError::Usage(format!("stream {id} has ended"))),
            None => Err(HarnessError::Usage(format!("no stream {id}"))),
        }
    }

    /// The host's view of a stream.
    pub fn stream(&self, id: u32) -> Result<&StreamState, HarnessError> {
        self.store
            .data()
            .streams
            .get(&id)
            .ok_or_else(|| HarnessError::Usage(format!("no stream {id}")))
    }

    /// Sets a property of one stream (e.g. `source.address` of its connection).
    pub fn set_stream_property(
        &mut self,
        id: u32,
        path: &str,
        value: &[u8],
    ) -> Result<(), HarnessError> {
        self.stream_mut(id)?
            .properties
            .insert(path.into(), value.to_vec());
        Ok(())
    }

    /// Runs a stream callback taking (context, count or size, end_of_stream) and records its
    /// action.
    fn stream_callback(
        &mut self,
        id: u32,
        callback: Callback,
        size: u32,
        end_of_stream: bool,
    ) -> Result<Action, HarnessError> {
        self.due_tick()?;
        let raw: u32 = self.invoke(callback, id, (id, size, u32::from(end_of_stream)))?;
        let action = Action::from_raw(raw);
        let stream = self.stream_mut(id)?;
        stream.actions.push((callback, action));
        if action == Action::Pause && stream.local_response.is_none() {
            stream.paused = true;
        }
        Ok(action)
    }

    /// `proxy_on_request_headers` with these headers (text).
    pub fn request_headers(
        &mut self,
        id: u32,
        headers: &[(&str, &str)],
        end_of_stream: bool,
    ) -> Result<Action, HarnessError> {
        let pairs: Vec<(Vec<u8>, Vec<u8>)> = headers
            .iter()
            .map(|(name, value)| (name.as_bytes().to_vec(), value.as_bytes().to_vec()))
            .collect();
        self.request_headers_bytes(id, &pairs, end_of_stream)
    }

    /// `proxy_on_request_headers` with binary-safe headers (values a client can send that are
    /// not UTF-8).
    pub fn request_headers_bytes(
        &mut self,
        id: u32,
        headers: &[(Vec<u8>, Vec<u8>)],
        end_of_stream: bool,
    ) -> Result<Action, HarnessError> {
        let stream = self.stream_mut(id)?;
        stream.request_headers.set_all(headers.to_vec());
        stream.has_request = true;
        let count = stream.request_headers.len() as u32;
        self.stream_callback(id, Callback::RequestHeaders, count, end_of_stream)
    }

    /// `proxy_on_request_body` with one chunk.
    pub fn request_body(
        &mut self,
        id: u32,
        chunk: &[u8],
        end_of_stream: bool,
    ) -> Result<Action, HarnessError> {
        let stream = self.stream_mut(id)?;
        stream.request_body.extend_from_slice(chunk);
        let size = stream.request_body.len() as u32;
        self.stream_callback(id, Callback::RequestBody, size, end_of_stream)
    }

    /// `proxy_on_response_headers` with these headers.
    pub fn response_headers(
        &mut self,
        id: u32,
        headers: &[(&str, &str)],
        end_of_stream: bool,
    ) -> Result<Action, HarnessError> {
        let stream = self.stream_mut(id)?;
        let case = stream.response_headers.case();
        stream.response_headers = HeaderMap::from_pairs(case, headers);
        stream.has_response = true;
        let count = stream.response_headers.len() as u32;
        self.stream_callback(id, Callback::ResponseHeaders, count, end_of_stream)
    }

    /// `proxy_on_response_body` with one chunk.
    pub fn response_body(
        &mut self,
        id: u32,
        chunk: &[u8],
        end_of_stream: bool,
    ) -> Result<Action, HarnessError> {
        let stream = self.stream_mut(id)?;
        stream.response_body.extend_from_slice(chunk);
        let size = stream.response_body.len() as u32;
        self.stream_callback(id, Callback::ResponseBody, size, end_of_stream)
    }

    /// A new stream whose request headers (end of stream) are handed to the filter; its id.
    pub fn request(&mut self, headers: &[(&str, &str)]) -> Result<u32, HarnessError> {
        let id = self.create_stream()?;
        self.request_headers(id, headers, true)?;
        Ok(id)
    }

    /// Ends a stream as the host does: `proxy_on_done`, `proxy_on_log`, `proxy_on_delete`.
    /// Callouts it still waits for are canceled (no callback will come), as both hosts do.
    pub fn end_stream(&mut self, id: u32) -> Result<(), HarnessError> {
        self.stream_mut(id)?;
        let _done: u32 = self.invoke(Callback::Done, id, id)?;
        self.invoke::<u32, ()>(Callback::Log, id, id)?;
        self.invoke::<u32, ()>(Callback::Delete, id, id)?;
        let data = self.store.data_mut();
        if let Some(stream) = data.streams.get_mut(&id) {
            stream.ended = true;
        }
        let canceled: Vec<u32> = data
            .pending
            .values()
            .filter(|call| call.owner == id)
            .map(|call| call.token)
            .collect();
        for token in canceled {
            data.pending.remove(&token);
            set_outcome(data, token, CallOutcome::Canceled);
        }
        Ok(())
    }

    /// Forgets ended streams (keeps memory flat in long runs).
    pub fn forget_ended_streams(&mut self) {
        self.store
            .data_mut()
            .streams
            .retain(|_, stream| !stream.ended);
    }

    /// Callouts waiting for an answer, oldest first.
    pub fn pending_calls(&self) -> Vec<CallRecord> {
        self.store.data().pending.values().cloned().collect()
    }

    /// Every callout this VM's filter made, oldest first.
    pub fn calls(&self) -> &[CallRecord] {
        &self.store.data().calls
    }

    /// Forgets the callout history (pending calls stay answerable).
    pub fn clear_call_history(&mut self) {
        self.store.data_mut().calls.clear();
    }

    fn take_pending(&mut self, token: u32) -> Result<CallRecord, HarnessError> {
        self.store
            .data_mut()
            .pending
            .remove(&token)
            .ok_or_else(|| HarnessError::Usage(format!("no pending callout with token {token}")))
    }

    fn deliver(
        &mut self,
        call: CallRecord,
        headers: HeaderMap,
        num_headers: u32,
        body: Vec<u8>,
    ) -> Result<(), HarnessError> {
        self.due_tick()?;
        let body_size = body.len() as u32;
        // Both hosts pass the root id; the effective context is the owner (Envoy's root, the
        // ngx request).
        let context_arg = self.root_id();
        self.store.data_mut().call_response = Some(CallResponse { headers, body });
        let result = self.invoke::<(u32, u32, u32, u32, u32), ()>(
            Callback::HttpCallResponse,
            call.owner,
            (context_arg, call.token, num_headers, body_size, 0),
        );
        self.store.data_mut().call_response = None;
        result
    }

    /// Answers a callout with a response; the filter's `on_http_call_response` runs.
    pub fn respond(
        &mut self,
        token: u32,
        status: u16,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<(), HarnessError> {
        let call = self.take_pending(token)?;
        let case = self.store.data().name_case();
        let mut map = HeaderMap::new(case);
        let num_headers = match self.store.data().kind {
            HostKind::Envoy => {
                map.add(b":status", status.to_string().as_bytes());
                for (name, value) in headers {
                    map.add(name.as_bytes(), value.as_bytes());
                }
                map.len() as u32
            }
            HostKind::Ngx => {
                for (name, value) in headers {
                    map.add(name.as_bytes(), value.as_bytes());
                }
                let count = map.len() as u32;
                // ngx_wasm_module serves these as special keys after the response's headers.
                map.add(b":status", format!("{status:03}").as_bytes());
                map.add(b":dispatch_status", b"ok");
                count
            }
        };
        set_outcome(self.store.data_mut(), token, CallOutcome::Answered(status));
        self.deliver(call, map, num_headers, body.to_vec())
    }

    /// Fails a callout the way the profile's host reports that failure.
    pub fn fail_call(&mut self, token: u32, failure: CallFailure) -> Result<(), HarnessError> {
        let call = self.take_pending(token)?;
        let case = self.store.data().name_case();
        let mut map = HeaderMap::new(case);
        set_outcome(self.store.data_mut(), token, CallOutcome::Failed(failure));
        match self.store.data().kind {
            HostKind::Envoy => {
                let synthesized = match failure {
                    CallFailure::Connect => Some((
                        503,
                        &b"upstream connect error or disconnect/reset before headers. reset reason: connection failure"[..],
                    )),
                    CallFailure::Timeout => Some((504, &b"upstream request timeout"[..])),
                    CallFailure::Resolver => Some((503, &b"no healthy upstream"[..])),
                    CallFailure::Reset => None,
                };
                match synthesized {
                    Some((status, body)) => {
                        map.add(b":status", status.to_string().as_bytes());
                        map.add(b"content-length", body.len().to_string().as_bytes());
                        map.add(b"content-type", b"text/plain");
                        let count = map.len() as u32;
                        self.deliver(call, map, count, body.to_vec())
                    }
                    None => self.deliver(call, map, 0, Vec::new()),
                }
            }
            HostKind::Ngx => {
                let status: &[u8] = match failure {
                    CallFailure::Timeout => b"timeout",
                    CallFailure::Connect | CallFailure::Reset => b"broken connection",
                    CallFailure::Resolver => b"resolver failure",
                };
                map.add(b":dispatch_status", status);
                self.deliver(call, map, 0, Vec::new())
            }
        }
    }

    /// Fails, as timed out, every pending callout whose timeout has elapsed on the host clock
    /// (what the host does on its own while the test moves the clock); their tokens.
    pub fn expire_calls(&mut self) -> Result<Vec<u32>, HarnessError> {
        let now = self.host.process.borrow().now_ns;
        let due: Vec<u32> = self
            .store
            .data()
            .pending
            .values()
            .filter(|call| {
                call.timeout_ms > 0
                    && call
                        .dispatched_at_ns
                        .saturating_add(u64::from(call.timeout_ms) * 1_000_000)
                        <= now
            })
            .map(|call| call.token)
            .collect();
        for &token in &due {
            self.fail_call(token, CallFailure::Timeout)?;
        }
        Ok(due)
    }

    /// ABI misuse the host noticed (resume while not paused, CR/LF in a header value, ...);
    /// a correct filter leaves this empty.
    pub fn anomalies(&self) -> &[String] {
        &self.store.data().anomalies
    }

    /// What the guest wrote to stdout.
    pub fn stdout(&self) -> String {
        text(&self.store.data().stdout)
    }

    /// What the guest wrote to stderr (panic messages land here).
    pub fn stderr(&self) -> String {
        text(&self.store.data().stderr)
    }

    /// Foreign functions the guest called, in order.
    pub fn foreign_calls(&self) -> &[String] {
        &self.store.data().foreign_calls
    }

    /// How many times the guest called `proxy_done`.
    pub fn done_calls(&self) -> u32 {
        self.store.data().done_calls
    }

    /// The value of an exported integer global of the module (None when there is none).
    pub fn exported_global(&mut self, name: &str) -> Option<i64> {
        let global = self.instance.get_global(&mut self.store, name)?;
        match global.get(&mut self.store) {
            wasmtime::Val::I32(v) => Some(i64::from(v)),
            wasmtime::Val::I64(v) => Some(v),
            _ => None,
        }
    }

    /// Size of the guest's linear memory in bytes (it only grows: a leak shows as growth).
    pub fn memory_bytes(&mut self) -> usize {
        match self.instance.get_memory(&mut self.store, "memory") {
            Some(memory) => memory.data_size(&self.store),
            None => 0,
        }
    }
}

pub(crate) fn set_outcome(data: &mut VmData, token: u32, outcome: CallOutcome) {
    if let Some(record) = data
        .calls
        .iter_mut()
        .rev()
        .find(|record| record.token == token && record.outcome == CallOutcome::Pending)
    {
        record.outcome = outcome;
    }
}

//! The proxy-wasm ABI 0.2.1 host functions (`env.proxy_*`), per profile.

use wasmtime::{Caller, Linker};

use crate::headers::HeaderMap;
use crate::host::{MetricKind, Queue};
use crate::profile::HostKind;
use crate::shared::SetAttempt;
use crate::util::{decode_map, encode_map, text};
use crate::vm::{CallOutcome, CallRecord, Callback, LocalResponse, VmData};
use crate::wasi::{read, write, write_u32};
use crate::LogLevel;

/// proxy-wasm status codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
enum Status {
    Ok = 0,
    NotFound = 1,
    BadArgument = 2,
    SerializationFailure = 3,
    InvalidMemoryAccess = 6,
    Empty = 7,
    CasMismatch = 8,
    InternalFailure = 10,
}

type HostResult = wasmtime::Result<u32>;

fn ok(status: Status) -> HostResult {
    Ok(status as u32)
}

/// A host trap: the guest call fails with this message.
fn trap(message: String) -> HostResult {
    Err(wasmtime::Error::msg(message))
}

/// ngx_wasm_module defines these but traps when they are called.
fn ngx_nyi(caller: &Caller<'_, VmData>, name: &str) -> Option<HostResult> {
    (caller.data().kind == HostKind::Ngx).then(|| {
        trap(format!(
            "host trap (function not yet implemented): {name} (ngx_wasm_module does not implement it)"
        ))
    })
}

macro_rules! mem {
    ($value:expr) => {
        match $value {
            Some(value) => value,
            None => return ok(Status::InvalidMemoryAccess),
        }
    };
}

/// gRPC is not modelled: Envoy's "could not start" answer, ngx_wasm_module's trap.
fn grpc_unmodelled(caller: &mut Caller<'_, VmData>, name: &str) -> HostResult {
    if let Some(nyi) = ngx_nyi(caller, name) {
        return nyi;
    }
    caller
        .data_mut()
        .anomaly(format!("{name}: gRPC is not modelled by the harness"));
    ok(Status::InternalFailure)
}

/// Copies `bytes` into memory the guest allocates, and writes its address and size.
fn give(caller: &mut Caller<'_, VmData>, bytes: &[u8], ptr_out: u32, size_out: u32) -> HostResult {
    if bytes.is_empty() {
        mem!(write_u32(caller, ptr_out, 0));
        mem!(write_u32(caller, size_out, 0));
        return ok(Status::Ok);
    }
    let Some(alloc) = caller.data().alloc.clone() else {
        return trap("the module has no allocator export".into());
    };
    let ptr = alloc.call(&mut *caller, bytes.len() as u32)?;
    if ptr == 0 {
        return ok(Status::InvalidMemoryAccess);
    }
    mem!(write(caller, ptr, bytes));
    mem!(write_u32(caller, ptr_out, ptr));
    mem!(write_u32(caller, size_out, bytes.len() as u32));
    ok(Status::Ok)
}

fn property_path(bytes: &[u8]) -> String {
    bytes
        .split(|&byte| byte == 0)
        .map(text)
        .collect::<Vec<_>>()
        .join(".")
}

enum MapRef {
    Request(u32),
    Response(u32),
    CallResponse,
}

/// Which header map a `map_type` means right now, or the status the host answers.
fn map_ref(data: &VmData, map_type: u32) -> Result<MapRef, Status> {
    let stream = data.streams.get(&data.effective).filter(|s| !s.ended);
    match map_type {
        0 => match stream {
            Some(stream) if stream.has_request => Ok(MapRef::Request(stream.id)),
            _ => Err(Status::BadArgument),
        },
        2 => match stream {
            Some(stream) if stream.has_response => Ok(MapRef::Response(stream.id)),
            _ => Err(Status::BadArgument),
        },
        6 => match data.call_response {
            Some(_) => Ok(MapRef::CallResponse),
            None => Err(Status::BadArgument),
        },
        // Trailers and gRPC metadata are not modelled: never present.
        1 | 3 | 4 | 5 | 7 => Err(Status::BadArgument),
        _ => Err(Status::BadArgument),
    }
}

fn map_get(data: &VmData, target: &MapRef) -> Option<HeaderMap> {
    match target {
        MapRef::Request(id) => data.streams.get(id).map(|s| s.request_headers.clone()),
        MapRef::Response(id) => data.streams.get(id).map(|s| s.response_headers.clone()),
        MapRef::CallResponse => data.call_response.as_ref().map(|r| r.headers.clone()),
    }
}

fn map_mut<'a>(data: &'a mut VmData, target: &MapRef) -> Option<&'a mut HeaderMap> {
    match target {
        MapRef::Request(id) => data.streams.get_mut(id).map(|s| &mut s.request_headers),
        MapRef::Response(id) => data.streams.get_mut(id).map(|s| &mut s.response_headers),
        // The callout response is read-only.
        MapRef::CallResponse => None,
    }
}

/// Checks a header the guest sets; the host refuses CR, LF and NUL (header injection).
fn header_ok(data: &mut VmData, name: &[u8], value: &[u8]) -> bool {
    let bad = |bytes: &[u8]| bytes.iter().any(|&b| b == b'\r' || b == b'\n' || b == 0);
    if bad(name) || bad(value) || name.is_empty() {
        data.anomaly(format!(
            "guest set header {:?} to a value with CR/LF/NUL (or an empty name); the host drops it",
            text(name)
        ));
        return false;
    }
    true
}

fn upstream_ok_for_ngx(upstream: &str) -> bool {
    let (host, port) = match upstream.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(']') || host.starts_with('[') => (host, Some(port)),
        _ => (upstream, None),
    };
    let host_ok = !host.is_empty()
        && (host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_')
            || (host.starts_with('[') && host.ends_with(']')));
    let port_ok = port.is_none_or(|port| port.parse::<u16>().is_ok_and(|port| port > 0));
    host_ok && port_ok
}

/// Adds every `env.proxy_*` function.
pub(crate) fn add_to_linker(linker: &mut Linker<VmData>) -> wasmtime::Result<()> {
    linker.func_wrap(
        "env",
        "proxy_log",
        |mut caller: Caller<'_, VmData>, level: u32, ptr: u32, len: u32| -> HostResult {
            let Some(level) = LogLevel::from_raw(level) else {
                if let Some(nyi) = ngx_nyi(&caller, "proxy_log with a bad level") {
                    return nyi;
                }
                return ok(Status::BadArgument);
            };
            let message = text(&mem!(read(&mut caller, ptr, len)));
            let data = caller.data();
            data.process
                .borrow_mut()
                .log(data.index, data.effective, level, message);
            ok(Status::Ok)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_log_level",
        |mut caller: Caller<'_, VmData>, out: u32| -> HostResult {
            if let Some(nyi) = ngx_nyi(&caller, "proxy_get_log_level") {
                return nyi;
            }
            let level = caller.data().process.borrow().profile.log_level;
            mem!(write_u32(&mut caller, out, level));
            ok(Status::Ok)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_current_time_nanoseconds",
        |mut caller: Caller<'_, VmData>, out: u32| -> HostResult {
            let now = caller.data().process.borrow().now_ns;
            mem!(write(&mut caller, out, &now.to_le_bytes()));
            ok(Status::Ok)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_tick_period_milliseconds",
        |mut caller: Caller<'_, VmData>, period: u32| -> HostResult {
            let now = caller.data().process.borrow().now_ns;
            let data = caller.data_mut();
            if data.tick_period_ms == 0 {
                data.last_tick_ns = now;
            }
            data.tick_period_ms = period;
            ok(Status::Ok)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_buffer_bytes",
        |mut caller: Caller<'_, VmData>,
         kind: u32,
         start: u32,
         max: u32,
         ptr_out: u32,
         size_out: u32|
         -> HostResult {
            let data = caller.data();
            let stream = data.streams.get(&data.effective);
            let buffer: Vec<u8> = match kind {
                0 => match stream {
                    Some(stream) => stream.request_body.clone(),
                    None => return ok(Status::BadArgument),
                },
                1 => match stream {
                    Some(stream) => stream.response_body.clone(),
                    None => return ok(Status::BadArgument),
                },
                4 => match &data.call_response {
                    Some(response) => response.body.clone(),
                    None => return ok(Status::NotFound),
                },
                6 => data.vm_config.clone(),
                7 => data.plugin_config.clone(),
                2 | 3 | 5 | 8 => return ok(Status::NotFound),
                _ => return ok(Status::BadArgument),
            };
            let from = (start as usize).min(buffer.len());
            let to = from.saturating_add(max as usize).min(buffer.len());
            give(&mut caller, &buffer[from..to], ptr_out, size_out)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_buffer_bytes",
        |mut caller: Caller<'_, VmData>,
         kind: u32,
         start: u32,
         size: u32,
         ptr: u32,
         len: u32|
         -> HostResult {
            let bytes = mem!(read(&mut caller, ptr, len));
            let data = caller.data_mut();
            let effective = data.effective;
            let Some(stream) = data.streams.get_mut(&effective) else {
                return ok(Status::BadArgument);
            };
            let buffer = match kind {
                0 => &mut stream.request_body,
                1 => &mut stream.response_body,
                _ => return ok(Status::BadArgument),
            };
            let from = (start as usize).min(buffer.len());
            let to = from.saturating_add(size as usize).min(buffer.len());
            buffer.splice(from..to, bytes);
            ok(Status::Ok)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_header_map_pairs",
        |mut caller: Caller<'_, VmData>,
         map_type: u32,
         ptr_out: u32,
         size_out: u32|
         -> HostResult {
            let target = match map_ref(caller.data(), map_type) {
                Ok(target) => target,
                Err(status) => return ok(status),
            };
            let Some(map) = map_get(caller.data(), &target) else {
                return ok(Status::BadArgument);
            };
            let bytes = encode_map(map.pairs());
            give(&mut caller, &bytes, ptr_out, size_out)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_header_map_pairs",
        |mut caller: Caller<'_, VmData>, map_type: u32, ptr: u32, len: u32| -> HostResult {
            let bytes = mem!(read(&mut caller, ptr, len));
            let Some(pairs) = decode_map(&bytes) else {
                return ok(Status::SerializationFailure);
            };
            let data = caller.data_mut();
            let target = match map_ref(data, map_type) {
                Ok(target) => target,
                Err(status) => return ok(status),
            };
            let pairs: Vec<_> = pairs
                .into_iter()
                .filter(|(name, value)| header_ok(data, name, value))
                .collect();
            match map_mut(data, &target) {
                Some(map) => {
                    map.set_all(pairs);
                    ok(Status::Ok)
                }
                None => ok(Status::BadArgument),
            }
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_header_map_value",
        |mut caller: Caller<'_, VmData>,
         map_type: u32,
         key_ptr: u32,
         key_len: u32,
         ptr_out: u32,
         size_out: u32|
         -> HostResult {
            let key = mem!(read(&mut caller, key_ptr, key_len));
            let target = match map_ref(caller.data(), map_type) {
                Ok(target) => target,
                Err(status) => return ok(status),
            };
            let Some(map) = map_get(caller.data(), &target) else {
                return ok(Status::BadArgument);
            };
            match map.get(&key) {
                Some(value) => {
                    let value = value.to_vec();
                    give(&mut caller, &value, ptr_out, size_out)
                }
                None => ok(Status::NotFound),
            }
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_remove_header_map_value",
        |mut caller: Caller<'_, VmData>, map_type: u32, key_ptr: u32, key_len: u32| -> HostResult {
            let key = mem!(read(&mut caller, key_ptr, key_len));
            let data = caller.data_mut();
            let target = match map_ref(data, map_type) {
                Ok(target) => target,
                Err(status) => return ok(status),
            };
            match map_mut(data, &target) {
                Some(map) => {
                    map.remove(&key);
                    ok(Status::Ok)
                }
                None => ok(Status::BadArgument),
            }
        },
    )?;
    for (name, replace) in [
        ("proxy_replace_header_map_value", true),
        ("proxy_add_header_map_value", false),
    ] {
        linker.func_wrap(
            "env",
            name,
            move |mut caller: Caller<'_, VmData>,
                  map_type: u32,
                  key_ptr: u32,
                  key_len: u32,
                  value_ptr: u32,
                  value_len: u32|
                  -> HostResult {
                let key = mem!(read(&mut caller, key_ptr, key_len));
                let value = mem!(read(&mut caller, value_ptr, value_len));
                let data = caller.data_mut();
                let target = match map_ref(data, map_type) {
                    Ok(target) => target,
                    Err(status) => return ok(status),
                };
                if !header_ok(data, &key, &value) {
                    return ok(Status::Ok);
                }
                match map_mut(data, &target) {
                    Some(map) => {
                        if replace {
                            map.replace(&key, &value);
                        } else {
                            map.add(&key, &value);
                        }
                        ok(Status::Ok)
                    }
                    None => ok(Status::BadArgument),
                }
            },
        )?;
    }
    linker.func_wrap(
        "env",
        "proxy_get_property",
        |mut caller: Caller<'_, VmData>,
         path_ptr: u32,
         path_len: u32,
         ptr_out: u32,
         size_out: u32|
         -> HostResult {
            let path = property_path(&mem!(read(&mut caller, path_ptr, path_len)));
            let data = caller.data();
            let from_stream = data
                .streams
                .get(&data.effective)
                .and_then(|stream| stream.properties.get(&path).cloned());
            let value = from_stream
                .or_else(|| data.root_properties.get(&path).cloned())
                .or_else(|| data.process.borrow().profile.properties.get(&path).cloned());
            match value {
                Some(value) => give(&mut caller, &value, ptr_out, size_out),
                None => ok(Status::NotFound),
            }
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_property",
        |mut caller: Caller<'_, VmData>,
         path_ptr: u32,
         path_len: u32,
         value_ptr: u32,
         value_len: u32|
         -> HostResult {
            let path = property_path(&mem!(read(&mut caller, path_ptr, path_len)));
            let value = mem!(read(&mut caller, value_ptr, value_len));
            let data = caller.data_mut();
            if data.kind == HostKind::Ngx {
                let Some(variable) = path.strip_prefix("ngx.") else {
                    return ok(Status::NotFound);
                };
                let writable = data
                    .process
                    .borrow()
                    .profile
                    .writable_ngx_vars
                    .contains(variable);
                if !writable {
                    // Seen on ngx_wasm_module 3bed2783: an undeclared variable is NotFound
                    // (nothing logged); a built-in one InternalFailure. Neither traps.
                    return ok(Status::NotFound);
                }
            }
            let effective = data.effective;
            match data.streams.get_mut(&effective) {
                Some(stream) => {
                    stream.properties.insert(path, value);
                }
                None => {
                    data.root_properties.insert(path, value);
                }
            }
            ok(Status::Ok)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_shared_data",
        |mut caller: Caller<'_, VmData>,
         key_ptr: u32,
         key_len: u32,
         ptr_out: u32,
         size_out: u32,
         cas_out: u32|
         -> HostResult {
            let key = mem!(read(&mut caller, key_ptr, key_len));
            let found = caller.data().process.borrow_mut().shared.guest_get(&key);
            match found {
                Err(message) => trap(format!("host trap (bad usage): {message}")),
                Ok(None) => ok(Status::NotFound),
                Ok(Some((value, cas))) => {
                    mem!(write_u32(&mut caller, cas_out, cas));
                    give(&mut caller, &value, ptr_out, size_out)
                }
            }
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_shared_data",
        |mut caller: Caller<'_, VmData>,
         key_ptr: u32,
         key_len: u32,
         value_ptr: u32,
         value_len: u32,
         cas: u32|
         -> HostResult {
            let key = mem!(read(&mut caller, key_ptr, key_len));
            let value = if value_ptr == 0 {
                if value_len != 0 {
                    return ok(Status::InvalidMemoryAccess);
                }
                None
            } else {
                Some(mem!(read(&mut caller, value_ptr, value_len)))
            };
            let data = caller.data();
            let mut process = data.process.borrow_mut();
            if let Some(mut hook) = process.set_hook.take() {
                let attempt = SetAttempt {
                    vm: data.index,
                    key: text(&key),
                    value: value.clone(),
                    cas,
                };
                hook(&attempt, &mut process.shared);
                if process.set_hook.is_none() {
                    process.set_hook = Some(hook);
                }
            }
            match process.shared.guest_set(&key, value.as_deref(), cas) {
                Ok(true) => ok(Status::Ok),
                Ok(false) => ok(Status::CasMismatch),
                Err(message) => trap(format!("host trap: {message}")),
            }
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_register_shared_queue",
        |mut caller: Caller<'_, VmData>, name_ptr: u32, name_len: u32, id_out: u32| -> HostResult {
            let name = text(&mem!(read(&mut caller, name_ptr, name_len)));
            let id = {
                let data = caller.data();
                let mut process = data.process.borrow_mut();
                match process.queues.iter().position(|queue| queue.name == name) {
                    Some(index) => index as u32 + 1,
                    None => {
                        process.queues.push(Queue {
                            name,
                            items: Default::default(),
                        });
                        process.queues.len() as u32
                    }
                }
            };
            mem!(write_u32(&mut caller, id_out, id));
            ok(Status::Ok)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_resolve_shared_queue",
        |mut caller: Caller<'_, VmData>,
         _vm_ptr: u32,
         _vm_len: u32,
         name_ptr: u32,
         name_len: u32,
         id_out: u32|
         -> HostResult {
            if let Some(nyi) = ngx_nyi(&caller, "proxy_resolve_shared_queue") {
                return nyi;
            }
            let name = text(&mem!(read(&mut caller, name_ptr, name_len)));
            let found = caller
                .data()
                .process
                .borrow()
                .queues
                .iter()
                .position(|queue| queue.name == name);
            match found {
                Some(index) => {
                    mem!(write_u32(&mut caller, id_out, index as u32 + 1));
                    ok(Status::Ok)
                }
                None => ok(Status::NotFound),
            }
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_dequeue_shared_queue",
        |mut caller: Caller<'_, VmData>, id: u32, ptr_out: u32, size_out: u32| -> HostResult {
            let item = {
                let data = caller.data();
                let mut process = data.process.borrow_mut();
                let Some(queue) = (id as usize)
                    .checked_sub(1)
                    .and_then(|index| process.queues.get_mut(index))
                else {
                    return ok(Status::NotFound);
                };
                queue.items.pop_front()
            };
            match item {
                Some(item) => give(&mut caller, &item, ptr_out, size_out),
                None => ok(Status::Empty),
            }
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_enqueue_shared_queue",
        |mut caller: Caller<'_, VmData>, id: u32, ptr: u32, len: u32| -> HostResult {
            let item = mem!(read(&mut caller, ptr, len));
            let data = caller.data();
            let mut process = data.process.borrow_mut();
            match (id as usize)
                .checked_sub(1)
                .and_then(|index| process.queues.get_mut(index))
            {
                Some(queue) => {
                    queue.items.push_back(item);
                    ok(Status::Ok)
                }
                None => ok(Status::NotFound),
            }
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_continue_stream",
        |mut caller: Caller<'_, VmData>, stream_type: u32| -> HostResult {
            let data = caller.data_mut();
            let effective = data.effective;
            let running = data.running;
            if stream_type > 1 {
                return ok(match data.kind {
                    HostKind::Envoy => Status::BadArgument,
                    HostKind::Ngx => Status::InternalFailure,
                });
            }
            let Some(stream) = data.streams.get_mut(&effective) else {
                return ok(Status::BadArgument);
            };
            let problem = if stream.local_response.is_some() {
                Some("resumed a stream after sending a local response")
            } else if !stream.paused {
                Some(match running {
                    Some(Callback::RequestHeaders) | Some(Callback::RequestBody) => {
                        "resumed a stream from the callback that was about to return (not paused yet)"
                    }
                    _ => "resumed a stream that was not paused",
                })
            } else {
                None
            };
            match problem {
                Some(problem) => {
                    let message = format!("context {effective}: {problem}");
                    data.anomaly(message);
                }
                None => {
                    stream.paused = false;
                    stream.resumes += 1;
                }
            }
            ok(Status::Ok)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_close_stream",
        |mut caller: Caller<'_, VmData>, _stream_type: u32| -> HostResult {
            if let Some(nyi) = ngx_nyi(&caller, "proxy_close_stream") {
                return nyi;
            }
            let data = caller.data_mut();
            let effective = data.effective;
            match data.streams.get_mut(&effective) {
                Some(stream) => {
                    stream.paused = false;
                    stream.local_response.get_or_insert(LocalResponse {
                        status: 0,
                        details: "stream closed by the filter".into(),
                        headers: Vec::new(),
                        body: Vec::new(),
                        grpc_status: -1,
                    });
                    ok(Status::Ok)
                }
                None => ok(Status::BadArgument),
            }
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_send_local_response",
        |mut caller: Caller<'_, VmData>,
         status: u32,
         details_ptr: u32,
         details_len: u32,
         body_ptr: u32,
         body_len: u32,
         headers_ptr: u32,
         headers_len: u32,
         grpc_status: i32|
         -> HostResult {
            let details = text(&mem!(read(&mut caller, details_ptr, details_len)));
            let body = mem!(read(&mut caller, body_ptr, body_len));
            let header_bytes = mem!(read(&mut caller, headers_ptr, headers_len));
            let Some(headers) = decode_map(&header_bytes) else {
                return ok(Status::SerializationFailure);
            };
            let data = caller.data_mut();
            let effective = data.effective;
            let headers: Vec<(String, String)> = headers
                .into_iter()
                .filter(|(name, value)| header_ok(data, name, value))
                .map(|(name, value)| (text(&name), text(&value)))
                .collect();
            let Some(stream) = data.streams.get_mut(&effective) else {
                return ok(Status::BadArgument);
            };
            if stream.local_response.is_some() {
                let message = format!("context {effective}: sent a second local response");
                data.anomaly(message);
                return ok(Status::Ok);
            }
            stream.paused = false;
            stream.local_response = Some(LocalResponse {
                status,
                details,
                headers,
                body,
                grpc_status,
            });
            ok(Status::Ok)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_http_call",
        |mut caller: Caller<'_, VmData>,
         upstream_ptr: u32,
         upstream_len: u32,
         headers_ptr: u32,
         headers_len: u32,
         body_ptr: u32,
         body_len: u32,
         trailers_ptr: u32,
         trailers_len: u32,
         timeout_ms: u32,
         token_out: u32|
         -> HostResult {
            let upstream = text(&mem!(read(&mut caller, upstream_ptr, upstream_len)));
            let header_bytes = mem!(read(&mut caller, headers_ptr, headers_len));
            let body = mem!(read(&mut caller, body_ptr, body_len));
            let trailer_bytes = mem!(read(&mut caller, trailers_ptr, trailers_len));
            let (Some(headers), Some(trailers)) = (decode_map(&header_bytes), decode_map(&trailer_bytes))
            else {
                return ok(Status::BadArgument);
            };
            let data = caller.data();
            let kind = data.kind;
            let has = |name: &str| headers.iter().any(|(key, _)| key.as_slice() == name.as_bytes());
            let to_text = |pairs: Vec<(Vec<u8>, Vec<u8>)>, lower: bool| -> Vec<(String, String)> {
                pairs
                    .into_iter()
                    .map(|(name, value)| {
                        let name = if lower { name.to_ascii_lowercase() } else { name };
                        (text(&name), text(&value))
                    })
                    .collect()
            };
            match kind {
                HostKind::Envoy => {
                    let known = data.process.borrow().profile.clusters.contains(&upstream);
                    if !known || !has(":method") || !has(":path") || !has(":authority") {
                        return ok(Status::BadArgument);
                    }
                }
                HostKind::Ngx => {
                    let step_ok = matches!(
                        data.running,
                        Some(Callback::RequestHeaders)
                            | Some(Callback::RequestBody)
                            | Some(Callback::Tick)
                            | Some(Callback::HttpCallResponse)
                    );
                    if !step_ok {
                        return trap(
                            "host trap (bad usage): can only send HTTP dispatch during \
                             \"on_request_headers\", \"on_request_body\", \"on_tick\", \
                             \"on_dispatch_response\", \"on_foreign_function\""
                                .into(),
                        );
                    }
                    if !has(":method") {
                        return trap("dispatch failed: no :method".into());
                    }
                    if !has(":path") {
                        return trap("dispatch failed: no :path".into());
                    }
                    if !upstream_ok_for_ngx(&upstream) {
                        return trap(format!(
                            "dispatch failed: tcp socket - invalid host \"{upstream}\" (ngx_wasm_module takes host:port)"
                        ));
                    }
                }
            }
            let now = data.process.borrow().now_ns;
            let data = caller.data_mut();
            let token = data.next_token;
            data.next_token = data.next_token.wrapping_add(1);
            // Envoy attaches every callout to the plugin's root context (proxy-wasm-cpp-host's
            // `http_call` uses `root_context()`), so it outlives the request that made it;
            // ngx_wasm_module attaches it to the request.
            let owner = match kind {
                HostKind::Envoy => data.root_id,
                HostKind::Ngx => data.effective,
            };
            let record = CallRecord {
                token,
                context: data.effective,
                owner,
                upstream,
                headers: to_text(headers, kind == HostKind::Envoy),
                body,
                trailers: to_text(trailers, kind == HostKind::Envoy),
                timeout_ms,
                dispatched_at_ns: now,
                outcome: CallOutcome::Pending,
            };
            data.pending.insert(token, record.clone());
            data.calls.push(record);
            mem!(write_u32(&mut caller, token_out, token));
            ok(Status::Ok)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_grpc_call",
        |mut caller: Caller<'_, VmData>,
         _upstream: u32,
         _upstream_len: u32,
         _service: u32,
         _service_len: u32,
         _method: u32,
         _method_len: u32,
         _metadata: u32,
         _metadata_len: u32,
         _message: u32,
         _message_len: u32,
         _timeout: u32,
         _out: u32|
         -> HostResult { grpc_unmodelled(&mut caller, "proxy_grpc_call") },
    )?;
    linker.func_wrap(
        "env",
        "proxy_grpc_stream",
        |mut caller: Caller<'_, VmData>,
         _upstream: u32,
         _upstream_len: u32,
         _service: u32,
         _service_len: u32,
         _method: u32,
         _method_len: u32,
         _metadata: u32,
         _metadata_len: u32,
         _out: u32|
         -> HostResult { grpc_unmodelled(&mut caller, "proxy_grpc_stream") },
    )?;
    linker.func_wrap(
        "env",
        "proxy_grpc_send",
        |caller: Caller<'_, VmData>, _token: u32, _ptr: u32, _len: u32, _end: u32| -> HostResult {
            if let Some(nyi) = ngx_nyi(&caller, "proxy_grpc_send") {
                return nyi;
            }
            ok(Status::NotFound)
        },
    )?;
    for name in ["proxy_grpc_cancel", "proxy_grpc_close"] {
        linker.func_wrap(
            "env",
            name,
            move |caller: Caller<'_, VmData>, _token: u32| -> HostResult {
                if let Some(nyi) = ngx_nyi(&caller, name) {
                    return nyi;
                }
                ok(Status::NotFound)
            },
        )?;
    }
    linker.func_wrap(
        "env",
        "proxy_get_status",
        |mut caller: Caller<'_, VmData>,
         code_out: u32,
         ptr_out: u32,
         size_out: u32|
         -> HostResult {
            if let Some(nyi) = ngx_nyi(&caller, "proxy_get_status") {
                return nyi;
            }
            mem!(write_u32(&mut caller, code_out, 0));
            give(&mut caller, b"", ptr_out, size_out)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_effective_context",
        |mut caller: Caller<'_, VmData>, context: u32| -> HostResult {
            let data = caller.data_mut();
            if data.kind == HostKind::Ngx {
                // ngx_wasm_module accepts the call and ignores it.
                return ok(Status::Ok);
            }
            let live = context == data.root_id
                || data
                    .streams
                    .get(&context)
                    .is_some_and(|stream| !stream.ended);
            if live {
                data.effective = context;
                ok(Status::Ok)
            } else {
                ok(Status::BadArgument)
            }
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_call_foreign_function",
        |mut caller: Caller<'_, VmData>,
         name_ptr: u32,
         name_len: u32,
         _args_ptr: u32,
         _args_len: u32,
         ptr_out: u32,
         size_out: u32|
         -> HostResult {
            let name = text(&mem!(read(&mut caller, name_ptr, name_len)));
            let known = caller
                .data()
                .process
                .borrow()
                .profile
                .foreign_functions
                .contains(&name);
            if !known {
                return ok(Status::NotFound);
            }
            caller.data_mut().foreign_calls.push(name);
            give(&mut caller, b"", ptr_out, size_out)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_done",
        |mut caller: Caller<'_, VmData>| -> HostResult {
            if let Some(nyi) = ngx_nyi(&caller, "proxy_done") {
                return nyi;
            }
            caller.data_mut().done_calls += 1;
            ok(Status::Ok)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_define_metric",
        |mut caller: Caller<'_, VmData>,
         kind: u32,
         name_ptr: u32,
         name_len: u32,
         id_out: u32|
         -> HostResult {
            let kind = match kind {
                0 => MetricKind::Counter,
                1 => MetricKind::Gauge,
                2 => MetricKind::Histogram,
                _ => return ok(Status::BadArgument),
            };
            let name = text(&mem!(read(&mut caller, name_ptr, name_len)));
            let id = caller
                .data()
                .process
                .borrow_mut()
                .define_metric(kind, &name);
            mem!(write_u32(&mut caller, id_out, id));
            ok(Status::Ok)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_metric",
        |mut caller: Caller<'_, VmData>, id: u32, out: u32| -> HostResult {
            let value = {
                let data = caller.data();
                let mut process = data.process.borrow_mut();
                match process.metric_mut(id) {
                    Some(metric) => metric.value,
                    None => return ok(Status::NotFound),
                }
            };
            mem!(write(&mut caller, out, &(value as u64).to_le_bytes()));
            ok(Status::Ok)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_record_metric",
        |caller: Caller<'_, VmData>, id: u32, value: u64| -> HostResult {
            let data = caller.data();
            let mut process = data.process.borrow_mut();
            let Some(metric) = process.metric_mut(id) else {
                return ok(Status::NotFound);
            };
            match metric.kind {
                MetricKind::Counter => metric.value = metric.value.saturating_add(value as i64),
                MetricKind::Gauge => metric.value = value as i64,
                MetricKind::Histogram => metric.value += 1,
            }
            ok(Status::Ok)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_increment_metric",
        |caller: Caller<'_, VmData>, id: u32, offset: i64| -> HostResult {
            let data = caller.data();
            let kind = data.kind;
            let mut process = data.process.borrow_mut();
            let Some(metric) = process.metric_mut(id) else {
                return ok(Status::NotFound);
            };
            match metric.kind {
                MetricKind::Counter => {
                    // Envoy refuses a counter increment that is not positive; ngx one that is
                    // negative.
                    let refused = match kind {
                        HostKind::Envoy => offset <= 0,
                        HostKind::Ngx => offset < 0,
                    };
                    if refused {
                        return ok(Status::BadArgument);
                    }
                    metric.value = metric.value.saturating_add(offset);
                }
                MetricKind::Gauge => metric.value = metric.value.saturating_add(offset),
                MetricKind::Histogram => return ok(Status::BadArgument),
            }
            ok(Status::Ok)
        },
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ngx_upstreams_are_host_and_port() {
        for good in ["127.0.0.1:8008", "synapse:8008", "localhost", "[::1]:80"] {
            assert!(upstream_ok_for_ngx(good), "{good}");
        }
        for bad in ["", "a b:80", "host:0", "host:99999", "host:port", "/path"] {
            assert!(!upstream_ok_for_ngx(bad), "{bad}");
        }
    }

    #[test]
    fn property_paths_join_with_dots() {
        assert_eq!(property_path(b"source\0address"), "source.address");
        assert_eq!(property_path(b"plugin_name"), "plugin_name");
    }
}

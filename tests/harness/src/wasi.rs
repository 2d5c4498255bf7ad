//! A small, deterministic WASI preview1 (`wasi_snapshot_preview1`) for guests that need no files:
//! arguments, environment, clocks, randomness, stdio and exit. No directory is pre-opened, so
//! nothing can be opened; every function a Rust `wasm32-wasip1` module or test binary imports for
//! that is provided, and the harness reports any other import at load time.

use wasmtime::{Caller, Extern, Linker, Memory};

/// WASI errno values used here.
pub mod errno {
    /// Success.
    pub const SUCCESS: u32 = 0;
    /// Bad file descriptor.
    pub const BADF: u32 = 8;
    /// Bad address (a pointer outside the guest's memory).
    pub const FAULT: u32 = 21;
    /// Invalid argument.
    pub const INVAL: u32 = 28;
    /// Function not supported.
    pub const NOTSUP: u32 = 58;
    /// Invalid seek.
    pub const SPIPE: u32 = 70;
}

/// The guest called `proc_exit(code)`: surfaced as the error of the guest call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcExit(pub i32);

impl std::fmt::Display for ProcExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "guest called proc_exit({})", self.0)
    }
}

impl std::error::Error for ProcExit {}

/// What the WASI functions need from the embedding's store data.
pub trait WasiView {
    /// Program arguments (`argv[0]` first).
    fn args(&self) -> Vec<Vec<u8>>;
    /// Environment entries as `NAME=value`.
    fn env(&self) -> Vec<Vec<u8>>;
    /// Nanoseconds for WASI clock `id` (0 realtime, 1 monotonic, 2/3 CPU time); `None` if unknown.
    fn clock_ns(&mut self, id: u32) -> Option<u64>;
    /// Lets `ns` nanoseconds pass (`poll_oneoff` on a clock).
    fn sleep_ns(&mut self, ns: u64);
    /// Fills `buf` with random bytes.
    fn random(&mut self, buf: &mut [u8]);
    /// Bytes the guest wrote to fd 1 (stdout) or 2 (stderr).
    fn output(&mut self, fd: u32, data: &[u8]);
}

pub(crate) fn memory<T>(caller: &mut Caller<'_, T>) -> Option<Memory> {
    match caller.get_export("memory") {
        Some(Extern::Memory(memory)) => Some(memory),
        _ => None,
    }
}

/// Reads `len` bytes at `ptr` of the guest memory; `None` when out of bounds.
pub(crate) fn read<T>(caller: &mut Caller<'_, T>, ptr: u32, len: u32) -> Option<Vec<u8>> {
    let memory = memory(caller)?;
    let data = memory.data(&*caller);
    let start = ptr as usize;
    let end = start.checked_add(len as usize)?;
    data.get(start..end).map(<[u8]>::to_vec)
}

/// Writes `bytes` at `ptr` of the guest memory; `None` when out of bounds.
pub(crate) fn write<T>(caller: &mut Caller<'_, T>, ptr: u32, bytes: &[u8]) -> Option<()> {
    let memory = memory(caller)?;
    let data = memory.data_mut(&mut *caller);
    let start = ptr as usize;
    let end = start.checked_add(bytes.len())?;
    data.get_mut(start..end)?.copy_from_slice(bytes);
    Some(())
}

pub(crate) fn write_u32<T>(caller: &mut Caller<'_, T>, ptr: u32, value: u32) -> Option<()> {
    write(caller, ptr, &value.to_le_bytes())
}

fn write_u64<T>(caller: &mut Caller<'_, T>, ptr: u32, value: u64) -> Option<()> {
    write(caller, ptr, &value.to_le_bytes())
}

fn read_u32<T>(caller: &mut Caller<'_, T>, ptr: u32) -> Option<u32> {
    let bytes: [u8; 4] = read(caller, ptr, 4)?.try_into().ok()?;
    Some(u32::from_le_bytes(bytes))
}

fn read_u64<T>(caller: &mut Caller<'_, T>, ptr: u32) -> Option<u64> {
    let bytes: [u8; 8] = read(caller, ptr, 8)?.try_into().ok()?;
    Some(u64::from_le_bytes(bytes))
}

fn status(result: Option<()>) -> u32 {
    match result {
        Some(()) => errno::SUCCESS,
        None => errno::FAULT,
    }
}

/// Writes a list of NUL-terminated strings (`args_get` / `environ_get`).
fn write_strings<T>(
    caller: &mut Caller<'_, T>,
    items: &[Vec<u8>],
    pointers: u32,
    buffer: u32,
) -> Option<()> {
    let mut offset = buffer;
    for (index, item) in items.iter().enumerate() {
        write_u32(caller, pointers.checked_add(4 * index as u32)?, offset)?;
        let mut with_nul = item.clone();
        with_nul.push(0);
        write(caller, offset, &with_nul)?;
        offset = offset.checked_add(with_nul.len() as u32)?;
    }
    Some(())
}

fn sizes<T>(caller: &mut Caller<'_, T>, items: &[Vec<u8>], count_ptr: u32, size_ptr: u32) -> u32 {
    let total: usize = items.iter().map(|item| item.len() + 1).sum();
    status(
        write_u32(caller, count_ptr, items.len() as u32)
            .and_then(|()| write_u32(caller, size_ptr, total as u32)),
    )
}

const MODULE: &str = "wasi_snapshot_preview1";

/// Reads a list of strings (arguments or environment) from the store data.
type ListOf<T> = fn(&T) -> Vec<Vec<u8>>;

/// Adds every WASI function of this module to `linker`.
pub fn add_to_linker<T: WasiView + 'static>(linker: &mut Linker<T>) -> wasmtime::Result<()> {
    let lists: [(&str, &str, ListOf<T>); 2] = [
        ("args_get", "args_sizes_get", T::args),
        ("environ_get", "environ_sizes_get", T::env),
    ];
    for (get, get_sizes, items) in lists {
        linker.func_wrap(
            MODULE,
            get,
            move |mut caller: Caller<'_, T>, list: u32, buf: u32| -> u32 {
                let items = items(caller.data());
                status(write_strings(&mut caller, &items, list, buf))
            },
        )?;
        linker.func_wrap(
            MODULE,
            get_sizes,
            move |mut caller: Caller<'_, T>, count: u32, size: u32| -> u32 {
                let items = items(caller.data());
                sizes(&mut caller, &items, count, size)
            },
        )?;
    }
    linker.func_wrap(
        MODULE,
        "clock_res_get",
        |mut caller: Caller<'_, T>, id: u32, res: u32| -> u32 {
            if caller.data_mut().clock_ns(id).is_none() {
                return errno::INVAL;
            }
            status(write_u64(&mut caller, res, 1))
        },
    )?;
    linker.func_wrap(
        MODULE,
        "clock_time_get",
        |mut caller: Caller<'_, T>, id: u32, _precision: u64, out: u32| -> u32 {
            match caller.data_mut().clock_ns(id) {
                Some(now) => status(write_u64(&mut caller, out, now)),
                None => errno::INVAL,
            }
        },
    )?;
    linker.func_wrap(
        MODULE,
        "fd_write",
        |mut caller: Caller<'_, T>, fd: u32, iovs: u32, count: u32, written: u32| -> u32 {
            if fd != 1 && fd != 2 {
                return errno::BADF;
            }
            let mut total = 0u32;
            for index in 0..count {
                let Some(entry) = iovs.checked_add(index.saturating_mul(8)) else {
                    return errno::FAULT;
                };
                let (Some(ptr), Some(len)) = (
                    read_u32(&mut caller, entry),
                    read_u32(&mut caller, entry.saturating_add(4)),
                ) else {
                    return errno::FAULT;
                };
                let Some(bytes) = read(&mut caller, ptr, len) else {
                    return errno::FAULT;
                };
                caller.data_mut().output(fd, &bytes);
                total = total.saturating_add(len);
            }
            status(write_u32(&mut caller, written, total))
        },
    )?;
    linker.func_wrap(
        MODULE,
        "fd_read",
        |mut caller: Caller<'_, T>, fd: u32, _iovs: u32, _count: u32, read_ptr: u32| -> u32 {
            if fd != 0 {
                return errno::BADF;
            }
            // stdin is empty.
            status(write_u32(&mut caller, read_ptr, 0))
        },
    )?;
    linker.func_wrap(MODULE, "fd_close", |_: Caller<'_, T>, fd: u32| -> u32 {
        if fd <= 2 {
            errno::SUCCESS
        } else {
            errno::BADF
        }
    })?;
    linker.func_wrap(
        MODULE,
        "fd_fdstat_get",
        |mut caller: Caller<'_, T>, fd: u32, out: u32| -> u32 {
            if fd > 2 {
                return errno::BADF;
            }
            // filetype character_device (2), no flags, all rights.
            let mut stat = [0u8; 24];
            stat[0] = 2;
            stat[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
            stat[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
            status(write(&mut caller, out, &stat))
        },
    )?;
    linker.func_wrap(
        MODULE,
        "fd_fdstat_set_flags",
        |_: Caller<'_, T>, fd: u32, _flags: u32| -> u32 {
            if fd <= 2 {
                errno::SUCCESS
            } else {
                errno::BADF
            }
        },
    )?;
    linker.func_wrap(
        MODULE,
        "fd_filestat_get",
        |mut caller: Caller<'_, T>, fd: u32, out: u32| -> u32 {
            if fd > 2 {
                return errno::BADF;
            }
            let mut stat = [0u8; 64];
            stat[16] = 2;
            status(write(&mut caller, out, &stat))
        },
    )?;
    // No pre-opened directories: libc stops asking at the first EBADF.
    linker.func_wrap(
        MODULE,
        "fd_prestat_get",
        |_: Caller<'_, T>, _fd: u32, _out: u32| -> u32 { errno::BADF },
    )?;
    linker.func_wrap(
        MODULE,
        "fd_prestat_dir_name",
        |_: Caller<'_, T>, _fd: u32, _path: u32, _len: u32| -> u32 { errno::BADF },
    )?;
    // Paths resolve against pre-opened directories, and there are none.
    linker.func_wrap(
        MODULE,
        "path_open",
        |_: Caller<'_, T>,
         _dir: u32,
         _dirflags: u32,
         _path: u32,
         _path_len: u32,
         _oflags: u32,
         _rights: u64,
         _inheriting: u64,
         _fdflags: u32,
         _fd_out: u32|
         -> u32 { errno::BADF },
    )?;
    linker.func_wrap(
        MODULE,
        "path_filestat_get",
        |_: Caller<'_, T>, _dir: u32, _flags: u32, _path: u32, _path_len: u32, _out: u32| -> u32 {
            errno::BADF
        },
    )?;
    linker.func_wrap(
        MODULE,
        "fd_seek",
        |_: Caller<'_, T>, fd: u32, _offset: i64, _whence: u32, _out: u32| -> u32 {
            if fd <= 2 {
                errno::SPIPE
            } else {
                errno::BADF
            }
        },
    )?;
    linker.func_wrap(
        MODULE,
        "proc_exit",
        |_: Caller<'_, T>, code: u32| -> wasmtime::Result<()> {
            Err(wasmtime::Error::new(ProcExit(code as i32)))
        },
    )?;
    linker.func_wrap(
        MODULE,
        "proc_raise",
        |_: Caller<'_, T>, _signal: u32| -> u32 { errno::NOTSUP },
    )?;
    linker.func_wrap(
        MODULE,
        "random_get",
        |mut caller: Caller<'_, T>, buf: u32, len: u32| -> u32 {
            let mut bytes = vec![0u8; len as usize];
            caller.data_mut().random(&mut bytes);
            status(write(&mut caller, buf, &bytes))
        },
    )?;
    linker.func_wrap(MODULE, "sched_yield", |_: Caller<'_, T>| -> u32 {
        errno::SUCCESS
    })?;
    linker.func_wrap(
        MODULE,
        "poll_oneoff",
        |mut caller: Caller<'_, T>, subs: u32, events: u32, count: u32, out: u32| -> u32 {
            poll_oneoff(&mut caller, subs, events, count, out).unwrap_or(errno::FAULT)
        },
    )?;
    Ok(())
}

/// Clock subscriptions only (what `std::thread::sleep` uses): waits for the earliest deadline
/// and reports every clock subscription that is due; fd subscriptions report `EBADF`.
fn poll_oneoff<T: WasiView>(
    caller: &mut Caller<'_, T>,
    subs: u32,
    events: u32,
    count: u32,
    out: u32,
) -> Option<u32> {
    if count == 0 || count > 4096 {
        return Some(errno::INVAL);
    }
    let mut waits = Vec::new();
    for index in 0..count {
        let base = subs.checked_add(index.checked_mul(48)?)?;
        let at = |offset: u32| base.checked_add(offset);
        let userdata = read_u64(caller, base)?;
        let tag = *read(caller, at(8)?, 1)?.first()?;
        if tag == 0 {
            let clock = read_u32(caller, at(16)?)?;
            let timeout = read_u64(caller, at(24)?)?;
            let absolute = read(caller, at(40)?, 1)?.first()? & 1 == 1;
            let now = caller.data_mut().clock_ns(clock).unwrap_or(0);
            let wait = if absolute {
                timeout.saturating_sub(now)
            } else {
                timeout
            };
            waits.push((userdata, Some(wait), tag));
        } else {
            waits.push((userdata, None, tag));
        }
    }
    let shortest = waits.iter().filter_map(|(_, wait, _)| *wait).min();
    if let Some(ns) = shortest {
        caller.data_mut().sleep_ns(ns);
    }
    let mut written = 0u32;
    for (userdata, wait, tag) in waits {
        let due = match wait {
            Some(ns) => Some(ns) <= shortest,
            None => true,
        };
        if !due {
            continue;
        }
        let mut event = [0u8; 32];
        event[0..8].copy_from_slice(&userdata.to_le_bytes());
        let code = if wait.is_some() {
            errno::SUCCESS
        } else {
            errno::BADF
        };
        event[8..10].copy_from_slice(&(code as u16).to_le_bytes());
        event[10] = tag;
        write(
            caller,
            events.checked_add(written.checked_mul(32)?)?,
            &event,
        )?;
        written += 1;
    }
    write_u32(caller, out, written)?;
    Some(errno::SUCCESS)
}

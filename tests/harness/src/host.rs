//! The host process: state shared by every VM (clock, shared data, metrics, logs), and module
//! loading.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::Path;
use std::rc::Rc;
use std::sync::OnceLock;
use std::time::Duration;

use wasmtime::{Config, Engine, Module};

use crate::profile::{HostKind, Profile};
use crate::shared::{SetAttempt, SharedData, SharedEntry, SharedStats};
use crate::util::Rng;
use crate::vm::Vm;
use crate::{HarnessError, LogLevel};

/// 2026-01-01T00:00:00Z: the fake clock's default start, so that a filter never sees a clock
/// near zero.
const DEFAULT_EPOCH_NS: u64 = 1_767_225_600 * 1_000_000_000;

/// One `proxy_log` line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogLine {
    /// Index of the VM that logged.
    pub vm: usize,
    /// The effective context when it logged.
    pub context: u32,
    /// Level.
    pub level: LogLevel,
    /// Message (lossy UTF-8).
    pub message: String,
}

/// Metric type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricKind {
    /// 0
    Counter,
    /// 1
    Gauge,
    /// 2
    Histogram,
}

/// One metric as the host shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Metric {
    /// Name as the host shows it (ngx_wasm_module: with the `pw:<filter>:` prefix).
    pub name: String,
    /// Type.
    pub kind: MetricKind,
    /// Counter/gauge value; for a histogram, the number of recorded values.
    pub value: i64,
}

pub(crate) struct Queue {
    pub name: String,
    pub items: VecDeque<Vec<u8>>,
}

type SetHook = Box<dyn FnMut(&SetAttempt, &mut SharedData)>;

/// State of the host process, shared by its VMs.
pub(crate) struct Process {
    pub profile: Profile,
    pub now_ns: u64,
    pub rng: Rng,
    pub shared: SharedData,
    pub set_hook: Option<SetHook>,
    pub metrics: Vec<Metric>,
    pub metric_ids: HashMap<String, u32>,
    pub logs: Vec<LogLine>,
    pub queues: Vec<Queue>,
    pub next_vm: usize,
}

impl Process {
    pub fn log(&mut self, vm: usize, context: u32, level: LogLevel, message: String) {
        self.logs.push(LogLine {
            vm,
            context,
            level,
            message,
        });
    }

    pub fn define_metric(&mut self, kind: MetricKind, name: &str) -> u32 {
        let full = self.profile.metric_name(name);
        if let Some(&id) = self.metric_ids.get(&full) {
            return id;
        }
        self.metrics.push(Metric {
            name: full.clone(),
            kind,
            value: 0,
        });
        let id = self.metrics.len() as u32;
        self.metric_ids.insert(full, id);
        id
    }

    pub fn metric_mut(&mut self, id: u32) -> Option<&mut Metric> {
        let index = (id as usize).checked_sub(1)?;
        self.metrics.get_mut(index)
    }
}

fn engine() -> Result<&'static Engine, HarnessError> {
    static ENGINE: OnceLock<Result<Engine, String>> = OnceLock::new();
    ENGINE
        .get_or_init(|| {
            let mut config = Config::new();
            // Fuel bounds every guest call, so a loop in the filter fails the test instead of
            // hanging it.
            config.consume_fuel(true);
            Engine::new(&config).map_err(|error| format!("cannot create the engine: {error}"))
        })
        .as_ref()
        .map_err(|message| HarnessError::Load(message.clone()))
}

/// A compiled filter module; cheap to clone, compiled once, instantiated per VM.
#[derive(Clone)]
pub struct Filter {
    pub(crate) module: Module,
    pub(crate) label: String,
}

impl Filter {
    /// Compiles the `.wasm` file at `path`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Filter, HarnessError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|error| {
            HarnessError::Load(format!("cannot read {}: {error}", path.display()))
        })?;
        let mut filter = Filter::from_bytes(&bytes)?;
        filter.label = path.display().to_string();
        Ok(filter)
    }

    /// Compiles a module from its bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Filter, HarnessError> {
        let module = Module::new(engine()?, bytes)
            .map_err(|error| HarnessError::Load(format!("invalid module: {error}")))?;
        Ok(Filter {
            module,
            label: "module".into(),
        })
    }

    /// Every import of the module as `module.name`.
    pub fn imports(&self) -> Vec<String> {
        self.module
            .imports()
            .map(|import| format!("{}.{}", import.module(), import.name()))
            .collect()
    }

    /// Every export name of the module.
    pub fn exports(&self) -> Vec<String> {
        self.module
            .exports()
            .map(|export| export.name().to_string())
            .collect()
    }
}

/// One simulated host process (Envoy or nginx): clock, shared data, metrics and logs shared by
/// all its VMs. Cheap to clone (a handle); single-threaded by design, so interleavings are chosen
/// by the test and are deterministic.
#[derive(Clone)]
pub struct Host {
    pub(crate) process: Rc<RefCell<Process>>,
}

impl Host {
    /// A host playing `profile`, with random seed 0 and the clock at 2026-01-01T00:00:00Z.
    pub fn new(profile: Profile) -> Host {
        Host::with_seed(profile, 0)
    }

    /// A host whose randomness (the guest's `random_get`) comes from `seed`.
    pub fn with_seed(profile: Profile, seed: u64) -> Host {
        let shared = SharedData::new(&profile);
        Host {
            process: Rc::new(RefCell::new(Process {
                profile,
                now_ns: DEFAULT_EPOCH_NS,
                rng: Rng::new(seed),
                shared,
                set_hook: None,
                metrics: Vec::new(),
                metric_ids: HashMap::new(),
                logs: Vec::new(),
                queues: Vec::new(),
                next_vm: 0,
            })),
        }
    }

    /// The profile being played.
    pub fn profile(&self) -> Profile {
        self.process.borrow().profile.clone()
    }

    /// Envoy or ngx_wasm_module.
    pub fn kind(&self) -> HostKind {
        self.process.borrow().profile.kind
    }

    /// A new VM (worker) of this process running `filter`: instantiated, initialized
    /// (`_initialize`/`_start`) and with its root context created. Then call [`Vm::start`] and
    /// [`Vm::configure`], or use [`Host::start_vm`].
    pub fn vm(&self, filter: &Filter) -> Result<Vm, HarnessError> {
        Vm::new(self.clone(), filter)
    }

    /// A new VM, started with an empty VM configuration and configured with `plugin_config`;
    /// [`HarnessError::Rejected`] when the filter refuses either.
    pub fn start_vm(&self, filter: &Filter, plugin_config: &[u8]) -> Result<Vm, HarnessError> {
        let mut vm = self.vm(filter)?;
        vm.start_checked(b"")?;
        vm.configure_checked(plugin_config)?;
        Ok(vm)
    }

    /// Wall-clock time the guest sees, since the Unix epoch.
    pub fn now(&self) -> Duration {
        Duration::from_nanos(self.process.borrow().now_ns)
    }

    /// Moves the fake clock forward.
    pub fn advance(&self, by: Duration) {
        let mut process = self.process.borrow_mut();
        process.now_ns = process
            .now_ns
            .saturating_add(u64::try_from(by.as_nanos()).unwrap_or(u64::MAX));
    }

    /// Sets the fake clock (it may go backwards, as a wall clock can).
    pub fn set_time(&self, since_epoch: Duration) {
        self.process.borrow_mut().now_ns =
            u64::try_from(since_epoch.as_nanos()).unwrap_or(u64::MAX);
    }

    /// Every shared-data entry, sorted by key.
    pub fn shared_data(&self) -> Vec<SharedEntry> {
        self.process.borrow().shared.entries()
    }

    /// Number of shared-data keys held.
    pub fn shared_data_len(&self) -> usize {
        self.process.borrow().shared.len()
    }

    /// The entry a guest reading `key` would get.
    pub fn shared_entry(&self, key: &str) -> Option<SharedEntry> {
        self.process.borrow().shared.peek(key)
    }

    /// Shared-data counters (gets, sets, CAS mismatches, evictions, most keys at once).
    pub fn shared_stats(&self) -> SharedStats {
        self.process.borrow().shared.stats()
    }

    /// Writes a shared-data entry as another process would.
    pub fn put_shared(&self, key: &str, value: &[u8]) -> Result<(), HarnessError> {
        self.process
            .borrow_mut()
            .shared
            .put(key, value)
            .map_err(HarnessError::Usage)
    }

    /// Drops a shared-data entry as another process (or an eviction) would.
    pub fn delete_shared(&self, key: &str) {
        self.process.borrow_mut().shared.delete(key);
    }

    /// A copy of the whole store, to restore later with [`Host::restore_shared`].
    pub fn snapshot_shared(&self) -> SharedData {
        self.process.borrow().shared.clone()
    }

    /// Puts back a copy taken with [`Host::snapshot_shared`].
    pub fn restore_shared(&self, snapshot: SharedData) {
        self.process.borrow_mut().shared = snapshot;
    }

    /// Runs `hook` right before every guest `set_shared_data` is applied (after the guest read
    /// what it based the write on), with the store to change: this is how a test makes another
    /// worker's write land in the middle of a read-modify-write, deterministically.
    pub fn on_guest_set(&self, hook: impl FnMut(&SetAttempt, &mut SharedData) + 'static) {
        self.process.borrow_mut().set_hook = Some(Box::new(hook));
    }

    /// Removes the hook set with [`Host::on_guest_set`].
    pub fn clear_guest_set_hook(&self) {
        self.process.borrow_mut().set_hook = None;
    }

    /// Value of metric `name` as the filter defined it (the profile's prefix is added).
    pub fn metric(&self, name: &str) -> Option<i64> {
        let full = self.process.borrow().profile.metric_name(name);
        self.metric_raw(&full)
    }

    /// Value of a metric by the name the host shows.
    pub fn metric_raw(&self, full_name: &str) -> Option<i64> {
        let process = self.process.borrow();
        let id = *process.metric_ids.get(full_name)?;
        process
            .metrics
            .get((id as usize).checked_sub(1)?)
            .map(|metric| metric.value)
    }

    /// Every metric defined so far.
    pub fn metrics(&self) -> Vec<Metric> {
        self.process.borrow().metrics.clone()
    }

    /// Every log line so far.
    pub fn logs(&self) -> Vec<LogLine> {
        self.process.borrow().logs.clone()
    }

    /// Log lines at `level` or above.
    pub fn logs_at_least(&self, level: LogLevel) -> Vec<LogLine> {
        self.process
            .borrow()
            .logs
            .iter()
            .filter(|line| line.level >= level)
            .cloned()
            .collect()
    }

    /// Forgets the log lines so far.
    pub fn clear_logs(&self) {
        self.process.borrow_mut().logs.clear();
    }

    /// Sets a host-wide property (e.g. `source.address`) by dotted path.
    pub fn set_property(&self, path: &str, value: &[u8]) {
        self.process
            .borrow_mut()
            .profile
            .properties
            .insert(path.into(), value.to_vec());
    }

    /// Items waiting in each shared queue, by queue name.
    pub fn queues(&self) -> BTreeMap<String, usize> {
        self.process
            .borrow()
            .queues
            .iter()
            .map(|queue| (queue.name.clone(), queue.items.len()))
            .collect()
    }
}

//! Bytes held per Service and per endpoint, by component, at the scale of
//! `benches/kube_scale.py` (N ClusterIP Services × 10 endpoints, arriving
//! through the API source's conversion and mirror). Not criterion: a
//! counting global allocator reports the bytes live after each step (and
//! the peak during it). Each step also lists the allocation sizes whose
//! live count it changed most (by bytes): at a million endpoints, a
//! per-endpoint record stands out by its size.
//! Run: cargo bench --features testing --bench memory -- [services] [endpoints]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering::Relaxed};

use ringvip::state::{CompileCache, NodeContext, Store};
use ringvip::telemetry::Metrics;
use ringvip::testing::scale;

/// The system allocator, counting the bytes it holds (requested sizes, not
/// malloc's chunk overhead) and their high-water mark.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);
static PEAK: AtomicIsize = AtomicIsize::new(0);

/// Live allocations by requested size (the last slot: every larger size).
const SIZES: usize = 4097;
static BY_SIZE: [AtomicIsize; SIZES] = [const { AtomicIsize::new(0) }; SIZES];

fn add(n: isize) {
    let now = LIVE.fetch_add(n, Relaxed) + n;
    PEAK.fetch_max(now, Relaxed);
}

fn count(size: usize, n: isize) {
    if let Some(c) = BY_SIZE.get(size.min(SIZES - 1)) {
        c.fetch_add(n, Relaxed);
    }
}

fn by_size() -> Vec<isize> {
    BY_SIZE.iter().map(|c| c.load(Relaxed)).collect()
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        add(l.size() as isize);
        count(l.size(), 1);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        add(-(l.size() as isize));
        count(l.size(), -1);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        add(l.size() as isize);
        count(l.size(), 1);
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        add(new as isize - l.size() as isize);
        count(l.size(), -1);
        count(new, 1);
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static A: Counting = Counting;

/// How many allocation sizes each step lists.
const TOP: usize = 12;

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

struct Step {
    base: isize,
    sizes: Vec<isize>,
}

impl Step {
    fn start() -> Step {
        let base = LIVE.load(Relaxed);
        PEAK.store(base, Relaxed);
        Step {
            base,
            sizes: by_size(),
        }
    }

    /// Prints the bytes this step left live and its peak, per Service and
    /// per endpoint.
    fn report(self, what: &str, services: f64, endpoints: f64) -> isize {
        let live = LIVE.load(Relaxed) - self.base;
        let peak = PEAK.load(Relaxed) - self.base;
        let mib = |b: isize| b as f64 / (1 << 20) as f64;
        println!(
            "{what:<44} live {:>9.1} MiB ({:>7.0} B/Service, {:>6.0} B/endpoint)  peak +{:>8.1} MiB  RSS {:>6} MiB",
            mib(live),
            live as f64 / services,
            live as f64 / endpoints,
            mib(peak),
            rss_kib() / 1024
        );
        // The sizes this step changed most, by bytes (sizes above 4 KiB
        // together, counted as 4 KiB each: the total above is exact).
        let mut delta: Vec<(usize, isize)> = by_size()
            .iter()
            .zip(&self.sizes)
            .enumerate()
            .map(|(size, (now, before))| (size, now - before))
            .filter(|(_, n)| *n != 0)
            .collect();
        delta.sort_by_key(|(size, n)| -(n * *size as isize).abs());
        for (size, n) in delta.iter().take(TOP) {
            let more = if *size == SIZES - 1 { "+" } else { "" };
            println!(
                "    {:>9} x {size:>4}{more} B = {:>8.1} MiB ({:>6.1} per Service)",
                n,
                (n * *size as isize) as f64 / (1 << 20) as f64,
                *n as f64 / services
            );
        }
        live
    }
}

fn main() {
    let args: Vec<u32> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let services = args.first().copied().unwrap_or(100_000);
    let per = args.get(1).copied().unwrap_or(10);
    let (ns, ne) = (f64::from(services), f64::from(services * per));
    println!("{services} Services x {per} endpoints (benches/kube_scale.py's objects)");

    let step = Step::start();
    let listed = scale::list(services, per);
    let total_list = step.report("API source: mirror + first Reset (list)", ns, ne);
    let step = Step::start();
    let mut updates = listed.updates;
    let mirror = listed.mirror;
    let mut store = Store::new();
    for u in updates.drain(..) {
        store.apply(u);
    }
    drop(updates);
    let store_delta = step.report("store: Reset applied (Reset dropped)", ns, ne);
    println!(
        "{:<44} live {:>9.1} MiB ({:>7.0} B/Service, {:>6.0} B/endpoint)",
        "  = store objects",
        (total_list + store_delta) as f64 / (1 << 20) as f64,
        (total_list + store_delta) as f64 / ns,
        (total_list + store_delta) as f64 / ne
    );
    let step = Step::start();
    drop(mirror);
    step.report("API source: mirror dropped", ns, ne);
    let ctx = NodeContext {
        node_name: "node-a".into(),
        ..NodeContext::default()
    };
    let metrics = Metrics::new();
    let mut cache = CompileCache::default();
    let step = Step::start();
    let t = std::time::Instant::now();
    let snap = store.compile_with(&ctx, &metrics, 1, &mut cache);
    let took = t.elapsed();
    step.report("compile: snapshot + cache + endpoint series", ns, ne);
    println!(
        "  (first compile took {took:?}, {} frontends)",
        snap.frontend_count()
    );
    // What the heap holds free after the first compile, in pages glibc
    // kept: RSS before and after handing them back.
    let before = rss_kib() / 1024;
    // SAFETY: malloc_trim takes no pointer; it walks the allocator's own lists.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::malloc_trim(0);
    }
    println!(
        "  (RSS {before} MiB, {} MiB after malloc_trim)",
        rss_kib() / 1024
    );
    let step = Step::start();
    let text = metrics.encode();
    let n = text.len();
    drop(text);
    step.report("one scrape (freed after)", ns, ne);
    println!("  (scrape text {} MiB)", n >> 20);
    let step = Step::start();
    drop(snap);
    step.report("snapshot dropped (the cache keeps its parts)", ns, ne);
    let step = Step::start();
    drop(cache);
    step.report("cache dropped (endpoint series go)", ns, ne);
    let step = Step::start();
    drop(store);
    step.report("store dropped", ns, ne);
}

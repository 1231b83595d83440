//! What the timing examples share: this thread's CPU clock and a best-of-rounds timer.

#[repr(C)]
struct Timespec {
    sec: i64,
    nsec: i64,
}

extern "C" {
    fn clock_gettime(clock: i32, out: *mut Timespec) -> i32;
}

/// This thread's CPU time in ns (CLOCK_THREAD_CPUTIME_ID): less moved by other jobs than wall
/// time on a shared machine.
pub fn cpu_ns() -> f64 {
    let mut t = Timespec { sec: 0, nsec: 0 };
    // SAFETY: `t` is a valid out-pointer; 3 is CLOCK_THREAD_CPUTIME_ID on Linux.
    unsafe { clock_gettime(3, &mut t) };
    t.sec as f64 * 1e9 + t.nsec as f64
}

/// Best of 7 rounds of `n` calls of `f`, in CPU ns per call, and the sum of what `f` returned
/// (kept, so that the calls are not optimised away).
pub fn best_of<T: std::ops::AddAssign + Default>(n: usize, mut f: impl FnMut() -> T) -> (f64, T) {
    let mut best = f64::INFINITY;
    let mut acc = T::default();
    for _ in 0..7 {
        let start = cpu_ns();
        for _ in 0..n {
            acc += f();
        }
        best = best.min((cpu_ns() - start) / n as f64);
    }
    (best, std::hint::black_box(acc))
}

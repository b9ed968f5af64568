//! The wall clock, read here and nowhere else: Unix milliseconds now, and whether the kernel
//! says the clock is synchronised (NTP, systemd-timesyncd, chrony), which is how outpost knows
//! that a Pi without a real-time clock has the date right.

/// Wall-clock Unix milliseconds now (0 before 1970, which no real clock reads).
pub fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis().min(i64::MAX as u128) as i64)
}

/// Whether the kernel's clock discipline says the time is synchronised: `adjtimex` answers
/// `TIME_ERROR` while no time daemon has set it (STA_UNSYNC).
pub fn kernel_synced() -> bool {
    // SAFETY: adjtimex with modes = 0 only reads; the struct is zeroed and owned here.
    let state = unsafe {
        let mut t: libc::timex = std::mem::zeroed();
        libc::adjtimex(&mut t)
    };
    state >= 0 && state != libc::TIME_ERROR
}

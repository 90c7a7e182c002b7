//! How much memory this process holds, as the kernel counts it: what a
//! bound on memory is checked against.

/// The most resident memory this process has held since it started
/// (`VmHWM` of `/proc/self/status`), in bytes; `None` where the system does
/// not report it.
pub fn peak_rss_bytes() -> Option<u64> {
    status_field("VmHWM:")
}

/// Resident memory now (`VmRSS`), in bytes.
pub fn rss_bytes() -> Option<u64> {
    status_field("VmRSS:")
}

/// Buffers of this size and more get mappings of their own from the C
/// allocator.
const OWN_MAPPING_BYTES: i32 = 1 << 20;

/// Has the C allocator serve every buffer of 1 MiB or more from a mapping of
/// its own, so that freeing it gives the memory back to the system at once.
/// glibc's default starts there too but raises the threshold, up to 32 MiB,
/// each time such a buffer is freed; a streaming client frees tensors of a
/// few MB to tens of MB on every layer it decodes, which then stay in the
/// allocator's heaps, and its RSS creeps past what its flags allow (56 to
/// 73 MB over on TinyLlama-1.1B in f16 streamed under 512 MiB budgets).
/// Call it first thing in `main`; a no-op beside glibc.
pub fn return_large_frees_to_the_system() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` only sets an allocator parameter; glibc takes the
    // allocator's lock for it, so it is sound whatever other threads do.
    #[allow(unsafe_code)]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, OWN_MAPPING_BYTES);
    }
}

fn status_field(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_kib_field(&status, field)
}

/// The value of a `Field:   1234 kB` line, in bytes.
fn parse_kib_field(status: &str, field: &str) -> Option<u64> {
    let line = status.lines().find(|line| line.starts_with(field))?;
    let kib: u64 = line[field.len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kib_fields_are_read_in_bytes() {
        let status = "Name:\tsurf\nVmPeak:\t  900 kB\nVmHWM:\t   12345 kB\nVmRSS:\t 100 kB\n";
        assert_eq!(parse_kib_field(status, "VmHWM:"), Some(12345 * 1024));
        assert_eq!(parse_kib_field(status, "VmRSS:"), Some(100 * 1024));
        assert_eq!(parse_kib_field(status, "VmSwap:"), None);
    }

    #[test]
    fn this_process_reports_a_peak_at_least_its_current_size_on_linux() {
        if !cfg!(target_os = "linux") {
            return;
        }
        let now = rss_bytes().expect("VmRSS on Linux");
        let peak = peak_rss_bytes().expect("VmHWM on Linux");
        assert!(now > 0 && peak >= now, "rss {now}, peak {peak}");
    }
}

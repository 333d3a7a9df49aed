//! The kernel's two spellings of a CPU set: the list form (`0-3,8,10-11`) used by
//! `online`, `cpulist`, `thread_siblings_list` and `smp_affinity_list`, and the hex
//! mask form (`ff,ffffffff`) used by `smp_affinity`.
//!
//! Parsing is strict (any garbage gives `None`) so that a corrupt file degrades to
//! "unknown" rather than to a wrong CPU set, and bounded so that a hostile
//! `0-4294967295` cannot make us allocate gigabytes.

/// Highest CPU number we accept. The kernel's own `NR_CPUS` maximum is 8192.
pub const MAX_CPU: u32 = 8191;

/// Parses the list form. An empty (or all-whitespace) string is the empty set, which
/// is how the kernel spells e.g. a memory-only NUMA node.
pub fn parse_list(text: &str) -> Option<Vec<u32>> {
    let text = text.trim();
    let mut out = Vec::new();
    if text.is_empty() {
        return Some(out);
    }
    for part in text.split(',') {
        let part = part.trim();
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (a.trim().parse::<u32>().ok()?, b.trim().parse::<u32>().ok()?),
            None => {
                let n = part.parse::<u32>().ok()?;
                (n, n)
            }
        };
        if lo > hi || hi > MAX_CPU {
            return None;
        }
        out.extend(lo..=hi);
    }
    out.sort_unstable();
    out.dedup();
    Some(out)
}

/// Parses the hex mask form: comma-separated 32-bit groups, most significant first.
pub fn parse_mask(text: &str) -> Option<Vec<u32>> {
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    let groups: Vec<&str> = text.split(',').collect();
    if groups.len() > (MAX_CPU as usize + 1) / 32 {
        return None;
    }
    let mut out = Vec::new();
    for (i, group) in groups.iter().rev().enumerate() {
        let bits = u32::from_str_radix(group.trim(), 16).ok()?;
        for bit in 0..32 {
            if bits & (1 << bit) != 0 {
                out.push(i as u32 * 32 + bit);
            }
        }
    }
    Some(out)
}

/// Formats a set in the list form, compressing runs (`0-3,8`). Input order and
/// duplicates do not matter.
pub fn format_list(cpus: &[u32]) -> String {
    let mut sorted = cpus.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut parts = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            i += 1;
            end = sorted[i];
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    parts.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_round_trip() {
        assert_eq!(
            parse_list("0-3,8,10-11\n"),
            Some(vec![0, 1, 2, 3, 8, 10, 11])
        );
        assert_eq!(format_list(&[11, 0, 1, 2, 3, 8, 10, 3]), "0-3,8,10-11");
        assert_eq!(parse_list(""), Some(vec![]));
        assert_eq!(parse_list("0,32"), Some(vec![0, 32]));
    }

    #[test]
    fn list_rejects_garbage() {
        assert_eq!(parse_list("abc"), None);
        assert_eq!(parse_list("3-1"), None);
        assert_eq!(parse_list("0-4294967295"), None);
        assert_eq!(parse_list("1,,2"), None);
    }

    #[test]
    fn mask() {
        assert_eq!(parse_mask("3\n"), Some(vec![0, 1]));
        assert_eq!(parse_mask("00000001,00000000"), Some(vec![32]));
        assert_eq!(parse_mask("zz"), None);
        assert_eq!(parse_mask(""), None);
    }
}

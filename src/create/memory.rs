//! The memory limit a proxied container gets: the user's request plus the proxy's
//! additional allocation.

/// The user's requested memory and what the container gets. No limit stays no limit;
/// swap (memory+swap in runc terms) is raised with the limit and never left below it.
pub fn raise_memory(
    limit: Option<i64>,
    swap: Option<i64>,
    additional: u64,
) -> (Option<u64>, Option<i64>, Option<i64>) {
    match limit.filter(|l| *l > 0) {
        None => (None, limit, swap),
        Some(l) => {
            let additional = i64::try_from(additional).unwrap_or(i64::MAX);
            let new_limit = l.saturating_add(additional);
            let new_swap = match swap {
                Some(s) if s > 0 => Some(s.saturating_add(additional).max(new_limit)),
                other => other,
            };
            (Some(l.unsigned_abs()), Some(new_limit), new_swap)
        }
    }
}

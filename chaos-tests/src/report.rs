//! A readable summary of a run, for a person.

use crate::run::Report;

pub fn summary(r: &Report) -> String {
    let verdict = match (r.passed, r.expected_violations) {
        (true, false) => "PASS: no violations",
        (true, true) => "PASS: the checker caught the deliberately broken variant",
        (false, false) => "FAIL: invariant violations",
        (false, true) => "FAIL: the broken variant was NOT caught",
    };
    let faults = if r.faults.is_empty() {
        "none".to_owned()
    } else {
        r.faults
            .iter()
            .map(|(k, v)| format!("{k} x{v}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut out = format!(
        "scenario  {} ({} mode, seed {})\n          {}\nruntime   {:.1}s, coordinator started {} times, quiet {} ms after healing\n\
         requests  {} attempted: {} acknowledged ({} held for review), {} failed {:?}, {} unknown ({} resolved by replaying their keys), {} retries\n\
         faults    {}\nmid-run   {} totals readings, {} inconsistent (in-flight, reported only), {} unreadable\n\
         events    {} in the stream, checked against the outboxes and the clients' history\n\
         verdict   {} ({} violations)\n",
        r.scenario,
        r.lock_mode,
        r.seed,
        r.about,
        r.duration_s,
        r.coordinator_starts,
        r.heal_to_quiet_ms,
        r.operations.attempted,
        r.operations.acknowledged,
        r.operations.held,
        r.operations.failed,
        r.operations.failed_by_code,
        r.operations.unknown,
        r.resolved_by_replay,
        r.operations.retries,
        faults,
        r.mid_run.readings,
        r.mid_run.inconsistent,
        r.mid_run.unreadable,
        r.events_in_stream,
        verdict,
        r.violations.len(),
    );
    for v in r.violations.iter().take(10) {
        out.push_str(&format!("  - {v}\n"));
    }
    out
}

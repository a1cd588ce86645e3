//! The scenarios: which faults a run injects, and whether the checker is expected
//! to find violations (only the deliberately broken variants).

use std::time::Duration;

use rand::rngs::StdRng;
use rand::Rng;

/// A fault the injector can apply once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    KillCoordinator,
    KillShard,
    PauseShard,
    Partition,
    DropLinks,
    SlowLinks,
}

impl Fault {
    pub const ALL: [Fault; 6] = [
        Fault::KillCoordinator,
        Fault::KillShard,
        Fault::PauseShard,
        Fault::Partition,
        Fault::DropLinks,
        Fault::SlowLinks,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::KillCoordinator => "kill-coordinator",
            Fault::KillShard => "kill-shard",
            Fault::PauseShard => "pause-shard",
            Fault::Partition => "partition",
            Fault::DropLinks => "drop-links",
            Fault::SlowLinks => "slow-links",
        }
    }

    /// How long the fault lasts before it is undone.
    pub fn hold(self, rng: &mut StdRng) -> Duration {
        let ms = match self {
            Fault::KillCoordinator => rng.gen_range(100..400),
            Fault::KillShard => rng.gen_range(300..1_500),
            Fault::PauseShard | Fault::Partition | Fault::SlowLinks => rng.gen_range(800..2_500),
            Fault::DropLinks => rng.gen_range(200..800),
        };
        Duration::from_millis(ms)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A 2PC failpoint armed to abort the coordinator process now and then.
    Failpoint(&'static str),
    /// One kind of fault, again and again.
    Repeat(Fault),
    /// A seeded mix of every fault.
    Random,
    /// A deliberately broken coordinator: the checker must report violations.
    Broken {
        bug: &'static str,
        provoke: &'static str,
    },
}

#[derive(Clone, Debug)]
pub struct Scenario {
    pub name: String,
    pub kind: Kind,
    pub about: String,
}

/// Probability, in percent, that an armed 2PC failpoint aborts the process on a hit.
const ABORT_PERCENT: u32 = 2;
/// After this many aborts the coordinator is restarted without the failpoint.
pub const FAILPOINT_CRASHES_MAX: u32 = 4;

impl Scenario {
    pub fn expect_violations(&self) -> bool {
        matches!(self.kind, Kind::Broken { .. })
    }

    /// FAILPOINTS for the coordinator while faults run (after `crashes` aborts).
    pub fn failpoints_running(&self, crashes: u32) -> String {
        match &self.kind {
            Kind::Failpoint(name) if crashes < FAILPOINT_CRASHES_MAX => {
                format!("{name}={ABORT_PERCENT}%return(abort)")
            }
            Kind::Broken { bug, provoke } => format!("{bug}=return;{provoke}"),
            _ => String::new(),
        }
    }

    /// FAILPOINTS for the coordinator after healing: clean, except that a broken
    /// variant stays broken (its bug is what the checker must find).
    pub fn failpoints_healed(&self) -> String {
        match &self.kind {
            Kind::Broken { bug, .. } => format!("{bug}=return"),
            _ => String::new(),
        }
    }
}

pub fn all() -> Vec<Scenario> {
    let mut out = Vec::new();
    for name in coordinator::two_pc::FAILPOINTS {
        out.push(Scenario {
            name: format!("failpoint:{name}"),
            kind: Kind::Failpoint(name),
            about: format!("the coordinator process aborts at {name} ({ABORT_PERCENT}% of hits) and is restarted"),
        });
    }
    for fault in Fault::ALL {
        let about = match fault {
            Fault::KillCoordinator => "kill -9 of the coordinator at random moments, then restart",
            Fault::KillShard => "kill -9 of a shard's postmaster, then restart",
            Fault::PauseShard => "SIGSTOP a shard's processes, then SIGCONT",
            Fault::Partition => "black-hole the link to a shard (packets vanish), then heal",
            Fault::DropLinks => "reset every connection to a shard and refuse new ones, then heal",
            Fault::SlowLinks => "delay every chunk to and from a shard by 20-100 ms",
        };
        out.push(Scenario {
            name: fault.name().into(),
            kind: Kind::Repeat(fault),
            about: about.into(),
        });
    }
    out.push(Scenario {
        name: "random".into(),
        kind: Kind::Random,
        about: "a seeded mix of every fault above".into(),
    });
    out.extend([
        Scenario {
            name: "broken:recovery-off".into(),
            kind: Kind::Broken {
                bug: "broken-recovery-off",
                provoke: "2pc-after-prepare-all=3%return(abort)",
            },
            about: "BROKEN on purpose: recovery never runs; crashes leave prepared transactions"
                .into(),
        },
        Scenario {
            name: "broken:commit-unprepared".into(),
            kind: Kind::Broken {
                bug: "broken-commit-unprepared",
                provoke: "",
            },
            about: "BROKEN on purpose: commit is decided even when a prepare failed".into(),
        },
        Scenario {
            name: "broken:skip-idempotency".into(),
            kind: Kind::Broken {
                bug: "broken-skip-idempotency",
                provoke: "2pc-before-reply=5%return",
            },
            about: "BROKEN on purpose: the Idempotency-Key is ignored, and some replies are lost"
                .into(),
        },
    ]);
    out
}

pub fn find(name: &str) -> Option<Scenario> {
    all().into_iter().find(|s| s.name == name)
}

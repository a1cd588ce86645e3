//! The scenarios: which faults a run injects, and whether the checker is expected
//! to find violations (only the deliberately broken variants).

use std::time::Duration;

use rand::rngs::StdRng;
use rand::Rng;

use coordinator::config::LockMode;
use shard_agent::rules::{Action, Condition, FraudRule, WalletRules};
use shard_agent::Currency;

/// A fault the injector can apply once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    KillCoordinator,
    KillShard,
    PauseShard,
    Partition,
    DropLinks,
    SlowLinks,
    /// Redis-lock mode: kill -9 of redis-server (every lock is lost), then restart.
    KillRedis,
    /// kill -9 of nats-server, the relay's broker, then restart: events wait
    /// in the outbox meanwhile, and transfers must not notice.
    KillBroker,
    /// A few users' account rows held by a transaction outside the wallet (as an
    /// in-doubt leg or a slow statement would), then released.
    HoldRows,
}

impl Fault {
    pub const ALL: [Fault; 9] = [
        Fault::KillCoordinator,
        Fault::KillShard,
        Fault::PauseShard,
        Fault::Partition,
        Fault::DropLinks,
        Fault::SlowLinks,
        Fault::KillRedis,
        Fault::KillBroker,
        Fault::HoldRows,
    ];

    /// The faults that make sense in `mode` (no Redis to kill in 2PC mode).
    pub fn for_mode(mode: LockMode) -> Vec<Fault> {
        Fault::ALL
            .into_iter()
            .filter(|f| *f != Fault::KillRedis || mode == LockMode::Redis)
            .collect()
    }

    pub fn name(self) -> &'static str {
        match self {
            Fault::KillCoordinator => "kill-coordinator",
            Fault::KillShard => "kill-shard",
            Fault::PauseShard => "pause-shard",
            Fault::Partition => "partition",
            Fault::DropLinks => "drop-links",
            Fault::SlowLinks => "slow-links",
            Fault::KillRedis => "kill-redis",
            Fault::KillBroker => "kill-broker",
            Fault::HoldRows => "hold-rows",
        }
    }

    /// How long the fault lasts before it is undone.
    pub fn hold(self, rng: &mut StdRng) -> Duration {
        let ms = match self {
            Fault::KillCoordinator => rng.gen_range(100..400),
            Fault::KillShard | Fault::KillRedis => rng.gen_range(300..1_500),
            Fault::PauseShard | Fault::Partition | Fault::SlowLinks | Fault::HoldRows => {
                rng.gen_range(800..2_500)
            }
            Fault::DropLinks => rng.gen_range(200..800),
            Fault::KillBroker => rng.gen_range(500..3_000),
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
    /// A failpoint armed (FAILPOINTS syntax) for the whole run, e.g. stalls.
    Stall { armed: &'static str },
    /// Buckets move back and forth between shards all run long (a mover
    /// process, kill -9'd at random moments and started again), with every
    /// other fault as well when `faults`.
    Rebalance { faults: bool },
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
            Kind::Stall { armed } => (*armed).to_owned(),
            Kind::Broken { bug, provoke: "" } => format!("{bug}=return"),
            Kind::Broken { bug, provoke } => format!("{bug}=return;{provoke}"),
            _ => String::new(),
        }
    }

    /// The wallet's rules the run's coordinator enforces: a daily limit every
    /// busy client reaches within a run, so limits are checked and consumed
    /// under every fault (the broken limit variant gets a lower one, reached
    /// while other transfers of the same payer are in flight), and a review
    /// rule that holds the larger transfers.
    pub fn rules(&self) -> WalletRules {
        let limit = match self.kind {
            Kind::Broken {
                bug: BROKEN_LIMIT, ..
            } => "40.00",
            _ => "300.00",
        };
        WalletRules {
            daily_limits: [(Currency::Usd, limit.parse().expect("static amount"))].into(),
            // About one transfer in eight is held for review, and the admin
            // in the workload releases or rejects some of them.
            fraud_rules: vec![FraudRule {
                name: "large".into(),
                action: Action::Review,
                condition: Condition::Amount {
                    over: [(Currency::Usd, "35.00".parse().expect("static amount"))].into(),
                },
            }],
            ..WalletRules::default()
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

/// The scenarios of `mode`: its protocol's failpoints, the faults, a random mix,
/// and the broken variants; Redis-lock mode adds lock expiry.
pub fn all(mode: LockMode) -> Vec<Scenario> {
    let mut out = Vec::new();
    let failpoints: Vec<&'static str> = match mode {
        LockMode::TwoPc => coordinator::batch::FAILPOINTS.to_vec(),
        LockMode::Redis => coordinator::batch::REDIS_FAILPOINTS.to_vec(),
    };
    for name in failpoints {
        out.push(Scenario {
            name: format!("failpoint:{name}"),
            kind: Kind::Failpoint(name),
            about: format!("the coordinator process aborts at {name} ({ABORT_PERCENT}% of hits) and is restarted"),
        });
    }
    for fault in Fault::for_mode(mode) {
        let about = match fault {
            Fault::KillCoordinator => "kill -9 of the coordinator at random moments, then restart",
            Fault::KillShard => "kill -9 of a shard's postmaster, then restart",
            Fault::PauseShard => "SIGSTOP a shard's processes, then SIGCONT",
            Fault::Partition => "black-hole the link to a shard (packets vanish), then heal",
            Fault::DropLinks => "reset every connection to a shard and refuse new ones, then heal",
            Fault::SlowLinks => "delay every chunk to and from a shard by 20-100 ms",
            Fault::KillRedis => "kill -9 of redis-server (every lock lost), then restart",
            Fault::KillBroker => "kill -9 of nats-server (events wait in the outbox), then restart",
            Fault::HoldRows => {
                "hold 3 random users' account rows in an open transaction, then roll back"
            }
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
    out.push(Scenario {
        name: "rebalance".into(),
        kind: Kind::Rebalance { faults: false },
        about: "buckets move between shards all run long; the mover is kill -9'd at random moments and resumed".into(),
    });
    out.push(Scenario {
        name: "rebalance-random".into(),
        kind: Kind::Rebalance { faults: true },
        about: "rebalance, plus a seeded mix of every fault above (coordinators, shards, links)"
            .into(),
    });
    if mode == LockMode::Redis {
        out.push(Scenario {
            name: "lock-expiry".into(),
            kind: Kind::Stall { armed: STALL_ARMED },
            about: "some lock holders stall past their lock's TTL; fencing must stop their writes"
                .into(),
        });
        out.push(Scenario {
            name: "broken:skip-fence".into(),
            kind: Kind::Broken {
                bug: "broken-skip-fence",
                provoke: STALL_ARMED,
            },
            about:
                "BROKEN on purpose: writes ignore fencing tokens while holders stall past their TTL"
                    .into(),
        });
    }
    // Each broken variant is provoked with its own protocol's failpoints.
    let (crash, lose_reply) = match mode {
        LockMode::TwoPc => (
            // Fires with every shard but the deciding one prepared.
            "batch-after-prepare=3%return(abort)",
            "batch-before-reply=5%return",
        ),
        LockMode::Redis => (
            "redis-between-legs=3%return(abort)",
            "redis-before-reply=5%return",
        ),
    };
    out.push(Scenario {
        name: "broken:recovery-off".into(),
        kind: Kind::Broken {
            bug: "broken-recovery-off",
            provoke: crash,
        },
        about: "BROKEN on purpose: recovery never runs; crashes leave work unfinished".into(),
    });
    if mode == LockMode::TwoPc {
        out.push(Scenario {
            name: "broken:commit-unprepared".into(),
            kind: Kind::Broken {
                bug: "broken-commit-unprepared",
                provoke: "shard-before-prepare-transaction=5%return",
            },
            about: "BROKEN on purpose: commit is decided even when a prepare failed".into(),
        });
    }
    out.push(Scenario {
        name: "broken:limit-outside-check".into(),
        kind: Kind::Broken {
            bug: BROKEN_LIMIT,
            provoke: "",
        },
        about: "BROKEN on purpose: the daily limit is read before a transfer is queued, \
                not checked in its transaction"
            .into(),
    });
    out.push(Scenario {
        name: "broken:skip-idempotency".into(),
        kind: Kind::Broken {
            bug: "broken-skip-idempotency",
            provoke: lose_reply,
        },
        about: "BROKEN on purpose: the Idempotency-Key is ignored, and some replies are lost"
            .into(),
    });
    out
}

pub fn find(mode: LockMode, name: &str) -> Option<Scenario> {
    all(mode).into_iter().find(|s| s.name == name)
}

/// The failpoint of the broken daily limit (`shard_agent::batch`).
const BROKEN_LIMIT: &str = "broken-limit-outside-check";

/// 5% of lock holders stall 1.5 s: past the lock TTL (0.8 s), short of
/// `in_doubt_after` (at least 2 s), so fencing is what must stop them.
const STALL_ARMED: &str = "redis-stall-after-lock=5%return(1500)";

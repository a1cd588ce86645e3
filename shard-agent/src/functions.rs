//! The shard's SQL functions: one file per function in `sql/shard/functions/`,
//! embedded at build time and applied after the migrations.
//!
//! Migrations hold tables, indexes and data: they are versioned and each runs
//! once. Functions are code: each file holds the one live definition of its
//! function, and the whole set is applied again whenever a shard holds another
//! set. A shard records the set it runs in `wallet_functions` (migration V12):
//! [`VERSION`], the [`checksum`] of the files, and a digest of the definitions
//! PostgreSQL holds right after the apply.
//!
//! - [`apply`], called by `migrate_shard`, installs this build's functions
//!   unless the shard already runs them. It refuses to replace the functions of
//!   a newer build ([`ApplyError::Newer`]), so an older coordinator started late
//!   cannot downgrade a shard under a newer one.
//! - [`check`] compares a shard's stamp, and its live definitions, with this
//!   build's. The shard agent runs it on every connection before its first use
//!   ([`crate::ShardError::FunctionsMismatch`]), so a coordinator never runs
//!   against functions of another version, nor against functions edited by hand.

use std::fmt;
use std::sync::OnceLock;

use sha2::{Digest, Sha256};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, IsolationLevel, SimpleQueryMessage};

/// The version of the function files. Raise it by one whenever any file in
/// `sql/shard/functions/` changes, and pin the new checksum in the test
/// `the_version_pins_the_files` (which fails until both are done): a shard
/// stamped with a higher version belongs to a newer build, which this one then
/// refuses to downgrade or to run against.
pub const VERSION: i32 = 22;

/// One function's file.
#[derive(Clone, Copy, Debug)]
pub struct FunctionFile {
    /// The function's name, which is also the file's stem.
    pub name: &'static str,
    pub sql: &'static str,
}

macro_rules! function_file {
    ($name:literal) => {
        FunctionFile {
            name: $name,
            sql: include_str!(concat!("../../sql/shard/functions/", $name, ".sql")),
        }
    };
}

/// Every function file, in the order they are applied: each before its
/// callers. PL/pgSQL resolves the functions a body calls when it runs, so the
/// order is for the reader.
pub const FILES: &[FunctionFile] = &[
    function_file!("wallet_own"),
    function_file!("wallet_serves"),
    function_file!("wallet_tombstone"),
    function_file!("wallet_first_failure"),
    function_file!("wallet_key_answer"),
    function_file!("wallet_fraud_check"),
    function_file!("wallet_batch_check"),
    function_file!("wallet_post"),
    function_file!("wallet_batch_apply"),
    function_file!("wallet_batch_decide"),
    function_file!("wallet_batch_local"),
    function_file!("wallet_redis_debit"),
    function_file!("wallet_redis_credit"),
    function_file!("wallet_dispute_open"),
    function_file!("wallet_dispute_reject"),
    function_file!("wallet_hold_end"),
];

/// SHA-256 (hex) over the names and texts of [`FILES`], in their order. Each
/// part is preceded by its length, so no two different sets hash alike.
pub fn checksum() -> &'static str {
    static CHECKSUM: OnceLock<String> = OnceLock::new();
    CHECKSUM.get_or_init(|| {
        let mut hash = Sha256::new();
        for file in FILES {
            for part in [file.name, file.sql] {
                hash.update((part.len() as u64).to_be_bytes());
                hash.update(part.as_bytes());
            }
        }
        hex::encode(hash.finalize())
    })
}

/// Which set of functions a shard runs, or a build carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stamp {
    pub version: i32,
    pub checksum: String,
}

impl Stamp {
    /// The set this build carries.
    pub fn compiled() -> Stamp {
        Stamp {
            version: VERSION,
            checksum: checksum().to_owned(),
        }
    }
}

impl fmt::Display for Stamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "version {} (checksum {})", self.version, self.checksum)
    }
}

/// What a shard holds instead of this build's functions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Found {
    /// No functions were ever applied: the shard is not migrated.
    Nothing,
    /// Another build's functions.
    Other(Stamp),
    /// This build's stamp, but a function was created, replaced or dropped
    /// since the apply, by hand: the shard no longer runs what the stamp says.
    Edited(Stamp),
}

impl fmt::Display for Found {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Found::Nothing => write!(f, "no functions applied"),
            Found::Other(stamp) => write!(f, "{stamp}"),
            Found::Edited(stamp) => write!(f, "{stamp}, edited since it was applied"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// A newer coordinator applied its functions: replacing them with this
    /// build's older ones would break it, so this build must not run here.
    #[error(
        "the shard runs SQL functions {applied}, newer than this build's {ours}; \
         refusing to replace them with older ones"
    )]
    Newer { applied: Stamp, ours: Stamp },
    /// Two builds carry different files under one version (a file changed
    /// without raising [`VERSION`]): there is no telling which is right.
    #[error(
        "the shard runs SQL functions {applied}, this build has other files under the \
         same version ({ours}); refusing to guess which is right"
    )]
    SameVersion { applied: Stamp, ours: Stamp },
    #[error("{context}: {detail}")]
    Sql {
        context: String,
        /// SQLSTATE and server message (the driver's own Display says only "db error").
        detail: String,
        #[source]
        source: tokio_postgres::Error,
    },
}

/// What [`apply`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Applied {
    /// The shard already ran this build's functions, untouched.
    Unchanged,
    /// This build's functions replaced `previous` (`None`: a new shard).
    Installed { previous: Option<Stamp> },
    /// The stamp was this build's, but a function had been edited by hand:
    /// every function was applied again.
    Repaired,
}

/// The single-key advisory lock (the bytes "WLFUNC") an apply holds for its
/// transaction. Single-key locks never collide with the protocol's two-key ones.
const APPLY_LOCK: i64 = 0x574c_4655_4e43;

/// SHA-256 (hex) of the definitions of every function in the public schema,
/// which this crate owns (functions that belong to an extension excepted). Any
/// change a hand could make, a body, a setting, an extra overload or a dropped
/// function, changes it.
const LIVE_DIGEST: &str = "(SELECT encode(sha256(convert_to(coalesce(string_agg(\
         pg_get_functiondef(p.oid), E'\\n' \
         ORDER BY p.proname, pg_get_function_identity_arguments(p.oid)), ''), 'UTF8')), 'hex') \
     FROM pg_proc p \
     WHERE p.pronamespace = 'public'::regnamespace AND p.prokind = 'f' \
       AND NOT EXISTS (SELECT 1 FROM pg_depend d \
                        WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid \
                          AND d.deptype = 'e'))";

/// Drops every function [`LIVE_DIGEST`] covers, so that after the files run the
/// shard holds exactly their functions: no overload a changed signature left
/// behind, no function a newer set no longer has.
const DROP_ALL: &str = "DO $$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN
        SELECT p.oid::regprocedure FROM pg_proc p
         WHERE p.pronamespace = 'public'::regnamespace AND p.prokind = 'f'
           AND NOT EXISTS (SELECT 1 FROM pg_depend d
                            WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid
                              AND d.deptype = 'e')
    LOOP
        EXECUTE format('DROP FUNCTION %s', f);
    END LOOP;
END
$$";

/// Installs this build's functions on a migrated shard unless it already runs
/// them, in one transaction under [`APPLY_LOCK`]: two coordinators starting
/// together apply once, and the second finds the first's stamp.
pub async fn apply(client: &mut Client) -> Result<Applied, ApplyError> {
    let ours = Stamp::compiled();
    // Read committed whatever the database's default: after waiting for the
    // lock, the stamp read must see what the holder committed.
    let txn = client
        .build_transaction()
        .isolation_level(IsolationLevel::ReadCommitted)
        .start()
        .await
        .map_err(sql("begin"))?;
    txn.execute("SELECT pg_advisory_xact_lock($1)", &[&APPLY_LOCK])
        .await
        .map_err(sql("take the apply lock"))?;
    let row = txn
        .query_opt(
            &format!("SELECT version, checksum, live_digest = {LIVE_DIGEST} FROM wallet_functions"),
            &[],
        )
        .await
        .map_err(sql("read the functions' stamp"))?;
    let applied = match row {
        None => Applied::Installed { previous: None },
        Some(row) => {
            let stamp = Stamp {
                version: row.get(0),
                checksum: row.get(1),
            };
            let intact: bool = row.get(2);
            if stamp.version > ours.version {
                return Err(ApplyError::Newer {
                    applied: stamp,
                    ours,
                });
            }
            if stamp.version == ours.version && stamp.checksum != ours.checksum {
                return Err(ApplyError::SameVersion {
                    applied: stamp,
                    ours,
                });
            }
            if stamp == ours && intact {
                return Ok(Applied::Unchanged);
            }
            if stamp == ours {
                tracing::warn!(%stamp, "the shard's SQL functions were edited by hand; applying them again");
                Applied::Repaired
            } else {
                Applied::Installed {
                    previous: Some(stamp),
                }
            }
        }
    };
    txn.batch_execute(DROP_ALL)
        .await
        .map_err(sql("drop the previous functions"))?;
    for file in FILES {
        txn.batch_execute(file.sql)
            .await
            .map_err(|source| sql_error(format!("apply {}.sql", file.name), source))?;
    }
    txn.execute(
        &format!(
            "INSERT INTO wallet_functions (version, checksum, live_digest) \
             VALUES ($1, $2, {LIVE_DIGEST}) \
             ON CONFLICT (singleton) DO UPDATE \
             SET version = excluded.version, checksum = excluded.checksum, \
                 live_digest = excluded.live_digest, applied_at = now()"
        ),
        &[&ours.version, &ours.checksum],
    )
    .await
    .map_err(sql("stamp the functions"))?;
    txn.commit().await.map_err(sql("commit"))?;
    tracing::info!(%ours, "applied the shard's SQL functions");
    Ok(applied)
}

/// `None` when the shard runs exactly this build's functions, else what it
/// holds instead. One simple query, so one round trip.
pub async fn check(client: &Client) -> Result<Option<Found>, tokio_postgres::Error> {
    let messages = match client
        .simple_query(&format!(
            "SELECT version, checksum, live_digest = {LIVE_DIGEST} FROM wallet_functions"
        ))
        .await
    {
        Ok(messages) => messages,
        Err(e) if e.code() == Some(&SqlState::UNDEFINED_TABLE) => return Ok(Some(Found::Nothing)),
        Err(e) => return Err(e),
    };
    let Some(row) = messages.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(row) => Some(row),
        _ => None,
    }) else {
        return Ok(Some(Found::Nothing));
    };
    let stamp = Stamp {
        // The column is an integer: PostgreSQL's text for it always parses.
        version: row.get(0).and_then(|v| v.parse().ok()).unwrap_or(0),
        checksum: row.get(1).unwrap_or_default().to_owned(),
    };
    let intact = row.get(2) == Some("t");
    Ok(if stamp != Stamp::compiled() {
        Some(Found::Other(stamp))
    } else if !intact {
        Some(Found::Edited(stamp))
    } else {
        None
    })
}

fn sql(context: &'static str) -> impl Fn(tokio_postgres::Error) -> ApplyError {
    move |source| sql_error(context.to_owned(), source)
}

fn sql_error(context: String, source: tokio_postgres::Error) -> ApplyError {
    let detail = match source.as_db_error() {
        Some(db) => format!("{} {}", db.code().code(), db.message()),
        None => source.to_string(),
    };
    ApplyError::Sql {
        context,
        detail,
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checksum of the files of [`VERSION`]. A failure here means a file in
    /// `sql/shard/functions/` changed: raise [`VERSION`] by one and pin the new
    /// checksum, so that shards and coordinators can tell the two sets apart.
    const PINNED: (i32, &str) = (
        22,
        "e298ca96ff95093e2df4a714a229de2ec44b2320f9e40d483c7b08ef80545a44",
    );

    #[test]
    fn the_version_pins_the_files() {
        assert_eq!(
            (VERSION, checksum()),
            PINNED,
            "a function file changed: raise functions::VERSION and pin the new checksum"
        );
    }

    #[test]
    fn one_file_per_function_named_after_it() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../sql/shard/functions");
        let mut on_disk: Vec<String> = std::fs::read_dir(dir)
            .expect("read sql/shard/functions")
            .map(|e| {
                e.expect("directory entry")
                    .file_name()
                    .into_string()
                    .expect("UTF-8 name")
            })
            .collect();
        on_disk.sort();
        let mut embedded: Vec<String> = FILES.iter().map(|f| format!("{}.sql", f.name)).collect();
        embedded.sort();
        assert_eq!(on_disk, embedded, "every file is embedded, and only those");
        for file in FILES {
            let creates = file
                .sql
                .matches("CREATE OR REPLACE FUNCTION ")
                .collect::<Vec<_>>()
                .len();
            assert_eq!(creates, 1, "{}.sql defines one function", file.name);
            assert!(
                file.sql
                    .contains(&format!("CREATE OR REPLACE FUNCTION {}(", file.name)),
                "{}.sql defines {0}",
                file.name
            );
        }
    }
}

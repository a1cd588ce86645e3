//! The wallet's rules as configured: default daily limits and fraud rules.
//!
//! They are enforced in one place, the group's check on the payer's shard
//! (`wallet_batch_check`, which calls `wallet_fraud_check`), in the
//! transaction that moves the money, on every path and in both lock modes.
//! This module only holds and validates them, and renders them as the
//! parameters those functions take. `POST /v1/fraud_detection` runs the same
//! SQL function against a proposed transfer, so a rule means the same thing
//! whether it is asked about or enforced.

use std::collections::{BTreeMap, BTreeSet};

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::money::{Amount, Currency};

/// What a fraud rule does to a transfer that meets it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Refused: 422 `transfer_blocked`, naming the rule.
    Block,
    /// Accepted, but held until an admin releases or rejects it.
    Review,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Block => "block",
            Action::Review => "review",
        }
    }
}

/// What a fraud rule looks at.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "rule", rename_all = "snake_case")]
pub enum Condition {
    /// The payer already made `max_transfers` transfers (not aborted) in the
    /// last `window_s` seconds: this one would be one more than allowed.
    Velocity { max_transfers: u32, window_s: u32 },
    /// One transfer above the amount of its currency.
    Amount { over: BTreeMap<Currency, Decimal> },
    /// Above the amount of its currency, to someone the payer never paid.
    NewRecipient { over: BTreeMap<Currency, Decimal> },
}

/// One configured fraud rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FraudRule {
    /// Shown to the client of a blocked transfer and on a held one.
    pub name: String,
    pub action: Action,
    #[serde(flatten)]
    pub condition: Condition,
}

/// The rules a shard's check enforces. The default has none: no limit, no
/// fraud rule. Its fields sit at the top level of the coordinator's
/// configuration (`daily_limits`, `fraud_rules`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct WalletRules {
    /// The daily outgoing limit per currency, for every user without an
    /// admin's override. A currency not listed has no default limit.
    pub daily_limits: BTreeMap<Currency, Decimal>,
    pub fraud_rules: Vec<FraudRule>,
    /// How long after a transfer its payer may dispute it, in days.
    pub dispute_window_days: u32,
    /// How long a transfer held for review waits for an admin before it
    /// expires (aborted `hold_expired`, its money back in the payer's
    /// available balance), in seconds.
    pub hold_expiry_s: u64,
}

/// The default of [`WalletRules::hold_expiry_s`]: a week.
pub const HOLD_EXPIRY_S: u64 = 7 * 24 * 3600;

/// The default of [`WalletRules::dispute_window_days`].
pub const DISPUTE_WINDOW_DAYS: u32 = 60;

impl Default for WalletRules {
    fn default() -> Self {
        WalletRules {
            daily_limits: BTreeMap::new(),
            fraud_rules: Vec::new(),
            dispute_window_days: DISPUTE_WINDOW_DAYS,
            hold_expiry_s: HOLD_EXPIRY_S,
        }
    }
}

/// Longest rule name: it travels in every refusal it causes.
pub const RULE_NAME_MAX: usize = 64;

/// Longest velocity window: a day, the longest history the rule reads.
pub const VELOCITY_WINDOW_MAX_S: u32 = 86_400;

impl WalletRules {
    /// Whether the rules make sense: names unique and short, windows and counts
    /// positive, amounts valid amounts of their currency.
    pub fn validate(&self) -> Result<(), String> {
        if self.hold_expiry_s == 0 {
            return Err("hold_expiry_s must be at least 1".into());
        }
        for (currency, limit) in &self.daily_limits {
            check_amount("daily_limits", *currency, *limit)?;
        }
        let mut names = BTreeSet::new();
        for rule in &self.fraud_rules {
            let name = &rule.name;
            if name.is_empty()
                || name.len() > RULE_NAME_MAX
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                return Err(format!(
                    "fraud rule name {name:?}: 1-{RULE_NAME_MAX} letters, digits, '_' or '-'"
                ));
            }
            if !names.insert(name.as_str()) {
                return Err(format!("fraud rule name {name:?} appears twice"));
            }
            match &rule.condition {
                Condition::Velocity {
                    max_transfers,
                    window_s,
                } => {
                    if *max_transfers == 0 || *window_s == 0 || *window_s > VELOCITY_WINDOW_MAX_S {
                        return Err(format!(
                            "fraud rule {name:?}: max_transfers must be at least 1 and \
                             window_s 1-{VELOCITY_WINDOW_MAX_S}"
                        ));
                    }
                }
                Condition::Amount { over } | Condition::NewRecipient { over } => {
                    if over.is_empty() {
                        return Err(format!("fraud rule {name:?}: `over` names no currency"));
                    }
                    for (currency, amount) in over {
                        check_amount(&format!("fraud rule {name:?}"), *currency, *amount)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// The default daily limit for a currency, if one is configured.
    pub fn daily_limit(&self, currency: Currency) -> Option<Decimal> {
        self.daily_limits.get(&currency).copied()
    }

    /// The fraud rules as `wallet_fraud_check` takes them, or `None` when
    /// there are none (the check then skips them at no cost).
    pub fn sql_rules(&self) -> Option<serde_json::Value> {
        if self.fraud_rules.is_empty() {
            return None;
        }
        serde_json::to_value(&self.fraud_rules).ok()
    }
}

fn check_amount(what: &str, currency: Currency, value: Decimal) -> Result<(), String> {
    Amount::parse(&value.to_string(), currency)
        .map(|_| ())
        .map_err(|e| format!("{what}: {currency} {value}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(json: &str) -> WalletRules {
        serde_json::from_str(json).expect("rules parse")
    }

    #[test]
    fn the_readme_example_parses_validates_and_renders_for_sql() {
        let r = rules(
            r#"{"daily_limits": {"USD": "1000.00"},
                "fraud_rules": [
                  {"name": "burst", "rule": "velocity", "max_transfers": 10, "window_s": 60, "action": "block"},
                  {"name": "large", "rule": "amount", "over": {"USD": "5000"}, "action": "block"},
                  {"name": "stranger", "rule": "new_recipient", "over": {"USD": "500"}, "action": "block"}
                ]}"#,
        );
        r.validate().expect("valid");
        assert_eq!(r.daily_limit(Currency::Usd), Some(Decimal::new(100000, 2)));
        assert_eq!(r.daily_limit(Currency::Eur), None);
        let sql = r.sql_rules().expect("rules for SQL");
        assert_eq!(sql[0]["rule"], "velocity");
        assert_eq!(sql[0]["max_transfers"], 10);
        assert_eq!(sql[1]["over"]["USD"], "5000");
        assert_eq!(sql[2]["action"], "block");
        assert_eq!(WalletRules::default().sql_rules(), None);
    }

    #[test]
    fn bad_rules_are_refused_with_the_rule_named() {
        for (json, needle) in [
            (
                r#"{"fraud_rules": [{"name": "a", "rule": "velocity", "max_transfers": 0, "window_s": 5, "action": "block"}]}"#,
                "max_transfers",
            ),
            (
                r#"{"fraud_rules": [{"name": "a", "rule": "amount", "over": {}, "action": "block"}]}"#,
                "names no currency",
            ),
            (
                r#"{"fraud_rules": [{"name": "a", "rule": "amount", "over": {"JPY": "1.5"}, "action": "block"}]}"#,
                "JPY",
            ),
            (
                r#"{"fraud_rules": [{"name": "a", "rule": "amount", "over": {"USD": "1"}, "action": "block"},
                                    {"name": "a", "rule": "amount", "over": {"USD": "2"}, "action": "block"}]}"#,
                "twice",
            ),
            (
                r#"{"fraud_rules": [{"name": "no spaces", "rule": "amount", "over": {"USD": "1"}, "action": "block"}]}"#,
                "letters",
            ),
            (r#"{"daily_limits": {"USD": "-1"}}"#, "daily_limits"),
        ] {
            let err = rules(json).validate().expect_err(json);
            assert!(err.contains(needle), "{err} lacks {needle}");
        }
        assert!(serde_json::from_str::<WalletRules>(
            r#"{"fraud_rules": [{"name": "a", "rule": "teleport", "action": "block"}]}"#
        )
        .is_err());
    }
}

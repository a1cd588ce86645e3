//! Money: validating newtypes, parsed once at the edge. Amounts are `Decimal`, never floats.

use std::fmt;
use std::str::FromStr;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// The largest amount a single operation may move, in major units. Bounded so that
/// sums over many entries stay far inside `Decimal`'s 28 significant digits.
pub const AMOUNT_MAX_MAJOR_UNITS: i64 = 1_000_000_000;

/// The currencies the wallet holds. Each has a fixed number of decimal places.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Currency {
    #[serde(rename = "USD")]
    Usd,
    #[serde(rename = "EUR")]
    Eur,
    #[serde(rename = "GBP")]
    Gbp,
    #[serde(rename = "CHF")]
    Chf,
    #[serde(rename = "JPY")]
    Jpy,
}

impl Currency {
    pub const ALL: [Currency; 5] = [
        Currency::Usd,
        Currency::Eur,
        Currency::Gbp,
        Currency::Chf,
        Currency::Jpy,
    ];

    /// Decimal places of the currency's minor unit (ISO 4217).
    pub fn scale(self) -> u32 {
        match self {
            Currency::Jpy => 0,
            _ => 2,
        }
    }

    pub fn code(self) -> &'static str {
        match self {
            Currency::Usd => "USD",
            Currency::Eur => "EUR",
            Currency::Gbp => "GBP",
            Currency::Chf => "CHF",
            Currency::Jpy => "JPY",
        }
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("unsupported currency {0:?}; supported: USD, EUR, GBP, CHF, JPY")]
    UnknownCurrency(String),
    #[error("amount {0:?} is not a decimal number")]
    NotANumber(String),
    #[error("amount must be positive")]
    NotPositive,
    #[error("amount has {scale} decimal places; {currency} allows at most {max}")]
    TooManyDecimals {
        currency: Currency,
        scale: u32,
        max: u32,
    },
    #[error("amount exceeds the limit of {max} {currency} per operation")]
    TooLarge { currency: Currency, max: i64 },
}

impl FromStr for Currency {
    type Err = MoneyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Currency::ALL
            .into_iter()
            .find(|c| c.code() == s)
            .ok_or_else(|| MoneyError::UnknownCurrency(s.to_owned()))
    }
}

/// A validated amount of money in one currency: positive, within
/// [`AMOUNT_MAX_MAJOR_UNITS`], and with no more decimals than the currency allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Amount {
    value: Decimal,
    currency: Currency,
}

impl Amount {
    /// Parses the decimal string a client sent. Strings only: a JSON number would have
    /// gone through a float in most clients before reaching us.
    pub fn parse(text: &str, currency: Currency) -> Result<Amount, MoneyError> {
        let trimmed = text.trim();
        // Decimal's parser accepts forms like "1_000" and "1e3"; money does not.
        let plain = !trimmed.is_empty()
            && trimmed
                .chars()
                .all(|c| c.is_ascii_digit() || c == '.' || c == '-' || c == '+');
        if !plain {
            return Err(MoneyError::NotANumber(text.to_owned()));
        }
        let value = Decimal::from_str_exact(trimmed)
            .map_err(|_| MoneyError::NotANumber(text.to_owned()))?;
        Amount::new(value, currency)
    }

    pub fn new(value: Decimal, currency: Currency) -> Result<Amount, MoneyError> {
        if value <= Decimal::ZERO {
            return Err(MoneyError::NotPositive);
        }
        let normalized = value.normalize();
        if normalized.scale() > currency.scale() {
            return Err(MoneyError::TooManyDecimals {
                currency,
                scale: normalized.scale(),
                max: currency.scale(),
            });
        }
        if normalized > Decimal::from(AMOUNT_MAX_MAJOR_UNITS) {
            return Err(MoneyError::TooLarge {
                currency,
                max: AMOUNT_MAX_MAJOR_UNITS,
            });
        }
        let mut value = normalized;
        value.rescale(currency.scale());
        Ok(Amount { value, currency })
    }

    pub fn value(&self) -> Decimal {
        self.value
    }

    pub fn currency(&self) -> Currency {
        self.currency
    }
}

/// Formats a stored balance or amount at its currency's scale ("10" -> "10.00").
pub fn format_money(value: Decimal, currency: Currency) -> String {
    let mut v = value;
    v.rescale(currency.scale());
    v.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn amounts_are_rescaled_to_the_currency() {
        let a = Amount::parse("10.5", Currency::Usd).expect("valid amount");
        assert_eq!(a.value().to_string(), "10.50");
        let y = Amount::parse("1000", Currency::Jpy).expect("valid amount");
        assert_eq!(y.value().to_string(), "1000");
    }

    #[test]
    fn malformed_amounts_are_rejected() {
        for bad in [
            "", " ", "abc", "1e3", "1_000", "NaN", "0x10", "1.2.3", "--1",
        ] {
            assert!(
                matches!(
                    Amount::parse(bad, Currency::Usd),
                    Err(MoneyError::NotANumber(_))
                ),
                "{bad:?} must be rejected as not a number"
            );
        }
    }

    #[test]
    fn trailing_zeros_beyond_the_scale_are_accepted() {
        let a = Amount::parse("1.2300", Currency::Usd).expect("1.2300 is 1.23");
        assert_eq!(a.value().to_string(), "1.23");
    }

    #[test]
    fn unknown_currencies_are_rejected() {
        assert!(matches!(
            "XXX".parse::<Currency>(),
            Err(MoneyError::UnknownCurrency(_))
        ));
        assert!("usd".parse::<Currency>().is_err(), "codes are upper case");
    }

    fn currency() -> impl Strategy<Value = Currency> {
        proptest::sample::select(Currency::ALL.to_vec())
    }

    proptest! {
        #[test]
        fn any_positive_amount_within_scale_and_limit_round_trips(
            minor in 1i64..=AMOUNT_MAX_MAJOR_UNITS * 100, c in currency()
        ) {
            let value = Decimal::new(minor, c.scale()).min(Decimal::from(AMOUNT_MAX_MAJOR_UNITS));
            let a = Amount::parse(&value.to_string(), c).expect("in range");
            prop_assert_eq!(a.value(), value);
            prop_assert_eq!(a.value().scale(), c.scale());
        }

        #[test]
        fn zero_and_negative_amounts_are_rejected(minor in i64::MIN / 2..=0i64, c in currency()) {
            let value = Decimal::new(minor, c.scale());
            prop_assert_eq!(Amount::parse(&value.to_string(), c), Err(MoneyError::NotPositive));
        }

        #[test]
        fn amounts_with_more_decimals_than_the_currency_are_rejected(
            minor in 1i64..1_000_000_000, extra in 1u32..6, c in currency()
        ) {
            // A non-zero last digit guarantees the scale really exceeds the currency's.
            let value = Decimal::new(minor * 10 + 1, c.scale() + extra);
            let rejected = matches!(
                Amount::parse(&value.to_string(), c),
                Err(MoneyError::TooManyDecimals { .. })
            );
            prop_assert!(rejected);
        }

        #[test]
        fn amounts_above_the_limit_are_rejected(excess in 1i64..i64::MAX / 4, c in currency()) {
            let value = Decimal::from(AMOUNT_MAX_MAJOR_UNITS) + Decimal::from(excess);
            let rejected = matches!(Amount::parse(&value.to_string(), c), Err(MoneyError::TooLarge { .. }));
            prop_assert!(rejected);
        }

        #[test]
        fn huge_or_overflowing_numbers_never_panic(digits in "[1-9][0-9]{20,60}(\\.[0-9]{1,40})?") {
            // Longer than Decimal can hold: must be an error, never a panic or a silent rounding.
            let result = Amount::parse(&digits, Currency::Usd);
            prop_assert!(result.is_err());
        }

        #[test]
        fn format_money_always_shows_the_currency_scale(minor in 0i64..1_000_000_000_000, c in currency()) {
            let value = Decimal::new(minor, c.scale());
            let text = format_money(value, c);
            let decimals = text.split('.').nth(1).map_or(0, str::len) as u32;
            prop_assert_eq!(decimals, c.scale());
        }
    }
}
